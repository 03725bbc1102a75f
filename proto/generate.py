"""Generate the Python stubs for the wire contract (the one way they are made).

Run ``python proto/generate.py`` after editing ``telemetry.proto``; the stubs are
committed beside it, and ``tests/test_wire.py`` fails when they drift from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO = "thermoscope/v1/telemetry.proto"


def generate(out_dir: Path = PROTO_ROOT) -> None:
    """Write telemetry_pb2.py, telemetry_pb2.pyi and telemetry_pb2_grpc.py under out_dir."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO_ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
