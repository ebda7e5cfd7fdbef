"""`GTARLogger`: a drop-in replacement for keras_gtar's callback (Keras 3).

    from gtar_logd.keras import GTARLogger
    model.fit(x, y, callbacks=[GTARLogger("runs/mnist.zip", period=1)])

The training thread only copies the weights once, into shared memory that
the daemon reads (on a Unix socket, daemon of the same user; else it takes
host copies -- with the JAX backend zero-copy NumPy views of JAX's immutable
arrays) and enqueues them; a background thread streams them to the daemon,
which does all the disk I/O.
See `_keras_layout.py` for what goes where in the archive.
"""
from __future__ import annotations

import logging
import time

import keras
import numpy as np

from . import _keras_layout as L
from ._names import VALUE_NAME
from ._writer import Unit, tensor
from .client import Client

log = logging.getLogger("gtar_logd")

_WHEN = ("pre_batch", "post_batch", "pre_epoch", "post_epoch")


def host_copy(variable, copy: str = "auto") -> np.ndarray:
    """A host numpy array holding the variable's current value.

    With the JAX backend values are immutable arrays, so a NumPy view of one
    (no copy on CPU) stays valid after the variable is updated. Other
    backends (tensorflow, torch) update in place, so we copy. `copy='always'`
    forces a copy; `copy='never'` takes whatever the backend's conversion
    gives, which is a snapshot only where values are immutable.
    """
    value = variable.value if hasattr(variable, "value") else variable
    if keras.backend.backend() == "jax" and copy != "always":
        return np.asarray(value)
    # convert_to_numpy, not np.asarray: torch refuses .numpy() on a tensor that
    # requires grad, and keras knows how to bring a value to the host.
    a = keras.ops.convert_to_numpy(value)
    return a if copy == "never" else np.array(a, copy=True)


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


class GTARLogger(keras.callbacks.Callback):
    """Log a model's weights (and optionally optimizer state and metrics) to gtar-logd.

    keras_gtar's parameters, same meaning:

    :param archive: archive name relative to the daemon's data dir (keras_gtar's `filename`)
    :param period: save every `period` epochs or batches
    :param when: 'pre_batch', 'post_batch', 'pre_epoch' or 'post_epoch'
    :param append: append to the archive (else replace it)
    :param step_offset: added to the epoch or batch index
    :param group: group prefix inside the archive

    and ours:

    :param address: daemon address, `unix:/path` or `host:port` (default: its default socket)
    :param save_optimizer: 'never', 'always' (with every frame) or 'exit' (in the last frame)
    :param log_metrics: which Keras `logs` to store as continuous records:
        'epoch' (default), 'batch', 'both' or 'none'
    :param max_pending_bytes: memory budget for frames not yet durable; when it is
        full the training thread blocks (with a warning) -- nothing is dropped
    :param durable_timeout: seconds `on_train_end` waits for every frame to be durable
    :param reconnect_timeout: seconds to keep trying when the daemon goes away
    :param copy: 'auto' (zero-copy views with JAX, copies with tensorflow and torch),
        'always', or 'never' (unsafe where the backend updates variables in place)
    :param compression: 0 (store) or a deflate level 1..9, applied by the daemon
    :param shared_memory: pass tensor bytes to the daemon through shared memory
        (None: on a Unix socket, when the daemon runs as the same user; False: never)
    """

    def __init__(self, archive, period=1, when="post_epoch", append=True, step_offset=0,
                 group=None, address=None, save_optimizer="never", log_metrics="epoch",
                 max_pending_bytes=1 << 30, durable_timeout=600.0, reconnect_timeout=120.0,
                 copy="auto", compression=0, shared_memory=None):
        super().__init__()
        if when not in _WHEN:
            raise ValueError(f"when must be one of {_WHEN}, not {when!r}")
        if save_optimizer not in ("never", "always", "exit"):
            raise ValueError(f"save_optimizer must be 'never', 'always' or 'exit', "
                             f"not {save_optimizer!r}")
        if copy not in ("auto", "always", "never"):
            raise ValueError(f"copy must be 'auto', 'always' or 'never', not {copy!r}")
        if log_metrics not in ("epoch", "batch", "both", "none", None):
            raise ValueError(f"log_metrics must be 'epoch', 'batch', 'both' or 'none'")
        self.archive = archive
        self.filename = archive  # keras_gtar's name for it
        self.period = period
        self.when = when
        self.append = append
        self.step_offset = step_offset
        self.group = group
        self.address = address
        self.save_optimizer = save_optimizer
        self.log_metrics = log_metrics or "none"
        self.max_pending_bytes = max_pending_bytes
        self.durable_timeout = durable_timeout
        self.reconnect_timeout = reconnect_timeout
        self.copy = copy
        self.compression = compression
        self.shared_memory = shared_memory
        self.batches = 0
        self.writer = None
        self.client = None
        #: seconds the training thread spent in each save (for benchmarks)
        self.save_seconds = []
        #: frame indices saved, in order
        self.saved_frames = []
        self._held = None
        self._scalars = []
        self._last_epoch = None
        #: the background writer's counters after on_train_end
        self.stats = {}

    # ------------------------------------------------------------- lifecycle
    def on_train_begin(self, logs=None):
        self.client = Client(self.address)
        self.writer = self.client.writer(
            self.archive, mode="append" if self.append else "create", group=self.group,
            max_pending_bytes=self.max_pending_bytes, reconnect_timeout=self.reconnect_timeout,
            compression=self.compression, shared_memory=self.shared_memory)
        self.writer.write_records(model_units(self.model))

    def on_train_end(self, logs=None):
        if self.writer is None:
            return
        t0 = time.perf_counter()
        try:
            if self.save_optimizer == "exit":
                self._finish_with_optimizer()
            if self._held is not None:
                self._submit(self._held)
                self._held = None
            if self._scalars:
                self.writer.write_records([], self._scalars)
                self._scalars = []
            self.writer.close(self.durable_timeout)
        finally:
            w = self.writer
            self.stats = {"reconnects": w.reconnects, "resent": w.resent, "skipped": w.skipped,
                          "durable": w.durable_count, "blocked_seconds": w.blocked_seconds,
                          "shm_bytes": w.shm_bytes, "shm_refused": w.shm_refused,
                          "end_wait_seconds": time.perf_counter() - t0}
            w.abort()  # no-op after a clean close; stops the threads otherwise
            self.client.close()
            self.writer = None

    # ------------------------------------------------------------- hooks
    def on_train_batch_begin(self, batch, logs=None):
        self._save(self.batches, "pre_batch")

    def on_train_batch_end(self, batch, logs=None):
        if self.log_metrics in ("batch", "both") and logs:
            self._metrics("batch", self.batches + self.step_offset, logs)
        self._save(self.batches, "post_batch")
        self.batches += 1

    def on_epoch_begin(self, epoch, logs=None):
        self._save(epoch, "pre_epoch")

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = epoch
        if self.log_metrics in ("epoch", "both") and logs:
            self._metrics("epoch", epoch + self.step_offset, logs)
        self._save(epoch, "post_epoch")

    # ------------------------------------------------------------- internals
    def _metrics(self, level, index, logs):
        for k, v in logs.items():
            try:
                value = float(np.asarray(v))
            except (TypeError, ValueError):
                continue
            self._scalars.append((f"{L.METRICS_GROUP}/{level}", L.metric_name(k), str(index), value))

    def _save(self, index, required):
        if self.when != required:
            return
        index = index + self.step_offset
        if index % self.period != 0:
            return
        t0 = time.perf_counter()
        model = self.model  # with JAX this syncs the training state into the variables
        unit = self._frame(model, str(index), with_optimizer=self.save_optimizer == "always")
        if self.save_optimizer == "exit":
            held, self._held = self._held, unit
            if held is not None:
                self._submit(held)
        else:
            self._submit(unit)
        self.saved_frames.append(str(index))
        self.save_seconds.append(time.perf_counter() - t0)

    def _frame(self, model, index, with_optimizer):
        # With shared memory the one copy is `stage`'s, into memory the
        # daemon reads: no host copy first, and no reference to the
        # backend's arrays kept past this call (with JAX a kept reference
        # stops XLA from updating the weights in place).
        stage = self.copy == "auto" and self.writer.stages
        copy = "never" if stage else self.copy
        tensors, records = weight_entries(model, copy)
        if with_optimizer:
            t, r = optimizer_entries(model, copy)
            tensors += t
            records += r
        unit = Unit(index, tensors, records)
        if stage:
            self.writer.stage(unit)
        return unit

    def _submit(self, unit):
        if self._scalars:
            unit.scalars.extend(self._scalars)
            unit.nbytes += 64 * len(self._scalars)
            self._scalars = []
        self.writer.submit(unit)

    def _final_index(self):
        off = self.step_offset
        if self.when == "post_epoch":
            return None if self._last_epoch is None else str(self._last_epoch + off)
        if self.when == "pre_epoch":
            return None if self._last_epoch is None else str(self._last_epoch + 1 + off)
        if self.when == "post_batch":
            return str(self.batches - 1 + off) if self.batches else None
        return str(self.batches + off)

    def _finish_with_optimizer(self):
        """save_optimizer='exit': optimizer state goes into the frame of the final state."""
        model = self.model
        index = self._final_index()
        t, r = optimizer_entries(model, self.copy)
        if self._held is not None and self._held.index == index:
            self._held.tensors += t
            self._held.records += r
            self._held.nbytes += sum(x[4].nbytes for x in t) + sum(len(x[1]) for x in r)
            return
        if self._held is not None:
            self._submit(self._held)
            self._held = None
        if index is None or index in self.saved_frames:
            log.warning("gtar-logd: no frame for the final state; optimizer state not saved")
            return
        self._held = self._frame(model, index, with_optimizer=True)
        self.saved_frames.append(index)
