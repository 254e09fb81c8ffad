"""ListOperations' filter language, clause by clause."""

from __future__ import annotations

import pytest

from executor.scheduler import COMPLETED, EXECUTING, QUEUED, Job
from reapi.core.digests import DigestFunction
from reapi.core.errors import InvalidArgument
from reapi.frontend.operation_filter import matches, parse_filter
from reapi.protos import remote_execution_pb2 as re_pb2

DIGEST = DigestFunction.SHA256.digest_of(b"action")


def _job(stage: int, name: str = "operations/1") -> Job:
    job = Job.__new__(Job)  # no event loop needed: only the compared fields
    job.name, job.stage, job.action_digest = name, stage, DIGEST
    return job


@pytest.mark.parametrize(
    ("text", "stages"),
    [
        ("", {QUEUED, EXECUTING, COMPLETED}),
        ("stage = QUEUED", {QUEUED}),
        ("stage=queued", {QUEUED}),
        ("stage != COMPLETED", {QUEUED, EXECUTING}),
        ("stage < COMPLETED", {QUEUED, EXECUTING}),
        ("stage <= EXECUTING", {QUEUED, EXECUTING}),
        ("stage > QUEUED", {EXECUTING, COMPLETED}),
        ("stage >= cache_check & stage != executing", {QUEUED, COMPLETED}),
        ("stage = EXECUTING & name = operations/2", set()),
        (f"action_digest = {DIGEST.hash}/{DIGEST.size}", {QUEUED, EXECUTING, COMPLETED}),
        (f"action_digest != {DIGEST.hash}/{DIGEST.size}", set()),
    ],
)
def test_clauses(text: str, stages: set[int]) -> None:
    clauses = parse_filter(text)
    assert {s for s in (QUEUED, EXECUTING, COMPLETED) if matches(clauses, _job(s))} == stages


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("done = true", "unknown parameter 'done'"),
        ("stage = FINISHED", "stage 'FINISHED' is not one of"),
        ("stage QUEUED", "expected PARAMETER OPERATOR VALUE"),
        ("stage = QUEUED &", "expected PARAMETER OPERATOR VALUE"),
        ("stage == QUEUED", "expected PARAMETER OPERATOR VALUE"),
        ("stage = two words", "expected PARAMETER OPERATOR VALUE"),
    ],
)
def test_bad_filters(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_filter(text)


def test_stage_names_are_the_protos() -> None:
    assert set(re_pb2.ExecutionStage.Value.keys()) == {
        "UNKNOWN", "CACHE_CHECK", "QUEUED", "EXECUTING", "COMPLETED",
    }  # fmt: skip
