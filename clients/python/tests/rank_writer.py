"""One rank of a job writing sharded frames (run as a process by test_ranks.py).

    python rank_writer.py '{"address": ..., "archive": ..., "job": ..., "rank": 0,
                            "world": 8, "frames": [0, 1, 2], "stall_at": null}'

Rank r of W sends, for frame f: its column block of `kernel` (f32, 64 x 4W),
its row block of `proj` (f64, 8W x 16) and, rank 0 only, the replicated
`bias` (f32, 16); see `expected`. With `stall_at`, the frame of that index
stops after its first tensor (mid-frame), "STALLED <index>" is printed, and
the process waits to be killed. At the end it prints one JSON line:
{"durable": n, "aborted": [[index, reason, missing ranks], ...]}, or
{"error": "..."} when the writer failed.
"""
from __future__ import annotations

import json
import sys
import threading

import numpy as np


def expected(f: int, world: int) -> dict:
    """The global tensors of frame `f` for a job of `world` ranks."""
    base = f * 10_000
    return {
        "kernel": (np.arange(64 * 4 * world, dtype=np.float32) + base).reshape(64, 4 * world),
        "proj": (np.arange(8 * world * 16, dtype=np.float64) - base).reshape(8 * world, 16),
        "bias": np.arange(16, dtype=np.float32) * 0.5 + base,
    }


def shards(f: int, rank: int, world: int):
    """(group, name, Shard or array) of rank `rank`'s part of frame `f`."""
    from gtar_logd import Shard
    g = expected(f, world)
    k, p = g["kernel"], g["proj"]
    out = [
        ("kernel", "weight", Shard(k[:, 4 * rank:4 * rank + 4], (0, 4 * rank), k.shape)),
        ("proj", "weight", Shard(p[8 * rank:8 * rank + 8], (8 * rank, 0), p.shape)),
    ]
    if rank == 0:
        out.append(("bias", "weight", g["bias"]))
    return out


def main(cfg: dict) -> None:
    from gtar_logd import Client, GtarLogdError
    from gtar_logd._writer import Writer

    stall_at = cfg.get("stall_at")

    class Stalling(Writer):
        """Stops the frame `stall_at` after its first tensor and waits."""

        def _messages(self, u, parts=None, use_shm=False):
            it = super()._messages(u, parts, use_shm)
            if stall_at is None or u.index != str(stall_at):
                yield from it
                return
            for m in it:
                yield m
                if hasattr(m, "WhichOneof") and m.WhichOneof("msg") == "tensor":
                    continue
                if hasattr(m, "WhichOneof") and m.WhichOneof("msg") == "begin":
                    continue
                break  # the first tensor's bytes are out
            print(f"STALLED {u.index}", flush=True)
            threading.Event().wait()  # until kill -9

    rank, world = cfg["rank"], cfg["world"]
    with Client(cfg["address"]) as c:
        w = Stalling(c, cfg["archive"], job=cfg["job"], rank=rank, world_size=world,
                     chunk_bytes=cfg.get("chunk_bytes", 1 << 20))
        try:
            for f in cfg["frames"]:
                if f == stall_at:
                    # The frames before are stored first: the process dies
                    # in this frame, not in one gRPC has not sent yet.
                    w.flush(timeout=120)
                w.write_frame(str(f), shards(f, rank, world))
            w.flush(timeout=120)
            out = {"durable": w.durable_count, "aborted": w.aborted}
        except GtarLogdError as e:
            out = {"error": str(e), "aborted": w.aborted}
        finally:
            w.abort() if "error" in locals().get("out", {}) else w.close()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
