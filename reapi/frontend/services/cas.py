"""ContentAddressableStorage: FindMissingBlobs, batch reads and writes, GetTree."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import zstandard
from google.rpc import code_pb2, status_pb2

from cas.store import BlobStore
from cas.tree import read_tree
from reapi.core.digests import Digest, DigestFunction
from reapi.core.errors import InvalidArgument, NotFound, ReapiError
from reapi.frontend.services.status import grpc_errors, status_of
from reapi.protos import remote_execution_pb2 as re_pb2
from reapi.protos import remote_execution_pb2_grpc as re_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_OK = status_of(None)
_NOT_FOUND = status_pb2.Status(code=code_pb2.NOT_FOUND, message="blob not found")

# GetTree pages hold at most this many directories, whatever the client asks.
MAX_TREE_PAGE = 1000


class CasService(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, store: BlobStore, max_batch_total_size: int) -> None:
        self._store = store
        self._max_batch = max_batch_total_size

    @grpc_errors
    async def FindMissingBlobs(
        self, request: re_pb2.FindMissingBlobsRequest, context: Context
    ) -> re_pb2.FindMissingBlobsResponse:
        function = DigestFunction.from_wire(request.digest_function)
        parse = Digest.parse
        digests = [parse(function, d.hash, d.size_bytes) for d in request.blob_digests]
        missing = await self._store.find_missing(digests)
        response = re_pb2.FindMissingBlobsResponse()
        add = response.missing_blob_digests.add
        for digest in missing:
            add(hash=digest.hash, size_bytes=digest.size)
        return response

    @grpc_errors
    async def BatchUpdateBlobs(
        self, request: re_pb2.BatchUpdateBlobsRequest, context: Context
    ) -> re_pb2.BatchUpdateBlobsResponse:
        function = DigestFunction.from_wire(request.digest_function)
        total = sum(len(blob.data) for blob in request.requests)
        self._check_batch_size(total, "upload")
        # Blobs that cannot even be decoded fail alone; the rest go to the store together.
        errors: list[ReapiError | None] = []
        decoded: list[tuple[Digest, bytes]] = []
        for blob in request.requests:
            try:
                digest = Digest.from_proto(function, blob.digest)
                decoded.append((digest, _decompressed(blob, digest)))
                errors.append(None)
            except ReapiError as failure:
                errors.append(failure)
        stored = iter(await self._store.put_many(decoded))
        response = re_pb2.BatchUpdateBlobsResponse()
        for blob, error in zip(request.requests, errors, strict=True):
            outcome = error if error is not None else next(stored)
            response.responses.add(digest=blob.digest, status=status_of(outcome))
        return response

    @grpc_errors
    async def BatchReadBlobs(
        self, request: re_pb2.BatchReadBlobsRequest, context: Context
    ) -> re_pb2.BatchReadBlobsResponse:
        function = DigestFunction.from_wire(request.digest_function)
        digests = [Digest.from_proto(function, d) for d in request.digests]
        self._check_batch_size(sum(d.size for d in digests), "read")
        found = await self._store.get_many(digests)
        response = re_pb2.BatchReadBlobsResponse()
        add = response.responses.add
        for proto, digest in zip(request.digests, digests, strict=True):
            data = found.get(digest)
            if data is None:
                add(digest=proto, status=_NOT_FOUND)
            else:
                add(digest=proto, data=data, status=_OK)
        return response

    @grpc_errors
    async def GetTree(
        self, request: re_pb2.GetTreeRequest, context: Context
    ) -> AsyncIterator[re_pb2.GetTreeResponse]:
        function = DigestFunction.from_wire(request.digest_function)
        root = Digest.from_proto(function, request.root_digest)
        page_size = request.page_size if 0 < request.page_size <= MAX_TREE_PAGE else MAX_TREE_PAGE
        skip = _page_offset(request.page_token)
        tree = await read_tree(self._store, root)
        if root in tree.missing:
            raise NotFound(f"tree root {root} not found")
        page: list[re_pb2.Directory] = []
        position = 0
        for directory in tree.directories.values():
            position += 1
            if position <= skip:
                continue
            if len(page) == page_size:
                yield re_pb2.GetTreeResponse(directories=page, next_page_token=str(position - 1))
                page = []
            page.append(directory)
        if position < skip:
            raise InvalidArgument(f"page_token {request.page_token!r} is past the end of the tree")
        yield re_pb2.GetTreeResponse(directories=page)

    def _check_batch_size(self, total: int, what: str) -> None:
        if self._max_batch and total > self._max_batch:
            raise InvalidArgument(
                f"batch {what} of {total} bytes exceeds max_batch_total_size_bytes "
                f"({self._max_batch}); split it or use ByteStream"
            )


def _page_offset(token: str) -> int:
    """Page tokens are the count of directories already sent, as text."""
    if not token:
        return 0
    if not token.isdigit():
        raise InvalidArgument(f"page_token {token!r} was not issued by this server")
    return int(token)


def _decompressed(blob: re_pb2.BatchUpdateBlobsRequest.Request, digest: Digest) -> bytes:
    if blob.compressor == re_pb2.Compressor.IDENTITY:
        return blob.data
    if blob.compressor != re_pb2.Compressor.ZSTD:
        raise InvalidArgument(
            f"blob {digest}: compressor {blob.compressor} is not supported; use IDENTITY or ZSTD"
        )
    try:
        declared = zstandard.frame_content_size(blob.data)
        if declared not in (-1, digest.size):
            raise InvalidArgument(
                f"blob {digest}: zstd frame declares {declared} bytes, digest says {digest.size}"
            )
        # max_output_size bounds memory for frames that do not state their size.
        return zstandard.ZstdDecompressor().decompress(
            blob.data, max_output_size=max(digest.size, 1)
        )
    except zstandard.ZstdError as error:
        raise InvalidArgument(f"blob {digest}: invalid zstd data: {error}") from None
