"""An archive written by libgetar itself (PyPI gtar 1.1.7, keras_gtar's layout),
and what the view must show for it, computed with numpy, in OUT.json.

Usage (the oracle venv's python): libgetar_archive.py ARCHIVE.zip OUT.json
"""
import json
import sys

import gtar
import numpy as np

P = [0, 7, 16, 31, 50, 69, 84, 93, 100]
path, out = sys.argv[1:3]
rng = np.random.default_rng(3)
w = rng.standard_normal((6, 5)).astype(np.float32)
frames, l2, pct, ratio, hist = [], [], [], [], []
prev = None
with gtar.GTAR(path, "w") as t:
    t.writePath("keras/layer/0/weight/0/shape.u32.uni", np.array(w.shape, dtype=np.uint32))
    for f in range(5):
        w = (w * 0.9 + 0.1 * rng.standard_normal(w.shape)).astype(np.float32)
        t.writePath(f"keras/layer/0/weight/0/frames/{f}/weight.f32.uni", w)
        a = w.astype(np.float64).reshape(-1)
        frames.append(str(f))
        l2.append(float(np.linalg.norm(a)))
        pct.append([float(v) for v in np.percentile(a, P, method="linear")])
        hist.append([int(c) for c in np.histogram(a, bins=64)[0]])
        ratio.append(None if prev is None else float(np.linalg.norm(a - prev) / np.linalg.norm(a)))
        prev = a
json.dump({"id": "keras/layer/0/weight/0/weight", "frames": frames, "l2": l2,
           "percentiles": pct, "update_ratio": ratio, "hist": hist}, open(out, "w"))
