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
import threading
import time
import warnings

import keras
import numpy as np

from . import _keras_layout as L
from ._keras_frames import (agreed_token, host_copy, host_view,  # noqa: F401 (API)
                            model_units, optimizer_entries, process_layout, sharded_entries,
                            weight_entries, weights_meta)
from ._writer import Unit
from .client import Client
from .trajectory import Trajectory

log = logging.getLogger("gtar_logd")

_WHEN = ("pre_batch", "post_batch", "pre_epoch", "post_epoch")


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
        (or replicated, with wait='replicated')
    :param wait: what `on_train_end` waits for: 'durable' (on the daemon's disk) or
        'replicated' (also in its remote storage, `gtar-logd serve --remote`: the
        checkpoints survive the loss of this node)
    :param reconnect_timeout: seconds to keep trying when the daemon goes away
    :param copy: 'auto' (zero-copy views with JAX, copies with tensorflow and torch),
        'always', or 'never' (unsafe where the backend updates variables in place)
    :param compression: 0 (store) or a deflate level 1..9, applied by the daemon
    :param shared_memory: pass tensor bytes to the daemon through shared memory
        (None: on a Unix socket, when the daemon runs as the same user; False: never)
    :param resume: at the start of `fit`, if the archive (and `group`) has frames,
        restore the newest one that ends an epoch -- weights, optimizer state when
        the frame has it (else a warning: the optimizer starts over) -- and make
        `fit` continue with the next epoch, as keras.callbacks.BackupAndRestore
        does. With when='post_batch' (or 'pre_batch') only frames on an epoch
        boundary qualify: `fit` restarts at epoch boundaries, so the batches trained
        after that frame are trained again and their frames written again. What
        was restored is in `self.resumed` (None: nothing to resume).
    :param keep: a keep policy applied as training goes, by the daemon's Compact
        (in the background after a save, at most one at a time, never blocking
        the training step; once more at the end of `fit`): a dict with any of
        'last' (the last N frames), 'every' (every K-th frame), 'best'
        ('METRIC:min|max:N', by the epoch metrics stored with the frames),
        'newer_than' (seconds), or an int N for {'last': N}. A frame kept by any
        policy is kept; the newest never is dropped. With `monitor`, the best
        frame by it is kept too. Results are in `self.compactions`.
    :param monitor: a Keras logs key, e.g. 'val_loss': after each epoch, if it
        improved, the newest frame is recorded as the best so far -- a small
        record pointing at that frame, not a copy (`Trajectory.best()` reads it;
        `self.best` holds it). ModelCheckpoint's save_best_only, without losing
        the other frames.
    :param mode: 'min', 'max', or 'auto' (max for accuracy-like names, else min)
    :param job: under a `keras.distribution` spanning several JAX processes
        (found by itself: a distribution is set and `jax.process_count() > 1`),
        each process sends only the shards it holds (replica 0 of each), as
        slices of the global tensors, and the daemon stores a frame once every
        process sent its part: one ordinary frame of whole tensors. The
        processes are one job of `jax.process_count()` ranks; its id is the
        archive's name plus a random number process 0 draws and broadcasts at
        the start of `fit` (a collective), or `job` when given (then every
        process must pass the same). Records (shapes, progress, metrics) come
        from process 0. `resume=True` reads each variable's own shards back
        (slice reads; any number of processes). Not yet under several
        processes: `keep`, `monitor`, save_optimizer='exit'.
    """

    def __init__(self, archive, period=1, when="post_epoch", append=True, step_offset=0,
                 group=None, address=None, save_optimizer="never", log_metrics="epoch",
                 max_pending_bytes=1 << 30, durable_timeout=600.0, reconnect_timeout=120.0,
                 copy="auto", compression=0, shared_memory=None, resume=False, keep=None,
                 monitor=None, mode="auto", wait="durable", job=None):
        super().__init__()
        self.job = job
        #: under a distribution over several processes: (rank, world size, job id)
        self.ranks = None
        self._model_records = []
        if wait not in ("durable", "replicated"):
            raise ValueError(f"wait must be 'durable' or 'replicated', not {wait!r}")
        self.wait = wait
        if when not in _WHEN:
            raise ValueError(f"when must be one of {_WHEN}, not {when!r}")
        if save_optimizer not in ("never", "always", "exit"):
            raise ValueError(f"save_optimizer must be 'never', 'always' or 'exit', "
                             f"not {save_optimizer!r}")
        if copy not in ("auto", "always", "never"):
            raise ValueError(f"copy must be 'auto', 'always' or 'never', not {copy!r}")
        if log_metrics not in ("epoch", "batch", "both", "none", None):
            raise ValueError(f"log_metrics must be 'epoch', 'batch', 'both' or 'none'")
        if resume and not append:
            raise ValueError("resume=True continues the archive's run: it needs append=True "
                             "(append=False replaces the archive)")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', not {mode!r}")
        if mode == "auto" and monitor is not None:
            mode = "max" if any(k in monitor for k in ("acc", "auc", "precision", "recall")) \
                else "min"
        self.keep = _keep_policy(keep)
        self.monitor = monitor
        self.mode = mode if monitor is not None else None
        if self.keep is not None and monitor is not None and when == "post_epoch" \
                and "keep_best" not in self.keep:
            # Per-epoch frames carry the epoch's metrics at their own index.
            self.keep["keep_best"] = f"{L.metric_name(monitor)}:{mode}:1"
        #: the best frame so far (monitor=): {'frame', 'monitor', 'mode', 'value', 'epoch'}
        self.best = None
        #: results of the Compact calls keep= made (dicts, see Client.compact)
        self.compactions = []
        #: errors of Compact calls (logged as warnings; training goes on)
        self.compact_errors = []
        self._compact_thread = None
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
        self.resume = resume
        #: after a resume: {'frame', 'epoch', 'step', 'optimizer'} of what was restored
        self.resumed = None
        self.batches = 0  # batches trained in all (continued on resume)
        self._count_lock = threading.Lock()
        self._epoch = 0  # the current epoch, Keras's number
        self._epoch_steps = None  # batches in an epoch, once one has ended
        self._initial_epoch_before = None
        self._initial_epoch_set = False
        self._batch_in_epoch = None
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
        self.ranks = self._process_ranks()
        self.client = Client(self.address)
        try:
            if self.resume:
                self.client.ping(timeout=10.0)
                self._resume()
            job = {}
            if self.ranks is not None:
                job = dict(rank=self.ranks[0], world_size=self.ranks[1], job=self.ranks[2])
            self.writer = self.client.writer(
                self.archive, mode="append" if self.append else "create", group=self.group,
                max_pending_bytes=self.max_pending_bytes,
                reconnect_timeout=self.reconnect_timeout, compression=self.compression,
                shared_memory=self.shared_memory, **job)
        except BaseException:
            # fit() does not call on_train_end after this fails.
            self._put_back_initial_epoch()
            self.client.close()
            raise
        if self.ranks is None:
            self.writer.write_records(model_units(self.model))
        else:
            # A job's ranks write frames together: the model's records go
            # with process 0's first frame.
            self._model_records = model_units(self.model) if self.ranks[0] == 0 else []

    def _process_ranks(self):
        """(rank, world size, job id) under a distribution over several
        processes (see `job`), else None."""
        layout = process_layout()
        if layout is None:
            return None
        unsupported = [name for name, on in (
            ("keep", self.keep is not None),
            ("monitor", self.monitor is not None),
            ("save_optimizer='exit'", self.save_optimizer == "exit")) if on]
        if unsupported:
            raise NotImplementedError(
                f"GTARLogger under a distribution over {layout[1]} processes does not support "
                f"{', '.join(unsupported)} yet")
        rank, world = layout
        job = self.job
        if job is None:
            job = f"keras:{self.archive}:{self.group or ''}:{agreed_token():x}"
        return rank, world, str(job)

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
                if self.ranks is None:
                    self.writer.write_records([], self._scalars)
                else:
                    # A job's records go in frames; these came after the last.
                    log.warning("gtar-logd: %d metric values after the last frame are not "
                                "stored (several processes write frames together)",
                                len(self._scalars))
                self._scalars = []
            if self.wait == "replicated":
                self.writer.flush(self.durable_timeout, replicated=True)
            # A background compaction first flushes the writer: let it
            # finish before the writer closes.
            self._join_compaction()
            self.writer.close(self.durable_timeout)
            if self.keep is not None:
                # The policy over the final state (every frame is durable now).
                self._compact()
        finally:
            self._join_compaction()
            w = self.writer
            self.stats = {"reconnects": w.reconnects, "resent": w.resent, "skipped": w.skipped,
                          "durable": w.durable_count, "replicated": w.replicated_count,
                          "blocked_seconds": w.blocked_seconds,
                          "shm_bytes": w.shm_bytes, "shm_refused": w.shm_refused,
                          "end_wait_seconds": time.perf_counter() - t0}
            w.abort()  # no-op after a clean close; stops the threads otherwise
            self.client.close()
            self.writer = None
            self._put_back_initial_epoch()

    # ------------------------------------------------------------- hooks
    def on_train_batch_begin(self, batch, logs=None):
        # Before an epoch's first batch the weights are those of the epoch boundary.
        self._save(self.batches, "pre_batch", batch=batch, step=self.batches,
                   epochs_done=self._epoch if batch == 0 else None)

    @property
    def async_safe(self):
        """Whether Keras may run `on_train_batch_end` on its thread pool.

        Keras waits for every step's logs on the training thread when a
        callback has a batch-end hook that is not async-safe, so JAX cannot
        queue the next step meanwhile; that alone cost training more than a
        100 MB save every epoch. Unless frames or metrics are per batch, our
        hook only counts batches (under a lock: the pool has several
        threads; Keras waits for them before `on_epoch_end`)."""
        return self.when in ("post_epoch", "pre_epoch") and self.log_metrics in ("epoch", "none")

    def on_train_batch_end(self, batch, logs=None):
        if not self.async_safe:
            self._batch_end(batch, logs)
            return
        with self._count_lock:
            self.batches += 1
            if self._batch_in_epoch is None or batch > self._batch_in_epoch:
                self._batch_in_epoch = batch

    def _batch_end(self, batch, logs):
        if self.log_metrics in ("batch", "both") and logs:
            self._metrics("batch", self.batches + self.step_offset, logs)
        steps = (self.params or {}).get("steps") or self._epoch_steps
        last = steps is not None and batch + 1 >= steps
        self._save(self.batches, "post_batch", batch=batch, step=self.batches + 1,
                   epochs_done=self._epoch + 1 if last else None)
        self.batches += 1
        self._batch_in_epoch = batch

    def on_epoch_begin(self, epoch, logs=None):
        self._put_back_initial_epoch()  # fit() has read it by now
        self._epoch = epoch
        self._batch_in_epoch = None
        self._save(epoch, "pre_epoch", step=self.batches, epochs_done=epoch)

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = epoch
        if self._batch_in_epoch is not None:  # for data of unknown length
            self._epoch_steps = self._batch_in_epoch + 1
        if self.log_metrics in ("epoch", "both") and logs:
            self._metrics("epoch", epoch + self.step_offset, logs)
        self._save(epoch, "post_epoch", step=self.batches, epochs_done=epoch + 1)
        if self.monitor is not None:
            self._track_best(epoch, logs or {})
        if self.keep is not None and self.when in ("post_epoch", "pre_epoch"):
            self._compact_in_background()

    # ------------------------------------------------------------- internals
    def _put_back_initial_epoch(self):
        """`model._initial_epoch` outlives fit(): once fit() has read it, put
        back what it was, so a later fit() of this model (without resume)
        starts where it is told to."""
        if self._initial_epoch_set:
            self._initial_epoch_set = False
            self.model._initial_epoch = self._initial_epoch_before

    def _resume(self):
        """Restore the newest frame that ends an epoch; see `resume`."""
        self.resumed = None
        traj = Trajectory._over(self.client, self.archive, self.group)
        point = traj.resume_point(self.when, self.step_offset)
        if point is None:
            if traj.frames:
                warnings.warn(f"gtar-logd: resume=True but no frame of {self.archive!r} ends "
                              f"an epoch; training starts from the beginning", UserWarning)
            else:
                log.info("gtar-logd: nothing to resume in %s; starting from the beginning",
                         self.archive)
            return
        index, epochs_done, info = point
        model = self.model
        has_optimizer = traj._restore_state(model, index)
        if info is not None:
            self.batches = int(info["step"])
        else:  # keras_gtar's frames say nothing of batches
            steps = (self.params or {}).get("steps")
            self.batches = epochs_done * steps if steps else 0
        self._last_epoch = epochs_done - 1 if epochs_done > 0 else None
        self._epoch = epochs_done
        # Keras 3's fit() reads this right after on_train_begin
        # (keras.callbacks.BackupAndRestore sets it the same way).
        self._initial_epoch_before = getattr(model, "_initial_epoch", None)
        self._initial_epoch_set = True
        model._initial_epoch = epochs_done
        if self.monitor is not None:
            best = traj.best()
            if best and best.get("monitor") == self.monitor and best.get("mode") == self.mode:
                self.best = best
        self.resumed = {"frame": index, "epoch": epochs_done, "step": self.batches,
                        "optimizer": has_optimizer}
        log.info("gtar-logd: resumed from frame %r of %s (%s); fit continues at epoch %d",
                 index, self.archive, "weights and optimizer state" if has_optimizer
                 else "weights only", epochs_done)

    def _track_best(self, epoch, logs):
        """monitor=: record the newest frame as the best if `monitor` improved."""
        value = logs.get(self.monitor)
        if value is None:
            if not getattr(self, "_warned_monitor", False):
                self._warned_monitor = True
                warnings.warn(f"gtar-logd: monitor={self.monitor!r} is not among the epoch's "
                              f"logs ({sorted(logs)}); no best frame is recorded", UserWarning)
            return
        value = float(np.asarray(value))
        if not np.isfinite(value) or not self.saved_frames:
            return
        if self.best is not None:
            old = self.best["value"]
            if (value >= old) if self.mode == "min" else (value <= old):
                return
        frame = self.saved_frames[-1]
        self.best = {"frame": frame, "monitor": self.monitor, "mode": self.mode,
                     "value": value, "epoch": epoch}
        rec = L.best_record(frame, monitor=self.monitor, mode=self.mode, value=value,
                            epoch=epoch)
        if self._held is not None and self._held.index == frame:
            self._held.records.append(rec)  # goes with its frame
        else:
            self.writer.write_records([rec])

    # keep=: the daemon compacts; this thread only starts the call.
    def _compact_in_background(self):
        t = self._compact_thread
        if t is not None and t.is_alive():
            return  # at most one in flight; a later save starts the next
        self._compact_thread = threading.Thread(target=self._compact, args=(True,),
                                                name="gtar-logd-compact", daemon=True)
        self._compact_thread.start()

    def _join_compaction(self):
        t, self._compact_thread = self._compact_thread, None
        if t is not None:
            t.join()

    def _compact(self, wait_durable=False):
        try:
            if wait_durable:
                # The frames (and metrics) submitted so far, in the archive.
                self.writer.flush(self.durable_timeout)
            r = self.client.compact(self.archive, group=self.group, **self.keep)
            self.compactions.append(r)
            if r["dropped"]:
                log.info("gtar-logd: compacted %s: dropped frames %s, %d bytes reclaimed",
                         self.archive, r["dropped"], r["bytes_reclaimed"])
        except Exception as e:  # noqa: BLE001 -- training goes on; reported below
            self.compact_errors.append(e)
            log.warning("gtar-logd: compaction of %s failed (training goes on): %s",
                        self.archive, e)

    def _metrics(self, level, index, logs):
        if self.ranks is not None and self.ranks[0] != 0:
            return  # process 0's are the job's (Keras reduces them over processes)
        for k, v in logs.items():
            try:
                value = float(np.asarray(v))
            except (TypeError, ValueError):
                continue
            self._scalars.append((f"{L.METRICS_GROUP}/{level}", L.metric_name(k), str(index), value))

    def _save(self, index, required, *, batch=None, step, epochs_done):
        if self.when != required:
            return
        index = index + self.step_offset
        if index % self.period != 0:
            return
        t0 = time.perf_counter()
        model = self.model  # with JAX this syncs the training state into the variables
        progress = L.progress_record(str(index), when=self.when, epoch=self._epoch, batch=batch,
                                     step=step, epochs_done=epochs_done)
        unit = self._frame(model, str(index), with_optimizer=self.save_optimizer == "always",
                           progress=progress)
        if self.save_optimizer == "exit":
            held, self._held = self._held, unit
            if held is not None:
                self._submit(held)
        else:
            self._submit(unit)
        self.saved_frames.append(str(index))
        self.save_seconds.append(time.perf_counter() - t0)

    def _frame(self, model, index, with_optimizer, progress):
        # With shared memory the one copy is `stage`'s, into memory the
        # daemon reads: no host copy first, and no reference to the
        # backend's arrays kept past this call (with JAX a kept reference
        # stops XLA from updating the weights in place).
        stage = self.copy == "auto" and self.writer.stages
        copy = "never" if stage else self.copy
        if self.ranks is not None:
            # This process's shards, as slices of the global tensors.
            # (JAX only: NumPy views of immutable device buffers, no copy.)
            tensors, slices, records = sharded_entries(model, self.ranks[0], with_optimizer)
            if self.ranks[0] == 0:
                records = self._model_records + records + [progress]
                self._model_records = []
            unit = Unit(index, tensors, records, slices=slices)
            if stage:
                self.writer.stage(unit)
            return unit
        tensors, records = weight_entries(model, copy)
        if with_optimizer:
            t, r = optimizer_entries(model, copy)
            tensors += t
            records += r
        records.append(progress)
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
        # Training ends at an epoch boundary unless an exception cut it short.
        done = None if self._last_epoch is None else self._last_epoch + 1
        progress = L.progress_record(index, when=self.when, epoch=self._epoch, batch=None,
                                     step=self.batches, epochs_done=done)
        self._held = self._frame(model, index, with_optimizer=True, progress=progress)
        self.saved_frames.append(index)


def _keep_policy(keep):
    """GTARLogger's `keep` as Client.compact's keyword arguments (None: no policy)."""
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, (int, dict)):
        raise TypeError(f"keep must be a dict (last, every, best, newer_than) or an int, "
                        f"not {keep!r}")
    if isinstance(keep, int):
        keep = {"last": keep}
    names = {"last": "keep_last", "every": "keep_every", "best": "keep_best",
             "newer_than": "keep_newer_than", "drop_best": "drop_best"}
    unknown = set(keep) - set(names)
    if unknown or not set(keep) - {"drop_best"}:
        raise ValueError(f"keep: unknown keys {sorted(unknown)}; use any of {sorted(names)}"
                         if unknown else "keep: an empty policy would drop every frame "
                         "but the newest")
    return {names[k]: v for k, v in keep.items()}
