"""Writing a compile's outputs where the local compiler would have written them."""

from __future__ import annotations

import os
from pathlib import Path


def write_outputs(cwd: str, files: list[tuple[str, bytes, bool]]) -> None:
    """Write each (path relative to `cwd`, bytes, executable), atomically:
    make never sees half an object."""
    for path, data, executable in files:
        target = Path(cwd, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.reapi-{os.getpid()}")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o755 if executable else 0o644)
        os.replace(tmp, target)
