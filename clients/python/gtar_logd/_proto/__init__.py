"""Generated gRPC stubs for gtar.logd.v1 (see tools/gen_proto.py). Do not edit."""
