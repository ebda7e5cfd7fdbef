"""A Keras model's weights and optimizer state as the tensors and records of
a frame (keras_gtar's layout, see `_keras_layout.py`). Imports Keras: used by
`GTARLogger` and by `Trajectory.save`, which imports it only when saving.
"""
from __future__ import annotations

import keras
import numpy as np

from . import _keras_layout as L
from ._names import VALUE_NAME
from ._writer import tensor


def host_view(variable) -> np.ndarray:
    """The variable's current value as a host NumPy array, without a copy
    where the backend allows it: the one copy a snapshot needs is the
    caller's (into shared memory, or `host_copy`'s).

    * jax: a view of the immutable array (on CPU); it stays valid, and
      unchanged, after the variable is updated.
    * tensorflow: `read_value()` shares the variable's buffer (copy-on-write:
      an update while the read is alive copies), and `_numpy()` is a view of
      it. `Variable.numpy()` and `keras.ops.convert_to_numpy` copy.
    * torch: `detach().numpy()` shares the CPU tensor's storage, which the
      optimizer updates in place: a view, not a snapshot.
    Other devices, dtypes NumPy lacks (torch's bfloat16) and other backends:
    Keras's own conversion, which copies.
    """
    value = variable.value if hasattr(variable, "value") else variable
    backend = keras.backend.backend()
    if backend == "jax":
        return np.asarray(value)
    if backend == "tensorflow":
        read = getattr(value, "read_value", None)
        t = read() if read is not None else value
        numpy = getattr(t, "_numpy", None)  # EagerTensor: its host buffer (a copy off CPU)
        if numpy is not None:
            return numpy()
    elif backend == "torch":
        t = value.detach()
        if t.device.type == "cpu" and str(t.dtype) != "torch.bfloat16":
            return t.numpy()
    # np.array inside: a copy, and torch refuses .numpy() on a tensor that
    # requires grad.
    return keras.ops.convert_to_numpy(value)


def host_copy(variable, copy: str = "auto") -> np.ndarray:
    """A host numpy array holding the variable's current value.

    With the JAX backend values are immutable arrays, so a NumPy view of one
    (no copy on CPU) stays valid after the variable is updated. Other
    backends (tensorflow, torch) update in place, so we copy -- once: a copy
    of `host_view`. `copy='always'` forces a copy; `copy='never'` returns
    `host_view`, a snapshot only where values are immutable.
    """
    a = host_view(variable)
    if copy == "never" or (copy == "auto" and keras.backend.backend() == "jax"):
        return a
    return np.array(a, copy=True)


def weights_meta(model) -> dict:
    layers = []
    for i, layer in enumerate(model.layers):
        layers.append({
            "index": i,
            "name": layer.name,
            "class": type(layer).__name__,
            "weights": [{"index": j, "name": v.name, "path": getattr(v, "path", v.name),
                         "dtype": str(v.dtype), "shape": [int(s) for s in v.shape]}
                        for j, v in enumerate(layer.weights)],
        })
    return {"format": "gtar-logd/keras/1", "layers": layers}


def model_units(model):
    """The constant records describing a model: model.json and weights.json."""
    return [(L.MODEL_JSON, model.to_json().encode("utf-8")),
            (L.WEIGHTS_JSON, L.dumps(weights_meta(model)))]


def weight_entries(model, copy="auto"):
    """(tensors, records) of one frame of weights in keras_gtar's layout."""
    tensors, records = [], []
    for i, layer in enumerate(model.layers):
        for j, v in enumerate(layer.weights):
            a = host_copy(v, copy)
            tensors.append(tensor(L.weight_group(i, j), L.WEIGHT_NAME, a))
            records.append(L.shape_record(i, j, a.shape))
    return tensors, records


def optimizer_entries(model, copy="auto"):
    opt = getattr(model, "optimizer", None)
    if opt is None or not getattr(opt, "variables", None):
        return [], []
    tensors, meta = [], []
    for k, v in enumerate(opt.variables):
        a = host_copy(v, copy)
        tensors.append(tensor(f"{L.OPTIMIZER_GROUP}/{k}", VALUE_NAME, a))
        meta.append({"index": k, "path": getattr(v, "path", v.name), "name": v.name,
                     "dtype": str(a.dtype), "shape": [int(s) for s in a.shape]})
    rec = (L.OPTIMIZER_JSON, L.dumps({"format": "gtar-logd/keras-optimizer/1",
                                      "class": type(opt).__name__, "variables": meta}))
    return tensors, [rec]
