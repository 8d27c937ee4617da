"""Compile proto/caffe.proto into the runtime-independent bindings module proto/caffe_pb2.py."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from google.protobuf import descriptor_pb2

PROTO_DIR = Path(__file__).resolve().parent
PROTO_PATH = PROTO_DIR / "caffe.proto"
MODULE_PATH = PROTO_DIR / "caffe_pb2.py"
BYTES_PER_LINE = 64

# Only the descriptor is embedded (no protoc gencode): gencode from a new protoc
# calls ValidateProtobufRuntimeVersion and refuses older runtimes, while building
# classes from a descriptor works on every runtime from 4.21 on.
MODULE_TEMPLATE = '''\
"""Caffe protobuf message classes; generated from caffe.proto by `python -m proto.generate`, do not edit."""
# ruff: noqa
# flake8: noqa
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf import message_factory as _message_factory
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

_SERIALIZED_FILE_DESCRIPTOR = (
{literal}
)

# A private pool keeps us clear of other packages (onnx, caffe2) that register
# their own "caffe.proto" in the default pool.
_POOL = _descriptor_pool.DescriptorPool()
_POOL.AddSerializedFile(_SERIALIZED_FILE_DESCRIPTOR)
DESCRIPTOR = _POOL.FindFileByName({file_name!r})


def _message_class(name):
    descriptor = DESCRIPTOR.message_types_by_name[name]
    if hasattr(_message_factory, "GetMessageClass"):
        message_class = _message_factory.GetMessageClass(descriptor)
    else:  # protobuf < 4.22 has no GetMessageClass.
        message_class = _message_factory.MessageFactory(_POOL).GetPrototype(descriptor)
    # Factory-made classes have no module; name ours so pickle can find them.
    message_class.__module__ = __name__
    return message_class


{enums}
{messages}
'''


def compile_descriptor(proto_path: Path = PROTO_PATH) -> bytes:
    """Run protoc on the schema and return a canonical serialized FileDescriptorProto."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "caffe.pb"
        status = protoc.main(
            ["protoc", f"-I{proto_path.parent}", f"--descriptor_set_out={out}", str(proto_path)]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {proto_path} (exit status {status})")
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (file_proto,) = descriptor_set.file
    _strip_version_dependent_fields(file_proto)
    return file_proto.SerializeToString(deterministic=True)


def _strip_version_dependent_fields(file_proto: descriptor_pb2.FileDescriptorProto) -> None:
    # protoc versions differ in whether they fill json_name; the runtime derives
    # the same default itself, so dropping it keeps --check stable across versions.
    file_proto.ClearField("source_code_info")
    pending = list(file_proto.message_type)
    while pending:
        message = pending.pop()
        for field in message.field:
            field.ClearField("json_name")
        pending.extend(message.nested_type)


def render_module(serialized: bytes) -> str:
    """Return the source of caffe_pb2.py embedding the given serialized descriptor."""
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(serialized)
    chunks = [serialized[i : i + BYTES_PER_LINE] for i in range(0, len(serialized), BYTES_PER_LINE)]
    literal = "\n".join(f"    {chunk!r}" for chunk in chunks)

    enum_lines = []
    for enum in file_proto.enum_type:
        wrapper = f"_enum_type_wrapper.EnumTypeWrapper(DESCRIPTOR.enum_types_by_name[{enum.name!r}])"
        enum_lines.append(f"{enum.name} = {wrapper}")
        enum_lines.extend(f"{value.name} = {value.number}" for value in enum.value)
    message_lines = [f"{message.name} = _message_class({message.name!r})" for message in file_proto.message_type]

    return MODULE_TEMPLATE.format(
        literal=literal,
        file_name=file_proto.name,
        enums="\n".join(enum_lines) + "\n",
        messages="\n".join(message_lines),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if caffe_pb2.py is stale instead of writing it")
    args = parser.parse_args(argv)

    source = render_module(compile_descriptor())
    current = MODULE_PATH.read_text() if MODULE_PATH.exists() else None
    if args.check:
        if current != source:
            print(f"{MODULE_PATH} is out of date with {PROTO_PATH}; run: python -m proto.generate", file=sys.stderr)
            return 1
        return 0
    if current != source:
        MODULE_PATH.write_text(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
