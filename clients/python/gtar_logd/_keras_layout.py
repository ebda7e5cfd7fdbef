"""keras_gtar's archive layout, plus our extra records. No Keras import here.

Per model (constant records, below the stream group):
  keras/model.json                         model.to_json()           (keras_gtar)
  gtar_logd/keras/weights.json             layer and weight names, dtypes, shapes
Per frame F (one atomic frame):
  keras/layer/{i}/weight/{j}/frames/F/weight.{fmt}.uni    tensor     (keras_gtar)
  keras/layer/{i}/weight/{j}/shape.u32.uni                 shape      (keras_gtar, rewritten)
  gtar_logd/optimizer/{k}/frames/F/value.{fmt}.uni         optimizer variable k (optional)
  gtar_logd/keras/optimizer.json                           optimizer variable names (with it)
  gtar_logd/keras/frames/F/progress.json                   where training was (GTARLogger)
Best frame so far (GTARLogger(monitor=...), a constant record rewritten when it improves):
  gtar_logd/keras/best.json                {"frame", "monitor", "mode", "value", "epoch"}
Metrics (continuous records, GETAR vars/):
  metrics/epoch/vars/{name}.f64.uni/{epoch + step_offset}
  metrics/batch/vars/{name}.f64.uni/{batch + step_offset}
"""
from __future__ import annotations

import json
import re

import numpy as np

MODEL_JSON = "keras/model.json"
WEIGHTS_JSON = "gtar_logd/keras/weights.json"
OPTIMIZER_JSON = "gtar_logd/keras/optimizer.json"
KERAS_GROUP = "keras"
OPTIMIZER_GROUP = "gtar_logd/optimizer"
METRICS_GROUP = "metrics"
WEIGHT_NAME = "weight"
#: Per-frame training progress, a discrete text record (libgetar and
#: keras_gtar list it and ignore it, as they do the daemon's manifest).
PROGRESS_GROUP = "gtar_logd/keras"
PROGRESS_NAME = "progress.json"
PROGRESS_FORMAT = "gtar-logd/keras-progress/1"
BEST_JSON = "gtar_logd/keras/best.json"
BEST_FORMAT = "gtar-logd/keras-best/1"
WEIGHT_RE = re.compile(r"(?:^|/)keras/layer/(\d+)/weight/(\d+)$")
OPTIMIZER_RE = re.compile(r"(?:^|/)gtar_logd/optimizer/(\d+)$")


def weight_group(i: int, j: int) -> str:
    return f"keras/layer/{i}/weight/{j}"


def shape_record(i: int, j: int, shape) -> tuple:
    return (f"{weight_group(i, j)}/shape.u32.uni", np.asarray(shape, dtype="<u4").tobytes())


def progress_path(index: str) -> str:
    return f"{PROGRESS_GROUP}/frames/{index}/{PROGRESS_NAME}"


def progress_record(index: str, *, when: str, epoch, batch, step: int, epochs_done) -> tuple:
    """Where training was when frame `index` was taken:

    * epoch: Keras's epoch number (from 0) the frame was taken in (or before,
      for 'pre_epoch')
    * batch: the batch number within that epoch ('pre_batch'/'post_batch'),
      else None
    * step: batches trained in all, over every `fit` of this archive: the
      frame's weights have seen this many updates
    * epochs_done: when the frame lies on an epoch boundary, the number of
      whole epochs its weights have been trained for: `fit(initial_epoch=
      epochs_done)` continues exactly after it. None for a frame taken
      within an epoch.
    """
    return (progress_path(index), dumps({
        "format": PROGRESS_FORMAT, "when": when, "epoch": epoch, "batch": batch,
        "step": int(step), "epochs_done": epochs_done}))


def metric_name(key: str) -> str:
    """A Keras logs key as a GETAR record name (no '/', no '.')."""
    out = re.sub(r"[^A-Za-z0-9_\-]", "_", str(key))
    return out or "_"


def dumps(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")


def best_record(frame: str, *, monitor: str, mode: str, value: float, epoch: int) -> tuple:
    """Which frame is best so far by `monitor` (a pointer, not a copy)."""
    return (BEST_JSON, dumps({"format": BEST_FORMAT, "frame": frame, "monitor": monitor,
                              "mode": mode, "value": float(value), "epoch": int(epoch)}))
