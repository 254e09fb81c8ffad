"""What RedisStore promises beyond the BlobStore contract, on real redis-servers:
the layout (a blob's keys in one slot, chunks of at most CHUNK bytes), the size
it keeps, lifetimes, and the statuses of a full or unreachable Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.crc

from cas.redis_conn import RedisConfigError, RedisTarget, connect, redacted
from cas.redis_store import _RECORD, CHUNK, RedisStore, atime_key, blob_key, chunk_keys, member
from cas.store import get_blob, put_blob
from reapi.core.digests import DigestFunction
from reapi.core.errors import ResourceExhausted, Unavailable
from tests import redis_servers
from tests.pki import make_pki
from tests.redis_servers import RedisDeployment, client_of

SHA256 = DigestFunction.SHA256


@pytest.fixture
async def store(redis_flushed: RedisDeployment) -> AsyncIterator[RedisStore]:
    client = await client_of(redis_flushed)
    yield RedisStore(client)
    await client.aclose()


async def test_large_blob_is_chunked_within_one_slot(
    store: RedisStore, redis_flushed: RedisDeployment
) -> None:
    data = os.urandom(2 * CHUNK + 5)
    digest = SHA256.digest_of(data)
    await put_blob(store, digest, data)
    keys = chunk_keys(digest)
    assert len(keys) == 3 and keys[0] == blob_key(digest)
    with redis_flushed.client() as client:
        assert [client.strlen(key) for key in keys] == [CHUNK, CHUNK, 5]
    assert len({redis.crc.key_slot(key.encode()) for key in keys}) == 1
    assert await get_blob(store, digest) == data
    assert await store.total_size() == len(data)
    assert await store.delete(digest)
    assert await store.total_size() == 0
    assert [k for k in redis_flushed.keys("*") if not k.endswith(b":bytes")] == []


async def test_blobs_spread_over_the_masters(
    store: RedisStore, redis_flushed: RedisDeployment
) -> None:
    blobs = [os.urandom(100) for _ in range(200)]
    assert await store.put_many([(SHA256.digest_of(b), b) for b in blobs]) == [None] * 200
    counts = []
    for node in redis_flushed.masters():
        with node.client() as client:
            counts.append(sum(1 for key in client.scan_iter("cas:*:*:*:*")))
    assert sum(counts) == 200
    if redis_flushed.cluster:
        assert len(counts) == 3 and min(counts) > 20, counts


async def test_delete_keeps_a_blob_used_since(store: RedisStore) -> None:
    digest = SHA256.digest_of(b"recent")
    await put_blob(store, digest, b"recent")
    assert not await store.delete(digest, used_before=0.0), "used after the epoch: kept"
    assert await store.find_missing([digest]) == []
    assert await store.delete(digest, used_before=float("inf"))


async def test_uploads_of_many_chunks_leave_nothing_when_aborted(
    store: RedisStore, redis_flushed: RedisDeployment
) -> None:
    data = os.urandom(3 * CHUNK)
    writer = store.begin_write(SHA256.digest_of(data))
    await writer.write(data[: 2 * CHUNK + 1])
    await writer.abort()
    assert redis_flushed.keys("up:*") == []


async def test_an_expired_upload_is_unavailable_not_stored(
    store: RedisStore, redis_flushed: RedisDeployment
) -> None:
    data = os.urandom(2 * CHUNK)
    digest = SHA256.digest_of(data)
    writer = store.begin_write(digest)
    await writer.write(data)
    with redis_flushed.client() as client:  # as if an hour had passed
        for key in redis_flushed.keys("up:*"):
            client.delete(key)
    with pytest.raises(Unavailable, match="expired"):
        await writer.commit()
    assert await store.find_missing([digest]) == [digest]


async def test_full_redis_refuses_writes_and_still_answers(tmp_path: Path) -> None:
    with redis_servers.standalone(
        tmp_path, ("--maxmemory", "8mb", "--maxmemory-policy", "noeviction")
    ) as deployment:
        client = await client_of(deployment)
        store = RedisStore(client)
        kept = []
        with pytest.raises(ResourceExhausted, match="maxmemory"):
            for _ in range(100):
                data = os.urandom(512 * 1024)
                await put_blob(store, SHA256.digest_of(data), data)
                kept.append(SHA256.digest_of(data))
        large = os.urandom(3 * CHUNK)
        with pytest.raises(ResourceExhausted):
            await put_blob(store, SHA256.digest_of(large), large)
        assert kept and await store.find_missing(kept) == []
        assert (await store.get_many(kept[:1]))[kept[0]]
        assert await store.delete(kept[0])
        await client.aclose()


async def test_lost_redis_is_unavailable_and_service_resumes(tmp_path: Path) -> None:
    with redis_servers.standalone(tmp_path) as deployment:
        client = await client_of(deployment)
        store = RedisStore(client)
        digest = SHA256.digest_of(b"kept")
        await put_blob(store, digest, b"kept")
        deployment.nodes[0].kill()
        with pytest.raises(Unavailable, match="Redis unreachable"):
            await store.find_missing([digest])
        with pytest.raises(Unavailable):
            await put_blob(store, digest, b"kept")
        deployment.restart(deployment.nodes[0])
        await asyncio.sleep(0.2)
        assert await store.find_missing([digest]) == [digest], "a restarted Redis without its data"
        await put_blob(store, digest, b"kept")
        assert await store.find_missing([digest]) == []
        await client.aclose()


async def test_unreachable_redis_at_connect_is_one_clear_error() -> None:
    (port,) = redis_servers.free_ports(1)
    with pytest.raises(RedisConfigError, match=f"cannot reach Redis at redis://127.0.0.1:{port}"):
        await connect(RedisTarget((f"redis://127.0.0.1:{port}",)))


@pytest.mark.parametrize("url", ["http://x:1", "redis://", "redis://host:port", "localhost:6379"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(RedisConfigError, match="--redis"):
        RedisTarget((url,))


def test_passwords_are_not_shown() -> None:
    assert redacted("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert "s3cret" not in str(RedisTarget(("rediss://user:s3cret@host:6380",)))


async def test_password_in_the_url(tmp_path: Path) -> None:
    with redis_servers.standalone(tmp_path, ("--requirepass", "s3cret")) as deployment:
        port = deployment.nodes[0].port
        with pytest.raises(RedisConfigError, match="cannot reach Redis"):
            await connect(RedisTarget((f"redis://127.0.0.1:{port}",)))
        client = await connect(RedisTarget((f"redis://:s3cret@127.0.0.1:{port}",)))
        store = RedisStore(client)
        await put_blob(store, SHA256.digest_of(b"x"), b"x")
        await client.aclose()


async def test_rediss_with_a_private_ca(tmp_path: Path) -> None:
    """A Redis that only speaks TLS: rediss://...?ssl_ca_certs=CA works, and
    without the CA the certificate is refused (one clear error)."""
    pki = make_pki(tmp_path, "")
    (port,) = redis_servers.free_ports(1)
    argv = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    argv += ["--tls-cert-file", str(pki.files["server.pem"])]
    argv += ["--tls-key-file", str(pki.files["server.key"])]
    argv += ["--tls-ca-cert-file", str(pki.files["ca.pem"]), "--tls-auth-clients", "no"]
    argv += ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"rediss://localhost:{port}?ssl_ca_certs={pki.files['ca.pem']}"
    try:
        client = None
        for _ in range(100):
            try:
                client = await connect(RedisTarget((url,)))
                break
            except RedisConfigError:
                await asyncio.sleep(0.1)
        assert client is not None, "no TLS Redis"
        store = RedisStore(client)
        await put_blob(store, SHA256.digest_of(b"secret"), b"secret")
        assert await get_blob(store, SHA256.digest_of(b"secret")) == b"secret"
        await client.aclose()
        with pytest.raises(RedisConfigError, match="certificate verify failed"):
            await connect(RedisTarget((f"rediss://localhost:{port}",)))
    finally:
        process.terminate()
        process.wait()


async def test_a_blob_recorded_only_if_its_bytes_are_there(
    store: RedisStore, redis_flushed: RedisDeployment
) -> None:
    """Small blobs are stored as bytes, then recorded (cas/redis_store.py
    _RECORD): a blob whose bytes a gc deleted in between is answered back, not
    recorded (a member always has its bytes); a second record counts no size."""
    digest = SHA256.digest_of(b"raced")
    name = member(digest)
    routing = [atime_key(digest.hash[:2])] if redis_flushed.cluster else []
    client = store._client
    lost = await client.eval(_RECORD, len(routing), *routing, "1.0", name)
    assert lost == name.encode(), "no bytes: not recorded"
    assert await store.find_missing([digest]) == [digest]
    await client.set(blob_key(digest), b"raced")
    for _ in range(2):
        assert await client.eval(_RECORD, len(routing), *routing, "2.0", name) == b""
    assert await store.find_missing([digest]) == []
    assert await store.total_size() == len(b"raced")
