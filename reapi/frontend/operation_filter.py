"""ListOperations' filter: the simple language BuildGrid's `bgd operation list
--filter` sends, `PARAMETER OPERATOR VALUE` clauses joined by `&`, all of which
must hold:

    stage = QUEUED
    stage != completed & action_digest = 3a0c...e1/142

Parameters: `stage` (UNKNOWN, CACHE_CHECK, QUEUED, EXECUTING, COMPLETED, any case;
ordered as the stages run, so `stage < COMPLETED` works), `name` and
`action_digest` (`HASH/SIZE`). Operators: = != < <= > >=. Anything else is
INVALID_ARGUMENT naming what is understood.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from executor.scheduler import Job
from reapi.core.errors import InvalidArgument
from reapi.protos import remote_execution_pb2 as re_pb2

_CLAUSE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|!=|=|<|>)\s*(\S+)\s*")
_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_STAGES = {name.lower(): number for name, number in re_pb2.ExecutionStage.Value.items()}


def _stage(text: str) -> int:
    try:
        return _STAGES[text.lower()]
    except KeyError:
        known = ", ".join(name.upper() for name in _STAGES)
        raise InvalidArgument(f"filter: stage {text!r} is not one of {known}") from None


# Each parameter: how to read the value given, and the job's value to compare with.
_PARAMETERS: dict[str, tuple[Callable[[str], Any], Callable[[Job], Any]]] = {
    "stage": (_stage, lambda job: job.stage),
    "name": (str, lambda job: job.name),
    "action_digest": (str, lambda job: f"{job.action_digest.hash}/{job.action_digest.size}"),
}


@dataclass(frozen=True)
class Clause:
    parameter: str
    compare: Callable[[Any, Any], bool]
    value: Any

    def holds(self, job: Job) -> bool:
        return self.compare(_PARAMETERS[self.parameter][1](job), self.value)


def parse_filter(text: str) -> list[Clause]:
    """The clauses of `text` (none for an empty filter: every operation)."""
    if not text.strip():
        return []
    clauses = []
    for part in text.split("&"):
        match = _CLAUSE.fullmatch(part)
        if match is None:
            raise InvalidArgument(
                f"filter {text!r}: expected PARAMETER OPERATOR VALUE clauses joined by '&', "
                f"e.g. 'stage = QUEUED', not {part.strip()!r}"
            )
        parameter, symbol, value = match.groups()
        if parameter not in _PARAMETERS:
            raise InvalidArgument(
                f"filter: unknown parameter {parameter!r}; known: {', '.join(_PARAMETERS)}"
            )
        clauses.append(Clause(parameter, _OPERATORS[symbol], _PARAMETERS[parameter][0](value)))
    return clauses


def matches(clauses: list[Clause], job: Job) -> bool:
    return all(clause.holds(job) for clause in clauses)
