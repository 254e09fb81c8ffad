"""`reapi cas gc | stats | verify --redis`: the lifecycle tools for the CAS in Redis.

The same guarantees as on disk (cas/gc.py, cas/verify.py):
- gc evicts least recently used blobs first and never one used within the
  grace period: each deletion re-checks the blob's last use inside the script
  that deletes it, which runs atomically with the scripts that record uses.
- One gc at a time: a lock key in Redis, held while it runs (renewed), freed
  at its end; a second gc is refused with one line.
- An action-cache hit never names an evicted blob: the action cache checks
  every blob a result names before answering (cas/action_cache.py); entries
  whose blobs went become misses, and expire after their RESULT_TTL.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from google.protobuf.message import DecodeError

from cas.action_cache import named_blobs, tree_files
from cas.gc import GcReport
from cas.redis_conn import Client, redis_errors
from cas.redis_store import TAGS, RedisStore, atime_key, digest_of_member
from cas.store import get_blob
from cas.verify import Corrupt, VerifyReport
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import NotFound, ReapiError
from reapi.protos import remote_execution_pb2 as re_pb2

GC_LOCK = "cas:gc-lock"
# The lock outlives a gc that dies by this many seconds; a running gc renews it.
LOCK_SECONDS = 300
# Blobs' last uses are counted in buckets of this many seconds to find how far back to evict.
BUCKET = 60.0
PAGE = 500

# Frees the lock only if it is still ours.
_UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class GcRunning(Exception):
    """Another gc holds the lock."""


async def _old_entries(
    client: Client, tag: str, before: float, start: int = 0
) -> list[tuple[bytes, float]]:
    with redis_errors("listing the CAS"):
        entries = await client.zrangebyscore(
            atime_key(tag), "-inf", f"({before!r}", start=start, num=PAGE, withscores=True
        )
    return cast(list[tuple[bytes, float]], entries)  # withscores: (member, score) pairs


async def _entries_before(
    client: Client, tag: str, before: float
) -> AsyncIterator[tuple[Digest, float]]:
    """The tag's blobs last used before `before` (paged; nothing deleted meanwhile)."""
    start = 0
    while page := await _old_entries(client, tag, before, start):
        start += len(page)
        for member, score in page:
            digest = digest_of_member(member.decode())
            if digest is not None:
                yield digest, score


async def collect_redis(
    client: Client,
    max_size: int,
    *,
    grace: float,
    dry_run: bool = False,
    if_above: int | None = None,
    progress: Callable[[GcReport], None] | None = None,
    now: float | None = None,
) -> GcReport:
    """Evict least recently used blobs until the store holds at most `max_size`
    bytes; with `if_above`, only if it holds more than that. GcRunning if
    another gc is running."""
    started = time.monotonic()
    token = uuid.uuid4().hex
    if not dry_run:
        with redis_errors("taking the gc lock"):
            if not await client.set(GC_LOCK, token, nx=True, ex=LOCK_SECONDS):
                raise GcRunning("another reapi cas gc is running on this Redis; try again later")
    try:
        report = GcReport(dry_run=dry_run)
        now = time.time() if now is None else now
        await _collect(client, report, max_size, now - grace, if_above, progress, token)
    finally:
        if not dry_run:
            with redis_errors("freeing the gc lock"):
                await client.eval(_UNLOCK, 1, GC_LOCK, token)
    report.seconds = time.monotonic() - started
    return report


async def _collect(
    client: Client,
    report: GcReport,
    max_size: int,
    horizon: float,
    if_above: int | None,
    progress: Callable[[GcReport], None] | None,
    token: str,
) -> None:
    store = RedisStore(client)
    report.bytes_before = await store.total_size()
    with redis_errors("counting the CAS"):
        pipe = client.pipeline(transaction=False)
        for tag in TAGS:
            pipe.zcard(atime_key(tag))
        report.blobs_before = sum(await pipe.execute())
    need = report.bytes_before - max_size
    if need <= 0 or (if_above is not None and report.bytes_before <= if_above):
        return
    limit = await _eviction_time(client, need, horizon)
    for tag in TAGS:
        await _evict_tag(client, store, tag, limit, report, token)
        if progress:
            progress(report)
    if report.evicted_bytes < need:
        report.kept_recent_bytes = need - report.evicted_bytes


async def _eviction_time(client: Client, need: int, horizon: float) -> float:
    """The time before which every blob must go for `need` bytes to be freed
    (to BUCKET seconds), never later than `horizon`."""
    freeable: Counter[int] = Counter()
    for tag in TAGS:
        async for digest, score in _entries_before(client, tag, horizon):
            freeable[int(score // BUCKET)] += digest.size
    freed = 0
    for bucket in sorted(freeable):
        freed += freeable[bucket]
        if freed >= need:
            return min(horizon, (bucket + 1) * BUCKET)
    return horizon


async def _evict_tag(
    client: Client, store: RedisStore, tag: str, limit: float, report: GcReport, token: str
) -> None:
    if report.dry_run:
        async for digest, _ in _entries_before(client, tag, limit):
            report.evicted_blobs += 1
            report.evicted_bytes += digest.size
        return
    with redis_errors("renewing the gc lock"):
        await client.set(GC_LOCK, token, xx=True, ex=LOCK_SECONDS)
    # Deleted entries leave the range, refreshed ones move out of it: each page
    # is the next one from the start, until none is left.
    while page := await _old_entries(client, tag, limit):
        for member, _ in page:
            victim = digest_of_member(member.decode())
            if victim is None:
                with redis_errors("listing the CAS"):
                    await client.zrem(atime_key(tag), member)
            elif await store.delete(victim, used_before=limit):
                report.evicted_blobs += 1
                report.evicted_bytes += victim.size


async def _action_results(client: Client) -> AsyncIterator[tuple[str, str, Digest]]:
    """(key, instance name, action digest) of every action-cache entry."""
    with redis_errors("listing the action cache"):
        keys = [key async for key in client.scan_iter(match="ac:*", count=1000)]
    for key in keys:
        text = key.decode()
        _, rest = text.split(":", 1)
        instance, name, hash_, size = rest.rsplit(":", 3)
        function = DigestFunction.from_path_name(name)
        if function is not None and size.isdigit():
            yield text, urllib.parse.unquote(instance), Digest(function, hash_, int(size))


async def stats_redis(client: Client, where: str) -> dict[str, Any]:
    """What `reapi cas stats --redis` shows; JSON-ready."""
    store = RedisStore(client)
    blobs = 0
    oldest: float | None = None
    newest: float | None = None
    for tag in TAGS:
        with redis_errors("reading the CAS"):
            count = await client.zcard(atime_key(tag))
            first = await client.zrange(atime_key(tag), 0, 0, withscores=True)
            last = await client.zrange(atime_key(tag), -1, -1, withscores=True)
        blobs += count
        # Three separate reads: a gc running meanwhile may empty the set between them.
        if first:
            first_use = float(first[0][1])
            oldest = first_use if oldest is None else min(oldest, first_use)
        if last:
            last_use = float(last[0][1])
            newest = last_use if newest is None else max(newest, last_use)
    by_instance: Counter[str] = Counter()
    async for _, instance, _ in _action_results(client):
        by_instance[instance] += 1
    return {
        "storage": where,
        "blobs": blobs,
        "bytes": await store.total_size(),
        "action_results": sum(by_instance.values()),
        "action_results_by_instance": dict(by_instance),
        "oldest_access": oldest,
        "newest_access": newest,
    }


async def verify_redis(
    client: Client, repair: bool = False, progress: Callable[[VerifyReport], None] | None = None
) -> VerifyReport:
    """Re-hash every blob and check every action-cache entry; with `repair`,
    remove the entries that are unreadable or name a missing or corrupt blob,
    then the corrupt blobs."""
    started = time.monotonic()
    store = RedisStore(client)
    report = VerifyReport()
    corrupt: set[Digest] = set()
    async for info in store.iter_blobs():
        digest = info.digest
        report.blobs += 1
        report.bytes += digest.size
        hasher = digest.function.hasher()
        received = 0
        try:
            async for chunk in store.stored_bytes(digest):
                hasher.update(chunk)
                received += len(chunk)
        except NotFound:
            problem: str | None = "its bytes are missing"
        else:
            problem = None
            if received != digest.size:
                problem = f"{received} bytes stored"
            elif hasher.hexdigest() != digest.hash:
                problem = f"its bytes hash to {hasher.hexdigest()}"
        if problem:
            report.corrupt.append(Corrupt((digest.function, digest.hash), digest.size, problem))
            corrupt.add(digest)
        if progress and report.blobs % 1000 == 0:
            progress(report)
    doomed = []
    async for key, _, action in _action_results(client):
        with redis_errors("reading the action cache"):
            data = await client.get(key)
        if not isinstance(data, bytes):
            continue  # expired meanwhile
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
        except DecodeError:
            report.unreadable_entries.append(key)
            doomed.append(key)
            continue
        named = [Digest.from_proto(action.function, d) for d in named_blobs(result)]
        for directory in result.output_directories:
            try:
                tree = await get_blob(
                    store, Digest.from_proto(action.function, directory.tree_digest)
                )
            except (NotFound, ReapiError):
                continue  # its own absence is found below
            named += [Digest.from_proto(action.function, d) for d in tree_files(tree)]
        if corrupt.intersection(named) or await store.find_missing(named):
            report.incomplete_entries.append(key)
            doomed.append(key)
    if repair:
        for key in doomed:  # first: no entry may name a removed blob
            with redis_errors("repairing the action cache"):
                report.removed_entries += await client.delete(key)
        for digest in corrupt:
            report.removed_blobs += await store.delete(digest)
    report.seconds = time.monotonic() - started
    return report
