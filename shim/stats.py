"""The counters `reapi-cc --stats` shows, kept in $REAPI_HOME/shim/stats.json."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from shim.protocol import STAT_KEYS

# The tables of reasons (reason -> count) beside the counters.
REASON_TABLES = ("local_reasons", "scan_fallback_reasons", "preprocessed_reasons")


class Stats:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, Any] = {}
        self.zero()
        with contextlib.suppress(OSError, ValueError):
            self.values.update(json.loads(path.read_text()))
        self.dirty = False

    def add(self, key: str, amount: int = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount
        self.dirty = True

    def add_reason(self, key: str, reasons_key: str, reason: str) -> None:
        """Count `key`, and `reason` in the `reasons_key` table."""
        self.add(key)
        reasons = self.values.setdefault(reasons_key, {})
        reasons[reason] = reasons.get(reason, 0) + 1

    def local(self, reason: str) -> dict[str, Any]:
        """Count a compile left to the local compiler, and say so to reapi-cc."""
        self.add_reason("local_fallbacks", "local_reasons", reason)
        return {"do": "local", "reason": reason}

    def zero(self) -> None:
        self.values = {key: 0 for key in STAT_KEYS} | {table: {} for table in REASON_TABLES}
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.values, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
            self.dirty = False
