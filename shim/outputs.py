"""Writing a compile's outputs where the local compiler would have written them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def write_outputs(files: Mapping[str, tuple[bytes, bool]]) -> None:
    """Write each file (absolute path -> bytes, executable), atomically: make
    never sees half an object."""
    for path, (data, executable) in files.items():
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.reapi-{os.getpid()}")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o755 if executable else 0o644)
        os.replace(tmp, target)
