"""Connecting to Redis (standalone or Cluster), and what its failures mean to a caller.

Every backend kept in Redis (the CAS, the action cache, the scheduler's state)
goes through `connect` and `redis_errors`: one place decides whether the
addresses name a Cluster, and one place turns Redis's exceptions into the
statuses clients are promised (UNAVAILABLE while Redis is unreachable,
RESOURCE_EXHAUSTED when it is full).
"""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis.asyncio
import redis.exceptions
from redis.asyncio.cluster import ClusterNode

from reapi.core.errors import Internal, ResourceExhausted, Unavailable

# Seconds a command may take before it counts as Redis being unreachable.
COMMAND_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0

Client = redis.asyncio.Redis | redis.asyncio.RedisCluster
Arg = str | bytes | int | float


class RedisConfigError(Exception):
    """The addresses are not usable (bad URL, nothing answers): one line for the user."""


@dataclass(frozen=True)
class RedisTarget:
    """Where the shared state lives: one or more URLs of one Redis deployment
    (any node of a Cluster is enough; more are tried in turn at start)."""

    urls: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.urls:
            raise RedisConfigError("--redis: at least one redis:// or rediss:// URL")
        for url in self.urls:
            parsed = urllib.parse.urlsplit(url)
            if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
                raise RedisConfigError(
                    f"--redis {redacted(url)!r}: expected redis://[:PASSWORD@]HOST:PORT "
                    "or rediss://..."
                )
            try:
                parsed.port  # noqa: B018 (raises on a bad port)
            except ValueError:
                raise RedisConfigError(f"--redis {redacted(url)!r}: bad port") from None

    def __str__(self) -> str:
        return " ".join(redacted(url) for url in self.urls)


def redacted(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    host = parsed.hostname or ""
    netloc = f"{parsed.username or ''}:***@{host}" + (f":{parsed.port}" if parsed.port else "")
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def _options() -> dict[str, object]:
    return {
        "socket_timeout": COMMAND_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        "health_check_interval": 30,
    }


async def connect(target: RedisTarget) -> Client:
    """A client for `target`: a cluster client when the first node that answers
    has cluster mode on, else a plain one. RedisConfigError when none answers."""
    failures = []
    for url in target.urls:
        probe = redis.asyncio.Redis.from_url(url, **_options())  # type: ignore[arg-type]
        try:
            info = await probe.info("cluster")
        except (redis.exceptions.RedisError, OSError) as error:
            failures.append(f"{redacted(url)}: {error}")
            continue
        finally:
            await probe.aclose()
        if not info.get("cluster_enabled"):
            return redis.asyncio.Redis.from_url(url, **_options())  # type: ignore[arg-type]
        nodes = [_node(u) for u in target.urls]
        cluster = redis.asyncio.RedisCluster.from_url(url, startup_nodes=nodes, **_options())
        try:
            await cluster.initialize()
        except (redis.exceptions.RedisError, OSError) as error:
            await cluster.aclose()
            raise RedisConfigError(f"Redis Cluster at {target}: {error}") from None
        return cluster
    raise RedisConfigError(f"cannot reach Redis at {target}: {'; '.join(failures)}")


async def check_no_eviction(client: Client, target: RedisTarget) -> str | None:
    """RedisConfigError if Redis may evict keys by itself (a blob inside its grace
    period could vanish); a warning to log when it does not let us look."""
    try:
        if isinstance(client, redis.asyncio.RedisCluster):
            nodes = client.get_primaries()
            answers = [await client.config_get("maxmemory-policy", target_nodes=n) for n in nodes]
        else:
            answers = [await client.config_get("maxmemory-policy")]
    except redis.exceptions.ResponseError as error:
        return f"cannot check Redis's maxmemory-policy ({error}); it must be noeviction"
    except (redis.exceptions.RedisError, OSError) as error:
        raise RedisConfigError(f"Redis at {target}: {error}") from None
    for answer in answers:
        found = {_text(name): _text(value) for name, value in dict(answer).items()}
        policy = found.get("maxmemory-policy", "")
        if policy != "noeviction":
            raise RedisConfigError(
                f"Redis at {target} evicts keys by itself (maxmemory-policy {policy}): "
                "set maxmemory-policy noeviction, or blobs could vanish inside their grace "
                "period; reapi's gc evicts instead"
            )
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _node(url: str) -> ClusterNode:
    parsed = urllib.parse.urlsplit(url)
    return ClusterNode(parsed.hostname or "localhost", parsed.port or 6379)


def is_cluster(client: Client) -> bool:
    return isinstance(client, redis.asyncio.RedisCluster)


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Turn a Redis failure while doing `what` into the status it means."""
    try:
        yield
    except (redis.exceptions.ClusterDownError, redis.exceptions.TryAgainError) as error:
        raise Unavailable(f"Redis is failing over: {what}: {error}") from None
    except redis.exceptions.ResponseError as error:
        if "maxmemory" in str(error):  # "OOM command not allowed when used memory > ..."
            raise ResourceExhausted(
                f"Redis is full (its maxmemory is reached): {what} refused until "
                "`reapi cas gc` makes room"
            ) from None
        raise Internal(f"Redis refused {what}: {error}") from None
    except (redis.exceptions.RedisError, OSError) as error:
        raise Unavailable(f"Redis unreachable: {what}: {error or type(error).__name__}") from None


async def run_script(
    client: Client, source: str, calls: Sequence[tuple[Sequence[str], Sequence[Arg]]]
) -> list[object]:
    """Run the Lua script `source` once per (keys, args) in `calls`, pipelined
    (on a Cluster each call's keys must share a slot); the results in order."""
    if len(calls) == 1:
        keys, args = calls[0]
        return [await client.eval(source, len(keys), *keys, *args)]
    pipe = client.pipeline(transaction=False)
    for keys, args in calls:
        pipe.eval(source, len(keys), *keys, *args)
    return list(await pipe.execute())
