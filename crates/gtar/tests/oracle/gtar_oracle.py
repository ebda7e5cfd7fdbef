#!/usr/bin/env python3
"""libgetar as a test oracle for gtar-logd's Rust format library.

Run with the oracle interpreter ($GTAR_ORACLE_PYTHON: a venv with
"numpy<2" and gtar==1.1.7). Every subcommand prints tab-separated lines on
stdout (first field says what the line is; byte strings as hex, so the Rust
tests need no JSON parser) and exits non-zero with a message on stderr if
libgetar fails.

  dump ARCHIVE [--hex] [--group G]
      What libgetar sees: getRecordTypes() in its order, one line
        type GROUP NAME BEHAVIOR FORMAT RESOLUTION NFRAMES
      (libgetar's enum integers), then queryFrames() in its order, a line
        record FRAME LEN CRC32 SHA256 HEX
      per frame with the bytes of getRecord() (arrays: ndarray.tobytes();
      text: UTF-8); HEX is "-" unless --hex.
  append ARCHIVE --frame F [--group G]
      Open with GTAR(path, 'a') and write one known frame (see appended());
      prints "written PATH HEX" per record.
  keras-layout ARCHIVE --frames 0,1,2 [--group G]
      Write a new archive with libgetar exactly the way keras_gtar 1.1.0's
      Trajectory.save does (model.json via writeStr; per frame and weight
      writePath(.../frames/{frame}/weight.f32.uni) and
      writePath(.../shape.u32.uni), the shape path rewritten every frame).
      keras_gtar also pickles the layer classes; we never pickle, so that
      record is not written. Prints "model_json HEX", then "weight PATH HEX"
      per weight written and "shape PATH HEX" per shape record (final value).
  bench-read ARCHIVE --index F
      Time GTAR(path, 'r') plus getRecord of every discrete record at frame
      F, inside Python (interpreter start-up excluded): "KEY VALUE" lines.
"""

import argparse
import hashlib
import json
import sys
import time
import zlib

import numpy as np
import gtar


def emit(*fields):
    sys.stdout.write("\t".join(str(f) for f in fields) + "\n")


def record_bytes(value):
    if value is None:
        return None
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bytes):
        return value
    return np.ascontiguousarray(value).tobytes()


def cmd_dump(args):
    with gtar.GTAR(args.archive, "r") as g:
        if args.group is not None:
            types = g.getRecordTypes(group=args.group)
        else:
            types = g.getRecordTypes()
        for rec in types:
            frames = list(g.queryFrames(rec))
            emit("type", rec.getGroup(), rec.getName(), int(rec.getBehavior()),
                 int(rec.getFormat()), int(rec.getResolution()), len(frames))
            for f in frames:
                data = record_bytes(g.getRecord(rec, f))
                if data is None:
                    raise SystemExit("getRecord returned None for %s at %r" % (rec.getPath(), f))
                emit("record", f, len(data), zlib.crc32(data) & 0xFFFFFFFF,
                     hashlib.sha256(data).hexdigest(), data.hex() if args.hex else "-")


def appended(group, frame):
    """The records `append` writes: deterministic from the frame index."""
    prefix = group + "/" if group else ""
    n = 17 + len(frame)
    return [
        (prefix + "frames/%s/appended.f64.uni" % frame,
         np.arange(n, dtype=np.float64) * 1.5 - 3.25, gtar.CompressMode.FastCompress),
        (prefix + "frames/%s/count.i64.ind" % frame,
         -np.arange(n, dtype=np.int64) * 1000003, gtar.CompressMode.NoCompress),
        (prefix + "frames/%s/note.txt" % frame, "appended by libgetar at frame %s" % frame,
         gtar.CompressMode.MediumCompress),
    ]


def cmd_append(args):
    with gtar.GTAR(args.archive, "a") as g:
        for path, value, mode in appended(args.group, args.frame):
            if isinstance(value, str):
                g.writeStr(path, value, mode)
            else:
                g.writePath(path, value, mode)
            emit("written", path, record_bytes(value).hex())


# Weights of a small model: per layer, the shapes of its weights (a layer
# without weights, such as Dropout, has none).
KERAS_LAYERS = [[(3, 5), (5,)], [], [(5, 2), (2,)], [(2,)]]

MODEL_JSON = json.dumps({
    "class_name": "Sequential",
    "config": {"name": "oracle", "layers": [
        {"class_name": "Dense", "config": {"units": 5}},
        {"class_name": "Dropout", "config": {"rate": 0.5}},
        {"class_name": "Dense", "config": {"units": 2}},
        {"class_name": "BatchNormalization", "config": {}},
    ]},
})


def keras_weight(i, j, shape, frame):
    n = int(np.prod(shape))
    base = 1000.0 * float(frame) + 100.0 * i + 10.0 * j
    return ((np.arange(n, dtype=np.float32) + np.float32(base)) / np.float32(7.0)).reshape(shape)


def cmd_keras_layout(args):
    prefix = args.group + "/" if args.group else ""
    frames = [f for f in args.frames.split(",") if f]
    emit("model_json", MODEL_JSON.encode("utf-8").hex())
    with gtar.GTAR(args.archive, "w") as g:
        # Trajectory.save(model): the model description (layer_classes.pkl
        # left out on purpose: never pickle).
        g.writeStr(prefix + "keras/model.json", MODEL_JSON)
        # Trajectory.save_weights(model, frame) for each frame.
        for frame in frames:
            for i, shapes in enumerate(KERAS_LAYERS):
                for j, shape in enumerate(shapes):
                    weight = keras_weight(i, j, shape, frame)
                    group = prefix + "keras/layer/{}/weight/{}".format(i, j)
                    path = "{}/frames/{}/weight.{}.uni".format(group, frame, "f32")
                    g.writePath(path, weight)
                    g.writePath("{}/shape.u32.uni".format(group), weight.shape)
                    emit("weight", path, weight.tobytes().hex())
        for i, shapes in enumerate(KERAS_LAYERS):
            for j, shape in enumerate(shapes):
                emit("shape", prefix + "keras/layer/{}/weight/{}/shape.u32.uni".format(i, j),
                     np.asarray(shape, dtype=np.uint32).tobytes().hex())


def cmd_bench_read(args):
    t0 = time.perf_counter()
    g = gtar.GTAR(args.archive, "r")
    t1 = time.perf_counter()
    total = 0
    count = 0
    for rec in g.getRecordTypes():
        if int(rec.getBehavior()) != 1:  # Discrete
            continue
        value = g.getRecord(rec, args.index)
        total += np.asarray(value).nbytes
        count += 1
    t2 = time.perf_counter()
    g.close()
    emit("open_s", "%.9f" % (t1 - t0))
    emit("read_s", "%.9f" % (t2 - t1))
    emit("total_s", "%.9f" % (t2 - t0))
    emit("records", count)
    emit("bytes", total)


def cmd_bench_history(args):
    """One record over all its frames, in-process: libgetar's loop."""
    g = gtar.GTAR(args.archive, "r")
    t0 = time.perf_counter()
    rec = next(r for r in g.getRecordTypes()
               if r.getGroup() == args.group and r.getName() == args.name)
    total = 0
    frames = g.queryFrames(rec)
    for f in frames:
        total += np.asarray(g.getRecord(rec, f)).nbytes
    t1 = time.perf_counter()
    g.close()
    emit("read_s", "%.9f" % (t1 - t0))
    emit("frames", len(frames))
    emit("bytes", total)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("archive")
    d.add_argument("--hex", action="store_true")
    d.add_argument("--group")
    a = sub.add_parser("append")
    a.add_argument("archive")
    a.add_argument("--frame", required=True)
    a.add_argument("--group", default="")
    k = sub.add_parser("keras-layout")
    k.add_argument("archive")
    k.add_argument("--frames", default="0,1,2")
    k.add_argument("--group", default="")
    b = sub.add_parser("bench-read")
    b.add_argument("archive")
    b.add_argument("--index", required=True)
    h = sub.add_parser("bench-history")
    h.add_argument("archive")
    h.add_argument("--group", required=True)
    h.add_argument("--name", required=True)
    args = p.parse_args()
    {"dump": cmd_dump, "append": cmd_append, "keras-layout": cmd_keras_layout,
     "bench-read": cmd_bench_read, "bench-history": cmd_bench_history}[args.cmd](args)


if __name__ == "__main__":
    main()
