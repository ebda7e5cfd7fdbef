"""Regenerate the committed gRPC stubs in gtar_logd/_proto from proto/.

    python tools/gen_proto.py           # rewrite the committed files
    python tools/gen_proto.py --check   # exit 1 if they differ (drift)

Needs grpcio-tools (the version pinned in pyproject.toml's `dev` extra).
The generated grpc module imports `gtar.logd.v1.logd_pb2`; we rewrite that
one line to a relative import so the stubs live inside the package.
"""
import argparse
import os
import pathlib
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
PKG = HERE.parent / "gtar_logd" / "_proto"
PROTO_ROOT = HERE.parent.parent.parent / "proto"
PROTO = "gtar/logd/v1/logd.proto"
ABS_IMPORT = "from gtar.logd.v1 import logd_pb2 as"
REL_IMPORT = "from . import logd_pb2 as"


def generate() -> dict:
    """Return {file name: text} of freshly generated stubs."""
    from grpc_tools import protoc
    import grpc_tools

    with tempfile.TemporaryDirectory() as out:
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        rc = protoc.main([
            "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}",
            f"--python_out={out}", f"--grpc_python_out={out}", PROTO,
        ])
        if rc != 0:
            raise RuntimeError(f"protoc failed with {rc}")
        gen = pathlib.Path(out) / "gtar" / "logd" / "v1"
        files = {}
        for name in ("logd_pb2.py", "logd_pb2_grpc.py"):
            text = (gen / name).read_text()
            if name.endswith("_grpc.py"):
                assert ABS_IMPORT in text, "unexpected import line in generated grpc stub"
                text = text.replace(ABS_IMPORT, REL_IMPORT)
            files[name] = text
        return files


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    files = generate()
    drift = []
    for name, text in files.items():
        path = PKG / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                drift.append(name)
        else:
            path.write_text(text)
    if drift:
        print(f"generated stubs drifted from {PROTO}: {', '.join(drift)}; "
              f"run `python clients/python/tools/gen_proto.py`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
