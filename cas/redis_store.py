"""RedisStore: the CAS kept in Redis (standalone or Cluster), shared by every frontend.

Why blobs live in Redis itself, large ones in chunks: Redis (Cluster) already
replicates and fails over what it holds, so the bytes need no replication of
ours and no second storage system to run. A value is at most CHUNK bytes, so
no single command makes Redis copy a large blob at once.

Keys. Every key of one blob carries the hash tag of the first two hex digits
of its hash: a blob, its chunks and its tag's bookkeeping sit in one Cluster
slot, so one Lua script changes them atomically, and the 256 tags spread the
store over the masters.

    cas:{ab}:FUNCTION:HASH:SIZE       the blob, or its first CHUNK bytes
    cas:{ab}:FUNCTION:HASH:SIZE:N     chunk N >= 1 of a blob larger than CHUNK
    cas:{ab}:atime                    sorted set "FUNCTION:HASH:SIZE" -> last use (s)
    cas:{ab}:bytes                    the total size of the tag's blobs
    up:{ab}:UPLOAD:N                  chunk N of an upload not yet committed (expires)

The size is part of the name, so a digest with the right hash and a wrong size
names nothing. A blob is stored exactly when its member is in its tag's atime
set: every script that stores or deletes one changes both, atomically (and a
failover replicates a script's effects whole), so a lookup asks the set alone.
A small blob's verified bytes are written first, then recorded by a script
that checks they are there; a large blob's verified chunks are renamed into
place by one script; a blob leaves in one step (a script deletes it all). A
frontend killed between a small blob's two steps leaves its bytes unrecorded:
never reported present nor counted, and recorded when the blob comes again.

Lifetimes follow `cas/gc.py`: a use refreshes the blob's time in `atime` when
it is older than TOUCH_AFTER, and `collect` deletes only blobs unused for the
grace period, re-checked inside the deleting script. Redis must not evict by
itself (`maxmemory-policy noeviction`): when it is full, writes fail with
RESOURCE_EXHAUSTED and the lookups that extend lifetimes go on.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Sequence

from cas.redis_conn import Arg, Client, is_cluster, redis_errors, run_script
from cas.store import (
    READ_CHUNK,
    BlobInfo,
    check_final,
    check_offset,
    check_room,
    verified,
)
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import NotFound, ReapiError, Unavailable

# Values are at most this large; larger blobs are chunked.
CHUNK = READ_CHUNK
# An upload's chunks expire if it is not committed within this many seconds.
UPLOAD_TTL = 3600
# A use refreshes a blob's time only when it is older than this (seconds): most
# lookups then write nothing (the same rule as the disk store's).
TOUCH_AFTER = 3600.0
TAGS = [f"{n:02x}" for n in range(256)]
# Scripts given a blob's key take its member from the 10th character on (after
# "cas:{ab}:"). Scripts given members (many blobs in one argument) build the
# keys from the tag in them, characters 8-9 (after "sha256:" or "blake3:"): on
# a Cluster all of one call share a tag, so a slot, whose key routes the call.
assert len("cas:{ab}:") + 1 == 10

# KEYS: none, or on a Cluster one key of the group's tag (it routes the call to
# that slot); ARGV: now, refresh-if-older-than, the blobs' members joined by
# newlines (one argument: packing a thousand costs the client next to nothing).
# Returns a string with a '1' (present) or '0' per blob: one reply to parse.
# allow-oom: lookups go on while Redis is full.
_TOUCH = """#!lua flags=allow-oom
local now, stale = ARGV[1], tonumber(ARGV[2])
local found = {}
for member in string.gmatch(ARGV[3], '[^\\n]+') do
  local atime = 'cas:{' .. string.sub(member, 8, 9) .. '}:atime'
  local last = redis.call('ZSCORE', atime, member)
  if not last then
    found[#found + 1] = 0
  else
    if tonumber(last) < stale then redis.call('ZADD', atime, now, member) end
    found[#found + 1] = 1
  end
end
return table.concat(found)
"""

# Small blobs are stored in two steps of one pipeline: their verified bytes by
# MSET (SETs on a Cluster; a script would copy every value into Lua and out
# again), then this script records them. KEYS: as _TOUCH's; ARGV: now, the
# members joined by newlines. A blob whose bytes are there gets its member (and
# its size counted, if new); one whose bytes a gc deleted in between is
# answered back, to be stored again. Returns those members, newline-joined.
_RECORD = """#!lua
local now = ARGV[1]
local lost, added = {}, {}
for member in string.gmatch(ARGV[2], '[^\\n]+') do
  local tag = string.sub(member, 8, 9)
  local prefix = 'cas:{' .. tag .. '}:'
  if redis.call('EXISTS', prefix .. member) == 0 then
    lost[#lost + 1] = member
  elseif redis.call('ZADD', prefix .. 'atime', now, member) == 1 then
    added[tag] = (added[tag] or 0) + tonumber(string.sub(member, 73))
  end
end
for tag, size in pairs(added) do redis.call('INCRBY', 'cas:{' .. tag .. '}:bytes', size) end
return table.concat(lost, '\\n')
"""
# A member's size starts at its 73rd character: FUNCTION (6) : HASH (64) :
assert all(len(f"{function.path_name}:{'0' * 64}:") == 72 for function in DigestFunction)
assert all(len(function.hex_of(b"")) == 64 for function in DigestFunction)
# Storing a batch gives up after this many rounds of blobs deleted under it.
RECORD_ROUNDS = 3

# KEYS: blob, atime, bytes, upload chunks 0..n-1, final chunks 1..n-1; ARGV: now, size, n.
# Returns 0 when an upload chunk has expired.
_COMMIT = """#!lua
local n = tonumber(ARGV[3])
for i = 1, n do
  if redis.call('EXISTS', KEYS[3 + i]) == 0 then return 0 end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 2, n do
    redis.call('RENAME', KEYS[3 + i], KEYS[2 + n + i])
    redis.call('PERSIST', KEYS[2 + n + i])
  end
  redis.call('RENAME', KEYS[4], KEYS[1])
  redis.call('PERSIST', KEYS[1])
  redis.call('INCRBY', KEYS[3], ARGV[2])
else
  for i = 1, n do redis.call('DEL', KEYS[3 + i]) end
end
redis.call('ZADD', KEYS[2], ARGV[1], string.sub(KEYS[1], 10))
return 1
"""

# KEYS: blob, atime, bytes, chunks 1..; ARGV: size, used-before (only a blob
# last used before it goes; '+inf' for any). Returns 1 if the blob was deleted.
_DELETE = """#!lua flags=allow-oom
local member = string.sub(KEYS[1], 10)
local last = redis.call('ZSCORE', KEYS[2], member)
if last and tonumber(last) >= tonumber(ARGV[2]) then return 0 end
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('DEL', KEYS[1])
local counted = redis.call('ZREM', KEYS[2], member)
if counted == 1 then redis.call('DECRBY', KEYS[3], ARGV[1]) end
return counted
"""


def _tag(digest: Digest) -> str:
    return "{" + digest.hash[:2] + "}"


def blob_key(digest: Digest) -> str:
    return f"cas:{_tag(digest)}:{digest.function.path_name}:{digest.hash}:{digest.size}"


def member(digest: Digest) -> str:
    """The blob in its tag's atime set: FUNCTION:HASH:SIZE."""
    return f"{digest.function.path_name}:{digest.hash}:{digest.size}"


assert all(len(function.path_name) == 6 for function in DigestFunction)


def _lines(reply: object) -> list[bytes]:
    return reply.split(b"\n") if isinstance(reply, bytes) and reply else []


def chunk_count(size: int) -> int:
    return max(1, -(-size // CHUNK))


def chunk_keys(digest: Digest) -> list[str]:
    """Every key holding the blob's bytes, chunk 0 (the blob key) first."""
    head = blob_key(digest)
    return [head] + [f"{head}:{n}" for n in range(1, chunk_count(digest.size))]


def atime_key(tag: str) -> str:
    return f"cas:{{{tag}}}:atime"


def bytes_key(tag: str) -> str:
    return f"cas:{{{tag}}}:bytes"


def digest_of_member(member: str) -> Digest | None:
    name, hash_, size = member.rsplit(":", 2)
    function = DigestFunction.from_path_name(name)
    return Digest(function, hash_, int(size)) if function is not None else None


class RedisStore:
    """The BlobStore contract (cas/store.py) on a Redis client from `cas.redis_conn`."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._cluster = is_cluster(client)

    def _groups(self, digests: Sequence[Digest]) -> list[list[Digest]]:
        """`digests` (no empty ones) in groups one script may take: one slot each
        on a Cluster, all together on a standalone Redis."""
        if not self._cluster:
            return [list(digests)] if digests else []
        by_tag: dict[str, list[Digest]] = {}
        for digest in digests:
            by_tag.setdefault(digest.hash[:2], []).append(digest)
        return list(by_tag.values())

    def _touch_call(self, group: Sequence[Digest], now: float) -> tuple[list[str], list[Arg]]:
        """The keys and arguments of the touch script for one group."""
        keys = [atime_key(group[0].hash[:2])] if self._cluster else []
        return keys, [repr(now), repr(now - TOUCH_AFTER), "\n".join(map(member, group))]

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        stored = list(dict.fromkeys(d for d in digests if not d.is_empty))
        groups = self._groups(stored)
        now = time.time()
        calls = [self._touch_call(group, now) for group in groups]
        with redis_errors("a lookup in the CAS"):
            answers = await run_script(self._client, _TOUCH, calls)
        present: set[Digest] = set()
        for group, flags in zip(groups, answers, strict=True):
            assert isinstance(flags, bytes)  # one '0' or '1' a blob
            present.update(d for d, flag in zip(group, flags, strict=True) if flag == ord("1"))
        return [d for d in digests if not d.is_empty and d not in present]

    async def get_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        """The values come by MGET (GETs on a Cluster, whose pipelines refuse
        MGET; a script would copy each value into Lua and back, twice MGET's
        time), pipelined with the touch script that records the use."""
        stored = list(dict.fromkeys(d for d in digests if not d.is_empty))
        groups = self._groups(stored)
        now = time.time()
        pipe = self._client.pipeline(transaction=False)
        for group in groups:
            keys = [blob_key(d) for d in group]
            if self._cluster:
                for key in keys:
                    pipe.get(key)
            else:
                pipe.mget(keys)
            touch_keys, touch_args = self._touch_call(group, now)
            pipe.eval(_TOUCH, len(touch_keys), *touch_keys, *touch_args)
        with redis_errors("reading from the CAS"):
            replies = iter(await pipe.execute() if groups else [])
        values: list[object] = []
        for group in groups:
            values += [next(replies) for _ in group] if self._cluster else next(replies)
            next(replies)  # the touch script's answer
        found: dict[Digest, bytes] = {d: b"" for d in digests if d.is_empty}
        for digest, value in zip((d for group in groups for d in group), values, strict=True):
            if not isinstance(value, bytes):
                continue
            if len(value) == digest.size:
                found[digest] = value
                continue
            try:  # a chunked blob: its first chunk came; read the rest
                rest = [chunk async for chunk in self._chunks(digest, CHUNK, digest.size)]
            except NotFound:
                continue  # deleted meanwhile
            found[digest] = value + b"".join(rest)
        return found

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        if not digest.is_empty and await self.find_missing([digest]):
            raise NotFound(f"blob {digest} not found")
        check_offset(digest, offset, limit)
        end = digest.size if limit == 0 else min(digest.size, offset + limit)
        async for chunk in self._chunks(digest, offset, end):
            yield chunk

    def stored_bytes(self, digest: Digest) -> AsyncIterator[bytes]:
        """A stored blob's bytes, a chunk at a time, without counting as a use
        (for verify). NotFound if it is not (or no longer) stored."""
        return self._chunks(digest, 0, digest.size)

    async def _chunks(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes start..end of a stored blob, a chunk at a time."""
        keys = chunk_keys(digest)
        while start < end:
            index, within = divmod(start, CHUNK)
            last = min(CHUNK, end - index * CHUNK) - 1
            with redis_errors(f"reading {digest}"):
                data = await self._client.getrange(keys[index], within, last)
            assert isinstance(data, bytes)  # the client does not decode responses
            if len(data) != last - within + 1:
                raise NotFound(f"blob {digest} was deleted while being read")
            yield data
            start += len(data)

    async def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[ReapiError | None]:
        errors = verified(blobs)
        small: dict[Digest, bytes] = {}
        for (digest, data), error in zip(blobs, errors, strict=True):
            if error is not None or digest.is_empty:
                continue
            if digest.size <= CHUNK:
                small[digest] = data
            else:
                writer = self.begin_write(digest)
                await writer.write(data)
                await writer.commit()
        await self._put_small(small)
        return errors

    async def _put_small(self, blobs: dict[Digest, bytes]) -> None:
        """Store verified small blobs: their bytes, then their records (see
        _RECORD); again for any a gc deleted in between."""
        pending = list(blobs)
        for _ in range(RECORD_ROUNDS):
            if not pending:
                return
            groups = self._groups(pending)
            pipe = self._client.pipeline(transaction=False)
            for group in groups:
                values = {blob_key(d): blobs[d] for d in group}
                if self._cluster:
                    for key, value in values.items():
                        pipe.set(key, value)
                else:
                    pipe.mset(values)
                keys = [atime_key(group[0].hash[:2])] if self._cluster else []
                members = "\n".join(map(member, group))
                pipe.eval(_RECORD, len(keys), *keys, repr(time.time()), members)
            with redis_errors(f"storing {len(pending)} blob(s)"):
                replies = iter(await pipe.execute())
            lost: set[str] = set()
            for group in groups:
                for _ in range(len(group) if self._cluster else 1):
                    next(replies)  # the bytes' OK
                lost.update(m.decode() for m in _lines(next(replies)))
            pending = [d for d in pending if member(d) in lost]
        raise Unavailable(f"blobs were deleted as fast as they were stored, e.g. {pending[0]}")

    def begin_write(self, digest: Digest) -> RedisWriter:
        return RedisWriter(self, digest)

    async def delete(self, digest: Digest, used_before: float | None = None) -> bool:
        """Remove a blob; True if it was there. With `used_before`, only if
        it was last used before that time (checked atomically with its uses)."""
        if digest.is_empty:
            return False
        tag = digest.hash[:2]
        keys = chunk_keys(digest)
        keys[1:1] = [atime_key(tag), bytes_key(tag)]
        args: list[Arg] = [digest.size, "+inf" if used_before is None else repr(used_before)]
        with redis_errors(f"deleting {digest}"):
            (deleted,) = await run_script(self._client, _DELETE, [(keys, args)])
        return bool(deleted)

    async def iter_blobs(self) -> AsyncIterator[BlobInfo]:
        for tag in TAGS:
            with redis_errors("listing the CAS"):
                entries = [e async for e in self._client.zscan_iter(atime_key(tag))]
            for member, score in entries:
                digest = digest_of_member(member.decode())
                if digest is not None:
                    yield BlobInfo(digest, score)

    async def total_size(self) -> int:
        """The bytes of every stored blob."""
        with redis_errors("reading the CAS's size"):
            pipe = self._client.pipeline(transaction=False)
            for tag in TAGS:
                pipe.get(bytes_key(tag))
            return sum(int(value or 0) for value in await pipe.execute())


class RedisWriter:
    """A streamed upload: verified chunk by chunk into expiring upload keys,
    renamed into place by one script at commit. At most one chunk in memory."""

    def __init__(self, store: RedisStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        self._hasher = digest.function.hasher()
        self._buffer = bytearray()
        self._received = 0
        self._upload = f"up:{_tag(digest)}:{uuid.uuid4().hex}"
        self._sent = 0  # upload chunks in Redis

    @property
    def committed_size(self) -> int:
        return self._received

    async def write(self, data: bytes) -> None:
        try:
            check_room(self._digest, self._received, len(data))
            self._hasher.update(data)
            self._buffer += data
            self._received += len(data)
            while len(self._buffer) >= CHUNK and self._digest.size > CHUNK:
                await self._send(bytes(self._buffer[:CHUNK]))
                del self._buffer[:CHUNK]
        except BaseException:
            await self.abort()
            raise

    async def _send(self, chunk: bytes) -> None:
        with redis_errors(f"uploading {self._digest}"):
            await self._store._client.set(f"{self._upload}:{self._sent}", chunk, ex=UPLOAD_TTL)
        self._sent += 1

    async def commit(self) -> None:
        try:
            check_final(self._digest, self._received, self._hasher)
            if self._digest.is_empty:
                return
            if self._digest.size <= CHUNK:
                await self._store._put_small({self._digest: bytes(self._buffer)})
                return
            if self._buffer:
                await self._send(bytes(self._buffer))
                self._buffer.clear()
            await self._rename_into_place()
        except BaseException:
            await self.abort()
            raise

    async def _rename_into_place(self) -> None:
        digest, tag = self._digest, self._digest.hash[:2]
        uploads = [f"{self._upload}:{n}" for n in range(self._sent)]
        keys = [blob_key(digest), atime_key(tag), bytes_key(tag), *uploads, *chunk_keys(digest)[1:]]
        args: list[Arg] = [repr(time.time()), digest.size, self._sent]
        with redis_errors(f"storing {digest}"):
            (done,) = await run_script(self._store._client, _COMMIT, [(keys, args)])
        if not done:
            raise Unavailable(
                f"upload of {digest} took over {UPLOAD_TTL}s and expired; send it again"
            )
        self._sent = 0  # renamed: nothing of the upload is left to discard

    async def abort(self) -> None:
        self._buffer.clear()
        self._received = 0
        self._hasher = self._digest.function.hasher()
        if self._sent:
            keys = [f"{self._upload}:{n}" for n in range(self._sent)]
            self._sent = 0
            try:
                with redis_errors(f"discarding an upload of {self._digest}"):
                    await self._store._client.delete(*keys)
            except ReapiError:
                pass  # they expire by themselves


# An action-cache entry unused this long (seconds) expires; each hit renews it.
RESULT_TTL = 7 * 24 * 3600


class RedisActionResultStore:
    """Action-cache entries as keys ac:INSTANCE:FUNCTION:HASH:SIZE (the instance
    name percent-encoded, so no name can pose as another's key), each expiring
    RESULT_TTL after its last use. A Redis full to its maxmemory refuses new
    entries with RESOURCE_EXHAUSTED, as the disk store does when its disk is full."""

    def __init__(self, client: Client, ttl: int = RESULT_TTL) -> None:
        self._client = client
        self._ttl = ttl

    @staticmethod
    def key(action: Digest, instance_name: str) -> str:
        instance = urllib.parse.quote(instance_name, safe="")
        return f"ac:{instance}:{action.function.path_name}:{action.hash}:{action.size}"

    async def get(self, action: Digest, instance_name: str = "") -> bytes | None:
        with redis_errors(f"reading the action result of {action}"):
            data = await self._client.getex(self.key(action, instance_name), ex=self._ttl)
        assert data is None or isinstance(data, bytes)
        return data

    async def put(self, action: Digest, result: bytes, instance_name: str = "") -> None:
        with redis_errors(f"storing the action result of {action}"):
            await self._client.set(self.key(action, instance_name), result, ex=self._ttl)
