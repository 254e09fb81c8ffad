from reapi.protos import remote_execution_pb2 as _remote_execution_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetProvidedRequest(_message.Message):
    __slots__ = ("instance_name",)
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    instance_name: str
    def __init__(self, instance_name: _Optional[str] = ...) -> None: ...

class Provided(_message.Message):
    __slots__ = ("directories",)
    DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    directories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, directories: _Optional[_Iterable[str]] = ...) -> None: ...

class WorkerMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "finished")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    finished: Finished
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("name", "properties", "slots", "provided_directories")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROPERTIES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    PROVIDED_DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    properties: _containers.RepeatedCompositeFieldContainer[_remote_execution_pb2.Platform.Property]
    slots: int
    provided_directories: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., properties: _Optional[_Iterable[_Union[_remote_execution_pb2.Platform.Property, _Mapping]]] = ..., slots: _Optional[int] = ..., provided_directories: _Optional[_Iterable[str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Finished(_message.Message):
    __slots__ = ("lease_id", "response", "output_blobs")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BLOBS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    response: _remote_execution_pb2.ExecuteResponse
    output_blobs: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, lease_id: _Optional[str] = ..., response: _Optional[_Union[_remote_execution_pb2.ExecuteResponse, _Mapping]] = ..., output_blobs: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("assign", "cancel")
    ASSIGN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    assign: Assign
    cancel: Cancel
    def __init__(self, assign: _Optional[_Union[Assign, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ...) -> None: ...

class Assign(_message.Message):
    __slots__ = ("lease_id", "action_digest", "digest_function", "action", "command", "instance_name", "input_directories", "output_blob_bytes", "input_files")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIGEST_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FUNCTION_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BLOB_BYTES_FIELD_NUMBER: _ClassVar[int]
    INPUT_FILES_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    action_digest: _remote_execution_pb2.Digest
    digest_function: _remote_execution_pb2.DigestFunction.Value
    action: _remote_execution_pb2.Action
    command: _remote_execution_pb2.Command
    instance_name: str
    input_directories: _containers.RepeatedScalarFieldContainer[bytes]
    output_blob_bytes: int
    input_files: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, lease_id: _Optional[str] = ..., action_digest: _Optional[_Union[_remote_execution_pb2.Digest, _Mapping]] = ..., digest_function: _Optional[_Union[_remote_execution_pb2.DigestFunction.Value, str]] = ..., action: _Optional[_Union[_remote_execution_pb2.Action, _Mapping]] = ..., command: _Optional[_Union[_remote_execution_pb2.Command, _Mapping]] = ..., instance_name: _Optional[str] = ..., input_directories: _Optional[_Iterable[bytes]] = ..., output_blob_bytes: _Optional[int] = ..., input_files: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...
