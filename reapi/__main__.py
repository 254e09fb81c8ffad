from reapi.frontend.cli import main

raise SystemExit(main())
