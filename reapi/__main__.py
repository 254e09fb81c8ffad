from reapi.cli import main

raise SystemExit(main())
