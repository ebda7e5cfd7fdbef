"""Run as another user by test_multi_user.py: one action, a JSON answer on stdout.

Usage: python multi_user_agent.py ADDRESS ACTION JSON-ARGS
"""
import json
import sys

import grpc
import numpy as np

from gtar_logd import Client
from gtar_logd._proto import logd_pb2 as pb


def code_of(fn):
    try:
        fn()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
    except Exception as e:  # the client's own errors carry the code name
        msg = str(e)
        for code in ("PERMISSION_DENIED", "NOT_FOUND", "UNAUTHENTICATED", "INVALID_ARGUMENT"):
            if code in msg:
                return code
        return f"{type(e).__name__}: {msg}"


def main():
    address, action, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    c = Client(address)
    out = {}
    if action == "write":
        n = args.get("n", 1 << 16)
        with c.writer(args["archive"], mode=args.get("mode", "append")) as w:
            for f in args["frames"]:
                w.write_tensors(str(f), {"w": np.full(n, args["value"], np.float32)})
            w.flush(120, replicated=args.get("replicated", False))
            out = {"shm_bytes": w.shm_bytes, "shm_refused": w.shm_refused}
    elif action == "read":
        out = {"archives": [a["archive"] for a in c.list_archives(args.get("prefix", ""))],
               "frames": c.list_frames(args["archive"])}
        if args.get("last", True):  # (archives the Python client wrote)
            out["last"] = float(c.read_frame(args["archive"])["w"][0])
    elif action == "attack":
        a = args["archive"]
        st = c.stub
        out = {
            "list": code_of(lambda: st.ListArchives(pb.ListArchivesRequest(prefix=args["prefix"]))),
            "describe": code_of(lambda: st.DescribeArchive(pb.DescribeArchiveRequest(archive=a))),
            "frames": code_of(lambda: st.ListFrames(pb.ListFramesRequest(archive=a))),
            "get": code_of(lambda: list(st.GetFrame(pb.GetFrameRequest(archive=a)))),
            "record": code_of(lambda: st.ReadRecord(pb.ReadRecordRequest(archive=a, path="w"))),
            "history": code_of(lambda: list(st.TensorHistory(
                pb.TensorHistoryRequest(archive=a, group="w", name="value")))),
            "append": code_of(lambda: c.write_frame(a, 99, {"w": np.zeros(4, np.float32)},
                                                    mode="append", timeout=30)),
            "create": code_of(lambda: c.write_frame(a, 99, {"w": np.zeros(4, np.float32)},
                                                    mode="create", timeout=30)),
        }
    elif action == "code":
        out = {"list": code_of(lambda: c.stub.ListArchives(pb.ListArchivesRequest(prefix="")))}
    c.close()
    print(json.dumps(out))


main()
