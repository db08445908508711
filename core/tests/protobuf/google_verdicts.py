#!/usr/bin/env python3
"""Records the verdict of Google's protobuf runtime for each input of core/tests/protobuf.rs.

    python3 -m venv /tmp/pb && /tmp/pb/bin/pip install protobuf==7.36.2
    IPEVENT_PROTOBUF_INPUTS=/tmp/inputs.txt \
        cargo test -p ipevent-core --test protobuf -- --ignored write_inputs_for_google
    /tmp/pb/bin/python core/tests/protobuf/google_verdicts.py < /tmp/inputs.txt \
        > core/tests/protobuf/google_verdicts.txt

Reads one datagram in hex per line and writes `<hex> <verdict>`, the verdict being
`ok <app_sha256 bytes in hex> <ip>`, `missing` (parsed, a required field absent) or `error`
(not a protobuf message). The message is the proto2 IpEvent of testdata/ipevent.json, built
from a descriptor, so no protoc is needed.
"""

import sys

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import api_implementation

PINNED = "7.36.2"


def message_class():
    proto = descriptor_pb2.FileDescriptorProto(
        name="ipevent.proto",
        package="lookout.backend_coding_questions.q1",
        syntax="proto2",
    )
    message = proto.message_type.add(name="IpEvent")
    field = descriptor_pb2.FieldDescriptorProto
    message.field.add(
        name="app_sha256", number=1, label=field.LABEL_REQUIRED, type=field.TYPE_STRING
    )
    message.field.add(name="ip", number=2, label=field.LABEL_REQUIRED, type=field.TYPE_INT64)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("lookout.backend_coding_questions.q1.IpEvent")
    )


def verdict(cls, data):
    msg = cls()
    try:
        msg.ParseFromString(data)
    except Exception:  # DecodeError, or a runtime's own error type
        return "error"
    # Python's ParseFromString does not check required fields; IsInitialized does.
    if not msg.IsInitialized():
        return "missing"
    # A proto2 string is not checked for UTF-8: Python hands back bytes that are not UTF-8.
    sha = msg.app_sha256
    if isinstance(sha, str):
        sha = sha.encode("utf-8")
    return f"ok {sha.hex()} {msg.ip}"


def main():
    import google.protobuf

    if google.protobuf.__version__ != PINNED:
        sys.exit(f"google_verdicts.py: wants protobuf=={PINNED}, found {google.protobuf.__version__}")
    cls = message_class()
    print(
        f"# protobuf {google.protobuf.__version__} ({api_implementation.Type()}), "
        "written by core/tests/protobuf/google_verdicts.py"
    )
    for line in sys.stdin:
        line = line.strip()
        if line:
            print(line, verdict(cls, bytes.fromhex(line)))


if __name__ == "__main__":
    main()
