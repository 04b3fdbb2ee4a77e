"""Write the FileDescriptorSet of some .proto files and all they import, taken from xds-protos.

Run only by hatch_build.py, in a child interpreter of the isolated build environment
(`python -P`, cwd in a temporary directory): it imports xds-protos, whose top-level `xds` package
must not meet this project's `xds`, and leaves the build process's own modules untouched.

    python -P collect_descriptors.py OUTPUT ROOT.proto...

Files come out in dependency order (every file after the files it imports).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor


def module_name(proto: str) -> str:
    """The module protoc generates for a .proto file: a/b/c-d.proto -> a.b.c_d_pb2."""
    return proto.removesuffix(".proto").replace("-", "_").replace("/", ".") + "_pb2"


def closure(roots: list[str]) -> list[FileDescriptor]:
    """The roots and their transitive imports, each file after its dependencies."""
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(fd: FileDescriptor) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            visit(dep)
        ordered.append(fd)

    for root in roots:
        fd = importlib.import_module(module_name(root)).DESCRIPTOR
        if fd.name != root:
            raise SystemExit(f"{module_name(root)} describes {fd.name}, not {root}")
        visit(fd)
    return ordered


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        raise SystemExit(__doc__)
    output, roots = Path(argv[1]), argv[2:]
    # xds-protos's packages first, ahead of anything else named `xds` (or `envoy`, ...).
    sys.path.insert(0, str(importlib.metadata.distribution("xds-protos").locate_file("")))
    descriptor_set = descriptor_pb2.FileDescriptorSet()
    for fd in closure(roots):
        descriptor_set.file.add().ParseFromString(fd.serialized_pb)
    output.write_bytes(descriptor_set.SerializeToString())


if __name__ == "__main__":
    main(sys.argv)
