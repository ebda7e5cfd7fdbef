"""A Keras model's weights and optimizer state as the tensors and records of
a frame (keras_gtar's layout, see `_keras_layout.py`). Imports Keras: used by
`GTARLogger` and by `Trajectory.save`, which imports it only when saving.
"""
from __future__ import annotations

import keras
import numpy as np

from . import _keras_layout as L
from ._names import VALUE_NAME
from ._writer import Shard, tensor, unit_tensors


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


# ------------------------------------------------ several processes (JAX)
def process_layout():
    """(process index, process count) when the model is laid out over the
    devices of several processes -- a `keras.distribution` is set and JAX
    runs as more than one process -- else None (one process saves whole
    tensors as always)."""
    if keras.backend.backend() != "jax" or keras.distribution.distribution() is None:
        return None
    import jax
    if jax.process_count() <= 1:
        return None
    return jax.process_index(), jax.process_count()


def agreed_token() -> int:
    """A random number every process of the job gets the same of (process
    0's, broadcast): what makes a run's job id unique and shared. A
    collective: every process calls it at the same point."""
    import secrets

    from jax.experimental import multihost_utils
    mine = np.asarray(secrets.randbits(62), dtype=np.int64)
    return int(np.asarray(multihost_utils.broadcast_one_to_all(mine)))


def local_shards(variable):
    """The parts of a variable this process sends: each addressable shard
    whose `replica_id` is 0 (a shard replicated over several devices or
    processes is sent once, by the process holding replica 0), as a
    `Shard` of the global tensor -- a NumPy view of the shard's device
    buffer (CPU), no copy."""
    value = variable.value if hasattr(variable, "value") else variable
    shape = tuple(int(n) for n in value.shape)
    out = []
    for sh in value.addressable_shards:
        if sh.replica_id != 0:
            continue
        offsets = [0 if s.start is None else int(s.start) for s in sh.index]
        out.append(Shard(np.asarray(sh.data), offsets, shape))
    return out


def sharded_entries(model, rank: int, with_optimizer: bool):
    """(tensors, slices, records) of this process's part of a frame: the
    shards it holds of every weight (and optimizer variable); the records
    (shapes, optimizer names) from process 0 only -- records sent by several
    ranks would have to agree byte for byte; one sender is simpler."""
    parts, records = [], []
    for i, layer in enumerate(model.layers):
        for j, v in enumerate(layer.weights):
            for sh in local_shards(v):
                parts.append((L.weight_group(i, j), L.WEIGHT_NAME, sh))
            if rank == 0:
                records.append(L.shape_record(i, j, tuple(int(n) for n in v.shape)))
    if with_optimizer:
        opt = getattr(model, "optimizer", None)
        if opt is not None and getattr(opt, "variables", None):
            meta = []
            for k, v in enumerate(opt.variables):
                for sh in local_shards(v):
                    parts.append((f"{L.OPTIMIZER_GROUP}/{k}", VALUE_NAME, sh))
                meta.append({"index": k, "path": getattr(v, "path", v.name), "name": v.name,
                             "dtype": str(v.dtype),
                             "shape": [int(s) for s in v.shape]})
            if rank == 0:
                records.append((L.OPTIMIZER_JSON, L.dumps({
                    "format": "gtar-logd/keras-optimizer/1", "class": type(opt).__name__,
                    "variables": meta})))
    tensors, slices = unit_tensors(parts)
    return tensors, slices, records
