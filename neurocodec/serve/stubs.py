"""Generate the Python gRPC stubs of `neurocodec/serve/v1/codec.proto` (package data; the repository's
`proto/neurocodec/v1/codec.proto` links to it) into `neurocodec/serve/v1/`.

The stubs are committed (so installing neurocodec needs no protoc step) and `tests/test_serve_stubs.py`
checks that they equal freshly generated ones. After editing the .proto, regenerate with

    python -m neurocodec.serve.stubs

The .proto is mapped to the virtual path `neurocodec/serve/v1/codec.proto`, so the generated
`codec_pb2_grpc.py` imports `neurocodec.serve.v1.codec_pb2` (a real module path) with no post-editing.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = Path(__file__).resolve().parent / "v1"  # the .proto ships in the package, beside its stubs
VIRTUAL = "neurocodec/serve/v1"


def generate(out_dir: str | Path) -> list[Path]:
    """Write codec_pb2.py and codec_pb2_grpc.py under out_dir/neurocodec/serve/v1/; returns their paths."""
    from grpc_tools import protoc

    out_dir = Path(out_dir)
    (out_dir / VIRTUAL).mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{VIRTUAL}={PROTO_DIR}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
            f"{VIRTUAL}/codec.proto"]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_DIR / 'codec.proto'}")
    return [out_dir / VIRTUAL / "codec_pb2.py", out_dir / VIRTUAL / "codec_pb2_grpc.py"]


if __name__ == "__main__":
    written = generate(REPO)
    print("\n".join(str(p) for p in written))
    sys.exit(0)
