"""A real Keras run (jax backend, tiny model, 3 epochs) logged by GTARLogger to
the daemon at ADDRESS, then what the view must show, computed with numpy from
GetFrame's arrays, written to OUT.json.

Usage: keras_run.py ADDRESS ARCHIVE OUT.json

Percentiles: numpy's default method, 'linear', of the finite values as float64
(np.percentile(a[np.isfinite(a)].astype(np.float64), P)), the view's definition.
"""
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from gtar_logd import Client, Trajectory  # noqa: E402
from gtar_logd.keras import GTARLogger  # noqa: E402

P = [0, 7, 16, 31, 50, 69, 84, 93, 100]
address, archive, out = sys.argv[1:4]

keras.utils.set_random_seed(7)
model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(8, activation="relu"), keras.layers.Dense(1)])
model.compile(keras.optimizers.Adam(0.01), "mse")
rng = np.random.default_rng(0)
x = rng.random((256, 6))
y = (x @ rng.random((6, 1))) ** 2
# A frame every 4 batches (8 a epoch), the metrics per epoch: 3 loss points.
model.fit(x, y, epochs=3, batch_size=32, verbose=0,
          callbacks=[GTARLogger(archive, address=address, when="post_batch", period=4,
                                monitor="loss", mode="min")])

client = Client(address)
frames = client.list_frames(archive)
tensors = {}
prev = {}
for f in frames:
    _, ts = client.get_frame(archive, f)
    for info, arr in ts:
        if not info.path.endswith((".uni", ".ind")):  # text records are no tensors
            continue
        tid = f"{info.group}/{info.name}" if info.group else info.name
        a = np.asarray(arr).astype(np.float64).reshape(-1)
        fin = a[np.isfinite(a)]
        e = tensors.setdefault(tid, {"frames": [], "l2": [], "update_ratio": [], "percentiles": []})
        l2 = float(np.linalg.norm(fin))
        e["frames"].append(f)
        e["l2"].append(l2)
        e["percentiles"].append([float(v) for v in np.percentile(fin, P, method="linear")])
        e["update_ratio"].append(float(np.linalg.norm(a - prev[tid]) / l2) if tid in prev else None)
        prev[tid] = a

with Trajectory(archive, address=address) as t:
    steps, loss = t.metrics("epoch")["loss"]
json.dump({"frames": frames, "tensors": tensors,
           "loss": {"steps": list(steps), "values": [float(v) for v in loss]}},
          open(out, "w"), indent=1)
print(f"{len(frames)} frames, {len(tensors)} tensors, loss {list(np.round(loss, 4))}")
