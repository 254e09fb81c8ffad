"""RemoteStore (cas/remote.py) without a server: what it must not ask one."""

from __future__ import annotations

import grpc

from cas.remote import RemoteStore
from reapi.core.digests import DigestFunction


async def test_the_empty_blob_is_never_asked_for_sent_or_fetched() -> None:
    """The empty blob is always present (REAPI): no call is made for it, so
    these succeed with nothing listening on the other end."""
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        store = RemoteStore(channel)
        for function in DigestFunction:
            empty = function.empty()
            assert await store.find_missing([empty]) == []
            assert await store.get_many([empty]) == {empty: b""}
            assert await store.put_many([(empty, b"")]) == [None]
