"""keras_gtar's archive layout, plus our extra records. No Keras import here.

Per model (constant records, below the stream group):
  keras/model.json                         model.to_json()           (keras_gtar)
  gtar_logd/keras/weights.json             layer and weight names, dtypes, shapes
Per frame F (one atomic frame):
  keras/layer/{i}/weight/{j}/frames/F/weight.{fmt}.uni    tensor     (keras_gtar)
  keras/layer/{i}/weight/{j}/shape.u32.uni                 shape      (keras_gtar, rewritten)
  gtar_logd/optimizer/{k}/frames/F/value.{fmt}.uni         optimizer variable k (optional)
  gtar_logd/keras/optimizer.json                           optimizer variable names (with it)
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
WEIGHT_RE = re.compile(r"(?:^|/)keras/layer/(\d+)/weight/(\d+)$")
OPTIMIZER_RE = re.compile(r"(?:^|/)gtar_logd/optimizer/(\d+)$")


def weight_group(i: int, j: int) -> str:
    return f"keras/layer/{i}/weight/{j}"


def shape_record(i: int, j: int, shape) -> tuple:
    return (f"{weight_group(i, j)}/shape.u32.uni", np.asarray(shape, dtype="<u4").tobytes())


def metric_name(key: str) -> str:
    """A Keras logs key as a GETAR record name (no '/', no '.')."""
    out = re.sub(r"[^A-Za-z0-9_\-]", "_", str(key))
    return out or "_"


def dumps(obj) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=False).encode("utf-8")
