"""`Trajectory`: keras_gtar's Trajectory API, served by the gtar-logd daemon.

    with gtar_logd.Trajectory("runs/mnist.zip") as traj:
        print(len(traj), traj.frames)
        model = traj.load()              # the last frame
        w = traj.get_weights(frame=3)

`frame` arguments are positions in `frames` (negative counts from the end),
as in keras_gtar; a str is taken as a frame index ("12"). (The generic
`Client.read_frame` differs: there an int is a frame index, as written, and
positions are `position=`.) Keras is imported only by the methods that need a
model.
"""
from __future__ import annotations

import collections
import json
import os
import re
import struct
import warnings
import zipfile

import numpy as np

from . import _keras_layout as L
from ._names import DEFAULT_COLLECTION, VALUE_NAME, group_to_key, join
from ._writer import Unit
from .client import Client
from .errors import NotFound


class Trajectory:
    """Read (and write) a model trajectory in an archive served by gtar-logd.

    :param archive: archive name relative to the daemon's data dir
    :param mode: 'r' (read-only), 'w' (replace the archive) or 'a' (append)
    :param group: group prefix inside the archive (keras_gtar's `group`)
    :param address: daemon address (default: its default socket)
    """

    def __init__(self, archive, mode="r", group=None, address=None):
        if mode not in ("r", "w", "a"):
            raise ValueError(f"mode must be 'r', 'w' or 'a', not {mode!r}")
        self.archive = archive
        self.filename = archive
        self.mode = mode
        self.group = group
        self.client = Client(address)
        self._owns_client = True
        self._writer = None
        if mode == "w":
            self._writer = self.client.writer(archive, mode="create", group=group)
        else:
            self.client.ping()
        if mode == "r":
            # As libgetar does on opening a missing file: say so now, rather
            # than show a typo'd name as an empty trajectory.
            self._check_archive()

    @classmethod
    def _over(cls, client, archive, group=None):
        """A read-only view through an existing client (GTARLogger's resume):
        no connection of its own, and no check that the archive exists."""
        t = cls.__new__(cls)
        t.archive = t.filename = archive
        t.mode = "a"  # a missing archive has no frames: nothing to resume
        t.group = group
        t.client = client
        t._owns_client = False
        t._writer = None
        return t

    # ------------------------------------------------------------- basics
    def __enter__(self):
        return self

    def __exit__(self, typ, val, tb):
        self.close()

    def close(self):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._owns_client:
            self.client.close()

    def _get_path(self, name):
        return join(self.group, name)

    def _check_archive(self):
        """Raise NotFound naming the archive unless the daemon has it."""
        try:
            self.client.list_frames(self.archive)
        except NotFound as e:
            raise NotFound(f"no archive {self.archive!r} on the gtar-logd daemon at "
                           f"{self.client.address!r} (archive names are relative to its "
                           f"data directory): {e}") from None

    @property
    def frames(self):
        """Frame indices (strings, GETAR order) that have model weights.

        In mode 'r' a missing archive raises NotFound; an archive without
        model weights (or without `group`) has no frames.
        """
        try:
            return self.client.list_frames(self.archive, self._get_path(L.KERAS_GROUP))
        except NotFound:
            if self.mode == "r":
                self._check_archive()
            return []

    def __len__(self):
        return len(self.frames)

    def _resolve(self, frame, frames=None, what="frames"):
        """The index string of `frame`: a str as it is, an int as a position
        in `frames` (keras_gtar's meaning)."""
        if isinstance(frame, str):
            return frame
        if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)):
            raise TypeError(f"frame must be a position (int) or a frame index (str), "
                            f"not {type(frame).__name__}: {frame!r}")
        frames = self.frames if frames is None else frames
        try:
            return frames[frame]
        except IndexError:
            where = f"{self.archive!r}" + (f" (group {self.group!r})" if self.group else "")
            msg = (f"frame {frame} is out of range: {where} has {len(frames)} {what}"
                   + (f" (positions {-len(frames)}..{len(frames) - 1})" if frames else ""))
            if str(frame) in frames:
                msg += (f"; ints are positions, as in keras_gtar: for the frame with "
                        f"index {str(frame)!r} pass frame={str(frame)!r}")
            raise IndexError(msg) from None

    def _record(self, name):
        return self.client.read_record(self.archive, self._get_path(name))

    def _json(self, name, default=None):
        try:
            return json.loads(self._record(name).decode("utf-8"))
        except NotFound:
            return default

    # ------------------------------------------------------------- weights
    def _layers(self, frame):
        """{layer index: [arrays in weight order]} of one frame."""
        index = self._resolve(frame)
        _, tensors = self.client.get_frame(self.archive, index, group=self._get_path(L.KERAS_GROUP),
                                           names=[L.WEIGHT_NAME])
        found = collections.defaultdict(dict)
        for info, arr in tensors:
            m = L.WEIGHT_RE.search(info.group)
            if m:
                found[int(m.group(1))][int(m.group(2))] = arr
        return {i: [ws[j] for j in sorted(ws)] for i, ws in sorted(found.items())}

    def get_weights(self, frame=-1):
        """The model's weight arrays at `frame`, in `model.get_weights()` order."""
        return [w for ws in self._layers(frame).values() for w in ws]

    def load(self, frame=-1, custom_objects=None, compile=True):
        """Rebuild the model from `keras/model.json` and set the weights of `frame`.

        Never unpickles anything: custom classes come from `custom_objects`.
        """
        import keras

        config = json.loads(self._record(L.MODEL_JSON).decode("utf-8"))
        if not compile:
            config.pop("compile_config", None)
        model = keras.models.model_from_json(json.dumps(config), custom_objects=custom_objects)
        self._assign(model, self._layers(frame), by_name=False, skip_mismatch=False)
        return model

    def load_weights_into(self, model, frame=-1, by_name=False, skip_mismatch=False):
        """Set `model`'s weights from `frame`, with Keras' `load_weights` semantics.

        `by_name=False`: layers with weights are matched in order (topological);
        `by_name=True`: layers are matched by name, unmatched ones are left alone.
        `skip_mismatch=True`: layers whose weight count or shapes differ are
        skipped with a warning instead of raising ValueError.
        """
        self._assign(model, self._layers(frame), by_name, skip_mismatch)
        return model

    def _assign(self, model, stored, by_name, skip_mismatch):
        if by_name:
            meta = self._json(L.WEIGHTS_JSON)
            if meta is None:
                raise ValueError("by_name loading needs layer names, and this archive has "
                                 f"no {L.WEIGHTS_JSON} (not written by gtar-logd)")
            names = {l["index"]: l["name"] for l in meta["layers"]}
            by = {names[i]: ws for i, ws in stored.items() if i in names}
            pairs = [(layer, by[layer.name]) for layer in model.layers if layer.name in by]
        else:
            targets = [l for l in model.layers if l.weights]
            sources = [ws for ws in stored.values() if ws]
            if len(targets) != len(sources):
                msg = (f"the model has {len(targets)} layers with weights, frame has "
                       f"{len(sources)}")
                if not skip_mismatch:
                    raise ValueError(msg)
                warnings.warn(msg + "; loading the common prefix", stacklevel=3)
            pairs = list(zip(targets, sources))
        for layer, ws in pairs:
            want = [tuple(v.shape) for v in layer.weights]
            got = [tuple(w.shape) for w in ws]
            if want != got:
                msg = (f"layer {layer.name!r} expects weights of shapes {want}, "
                       f"the archive has {got}")
                if skip_mismatch:
                    warnings.warn("skipping " + msg, stacklevel=3)
                    continue
                raise ValueError(msg)
            layer.set_weights(ws)

    # ------------------------------------------------------------- optimizer
    def optimizer_frames(self):
        """Indices of the frames that hold optimizer state (GETAR order)."""
        try:
            return self.client.list_frames(self.archive, self._get_path(L.OPTIMIZER_GROUP))
        except NotFound:
            return []

    def load_optimizer(self, frame=-1, model=None):
        """Optimizer variables saved at `frame` (a position in `optimizer_frames()`
        or an index string) as {variable path: array}, in the optimizer's order.

        With `model`, also assign them to `model.optimizer` (built if needed).
        """
        index = self._resolve(frame, None if isinstance(frame, str) else self.optimizer_frames(),
                              what="frames with optimizer state")
        _, tensors = self.client.get_frame(self.archive, index,
                                           group=self._get_path(L.OPTIMIZER_GROUP),
                                           names=[VALUE_NAME])
        found = {}
        for info, arr in tensors:
            m = L.OPTIMIZER_RE.search(info.group)
            if m:
                found[int(m.group(1))] = arr
        meta = self._json(L.OPTIMIZER_JSON, {"variables": []})
        paths = {v["index"]: v["path"] for v in meta["variables"]}
        out = {paths.get(k, str(k)): found[k] for k in sorted(found)}
        if model is not None:
            opt = model.optimizer
            if not opt.built:
                opt.build(model.trainable_variables)
            if len(opt.variables) != len(out):
                raise ValueError(f"the optimizer has {len(opt.variables)} variables, "
                                 f"frame {index} has {len(out)}")
            for v, a in zip(opt.variables, out.values()):
                if tuple(v.shape) != a.shape:
                    raise ValueError(f"optimizer variable {v.path} has shape {tuple(v.shape)}, "
                                     f"the archive has {a.shape}")
                v.assign(a)
        return out

    # ------------------------------------------------------------- resume
    def progress(self, frame=-1):
        """Where training was at `frame`, as GTARLogger recorded it: a dict
        with 'epoch', 'batch', 'step' and 'epochs_done' (see
        `_keras_layout.progress_record`), or None for a frame written without
        it (by keras_gtar, or by `save`)."""
        index = self._resolve(frame)
        info = self._json(L.progress_path(index))
        return info if info and info.get("format") == L.PROGRESS_FORMAT else None

    def resume_point(self, when="post_epoch", step_offset=0):
        """(frame index, epochs done, progress) of the newest frame that ends
        an epoch, or None when there is none.

        Frames that GTARLogger took within an epoch ('post_batch' and
        'pre_batch' frames other than an epoch's first or last batch) are
        skipped: `fit` can only start at an epoch boundary. Frames without a
        progress record (keras_gtar's) are read by `when` and `step_offset`,
        the logger's parameters that wrote them: a 'post_epoch' frame F ends
        epoch F - step_offset, a 'pre_epoch' frame starts it; batch frames
        cannot be placed and are skipped.
        """
        for index in reversed(self.frames):
            info = self.progress(index)
            if info is not None:
                if info.get("epochs_done") is not None:
                    return index, int(info["epochs_done"]), info
                continue
            if when in ("post_epoch", "pre_epoch") and index.isdigit():
                done = int(index) - step_offset + (1 if when == "post_epoch" else 0)
                if done >= 0:
                    return index, done, None
        return None

    def restore(self, model, frame=-1):
        """Set `model`'s weights and its optimizer's state from `frame`
        (keras_gtar's meaning: an int is a position, -1 the last frame; a str
        an index) and return the epoch to continue at:

            epoch = traj.restore(model)
            model.fit(x, y, epochs=10, initial_epoch=epoch)

        The model must be compiled with the same optimizer as the run that
        was saved. A frame without optimizer state (GTARLogger's
        save_optimizer='never', or 'exit' in a run that did not finish)
        restores the weights only, with a warning: the optimizer starts over,
        so training does not continue exactly as it would have.

        The epoch comes from the frame's progress record: the epochs its
        weights were trained for. A frame taken within an epoch (when=
        'post_batch') returns that epoch, with a warning, since `fit` starts
        epochs at their first batch. A frame without a progress record (written
        by keras_gtar) is taken as keras_gtar's default, a 'post_epoch' frame
        whose index is the epoch, with a warning.
        """
        index = self._resolve(frame)
        if getattr(model, "optimizer", None) is None:
            raise ValueError("restore() needs a compiled model: the optimizer state goes into "
                             "model.optimizer (for the weights alone, use load_weights_into)")
        info = self.progress(index)
        self._restore_state(model, index)
        if info is not None and info.get("epochs_done") is not None:
            return int(info["epochs_done"])
        if info is not None:
            warnings.warn(
                f"frame {index!r} of {self.archive!r} was taken within epoch {info['epoch']} "
                f"(after its batch {info['batch']}); fit() starts epochs at their first batch, "
                f"so continuing at epoch {info['epoch']} trains those batches again",
                UserWarning, stacklevel=2)
            return int(info["epoch"])
        if not index.isdigit():
            raise ValueError(f"frame {index!r} of {self.archive!r} has no progress record and "
                             f"its index is not an epoch number: cannot tell the epoch")
        warnings.warn(f"frame {index!r} of {self.archive!r} has no progress record (not written "
                      f"by GTARLogger): taking it as a 'post_epoch' frame of epoch {index}",
                      UserWarning, stacklevel=2)
        return int(index) + 1

    def _restore_state(self, model, index):
        """Frame `index`'s weights, and its optimizer state when it has one
        (else a warning), into `model`; whether it had optimizer state."""
        if _distributed(model):
            if self._restore_sharded(model, index):
                return True
        else:
            self._assign(model, self._layers(index), by_name=False, skip_mismatch=False)
            if index in self.optimizer_frames():
                self.load_optimizer(index, model=model)
                return True
        warnings.warn(
            f"gtar-logd: frame {index!r} of {self.archive!r} has no optimizer state "
            f"(GTARLogger saves it with save_optimizer='always'): restored the weights only; "
            f"the optimizer starts over, so training will not continue exactly as the "
            f"interrupted run would have", UserWarning, stacklevel=3)
        return False

    def _restore_sharded(self, model, index):
        """Under a `keras.distribution` (JAX): each variable is read as a
        `jax.Array` of its own sharding, so each process reads only the boxes
        its devices hold (slice reads) -- whatever number of processes saved
        the frame. Weights by layer and weight number (as GTARLogger saved
        them), then the optimizer's variables when the frame has them;
        whether it had them."""
        from .jax_arrays import load_array

        def put(v, group, name):
            a = load_array(self.client, self.archive, group, name, v.value.sharding, index)
            if tuple(a.shape) != tuple(v.shape):
                raise ValueError(f"{v.path} has shape {tuple(v.shape)}, frame {index} of "
                                 f"{self.archive!r} has {tuple(a.shape)} at {group}")
            v.assign(a)

        for i, layer in enumerate(model.layers):
            for j, v in enumerate(layer.weights):
                put(v, self._get_path(L.weight_group(i, j)), L.WEIGHT_NAME)
        if index not in self.optimizer_frames():
            return False
        opt = model.optimizer
        if not opt.built:
            opt.build(model.trainable_variables)
        for k, v in enumerate(opt.variables):
            put(v, self._get_path(f"{L.OPTIMIZER_GROUP}/{k}"), VALUE_NAME)
        return True

    # ------------------------------------------------------------- metrics
    def best(self, monitor=None, mode="min"):
        """The best frame so far: {'frame', 'monitor', 'mode', 'value', 'epoch'}, or None.

        Without `monitor`: what GTARLogger(monitor=..., mode=...) recorded while
        training (`gtar_logd/keras/best.json`). With `monitor` (a metric name,
        e.g. 'val_loss') and `mode` ('min' or 'max'): the frame whose epoch
        metric is best among the frames still in the archive (after a
        compaction, say), computed from the stored metrics.
        Load it with `load(t.best()['frame'])`.
        """
        if monitor is None:
            rec = self._json(L.BEST_JSON)
            if rec is None:
                return None
            return {k: rec.get(k) for k in ("frame", "monitor", "mode", "value", "epoch")}
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        hist = self.metrics("epoch").get(L.metric_name(monitor))
        if hist is None:
            return None
        frames = set(self.frames)
        pick = min if mode == "min" else max
        found = [(v, s) for s, v in zip(*hist) if s in frames and np.isfinite(v)]
        if not found:
            return None
        value, step = pick(found, key=lambda x: x[0])
        info = self.progress(step)
        epoch = info.get("epoch") if info else None
        return {"frame": step, "monitor": monitor, "mode": mode, "value": float(value),
                "epoch": epoch}

    def metrics(self, level="epoch"):
        """History of the metrics GTARLogger stored: {name: (steps, values)}.

        `level` is 'epoch' or 'batch'; steps are index strings in GETAR order
        and values a float64 array.
        """
        group = self._get_path(f"{L.METRICS_GROUP}/{level}")
        desc = self.client.describe(self.archive)
        out = {}
        for rec in desc.records:
            if rec.behavior != "continuous" or rec.group != group:
                continue
            # One streamed TensorHistory call: the steps of a continuous
            # record, whatever they are, in GETAR order.
            hist = self.client.record_history(self.archive, group, rec.name)
            steps = [idx for idx, _ in hist]
            values = np.array([np.asarray(a).reshape(-1)[0] for _, a in hist], dtype=np.float64)
            out[rec.name] = (steps, values)
        return out

    # ------------------------------------------------------------- export
    def export(self, path, frame=-1, format="safetensors"):
        """Write every tensor of `frame` to the file `path`, bit-exact, and
        return them as {name: array}.

        `frame` is a position in the frames of the archive under `group`
        (every frame, not only those with Keras weights; -1 is the last) or
        an index string. `format` is 'safetensors' (Hugging Face's
        `safetensors.numpy.load_file` / `safe_open` read it) or 'npz'
        (`np.load`). dtypes are kept, f16, bf16, bool, i8, i16, u16 included;
        npz has no bfloat16, so, as `np.savez` does with an
        `ml_dtypes.bfloat16` array, it is stored as 2-byte void ('<V2'):
        `arr.view(ml_dtypes.bfloat16)` gets it back.

        Names are the ones the training code used: Keras variable paths
        (`dense/kernel`) for GTARLogger's weights, `optimizer/{path}` for its
        optimizer state, `layer/{i}/weight/{j}` for keras_gtar's weights,
        the dict keys for `Client.write_frame`'s tensors; any other record is
        named by its group and name. `gtar-logd export` names them the same.

        The file is written beside `path` and renamed over it once complete.
        safetensors' own writer is used when the package is installed; else
        the format (an 8-byte header length, a JSON header, the raw bytes) is
        written here.
        """
        if format not in ("safetensors", "npz"):
            raise ValueError(f"format must be 'safetensors' or 'npz', not {format!r}")
        try:
            frames = self.client.list_frames(self.archive, self.group)
        except NotFound:
            if self.mode == "r":
                self._check_archive()
            frames = []
        index = self._resolve(frame, frames)
        _, tensors = self.client.get_frame(self.archive, index, group=self.group)
        tensors = [(info, arr) for info, arr in tensors if not _is_text_record(info.path)]
        if not tensors:
            raise NotFound(f"frame {index!r} of {self.archive!r} has no tensors")
        names = self._export_names([info for info, _ in tensors])
        arrays = {name: arr for name, (_, arr) in zip(names, tensors)}
        metadata = {"format": "gtar-logd-export/1", "frame": str(index)}
        _write_atomically(os.fspath(path), lambda tmp: (
            _save_safetensors(tmp, arrays, metadata) if format == "safetensors"
            else _save_npz(tmp, arrays)))
        return arrays

    def _export_names(self, infos):
        """The user's names of these tensors (see `export`), made unique by
        falling back to record paths."""
        docs = {}

        def doc(prefix, rel):
            p = join(prefix, rel)
            if p not in docs:
                try:
                    docs[p] = json.loads(self.client.read_record(self.archive, p).decode("utf-8"))
                except (NotFound, ValueError):
                    docs[p] = None
            return docs[p]

        def by_index(items, i):
            return next((x for x in items or [] if x.get("index") == i), None)

        group = (self.group or "").strip("/")
        names = []
        for info in infos:
            g, n, name = info.group, info.name, None
            m = _KERAS_WEIGHT.match(g) if n == L.WEIGHT_NAME else None
            if m:
                i, j = int(m.group(2)), int(m.group(3))
                meta = doc(m.group(1), L.WEIGHTS_JSON) or {}
                w = by_index((by_index(meta.get("layers"), i) or {}).get("weights"), j) or {}
                name = w.get("path") or f"layer/{i}/weight/{j}"
            m = _OPTIMIZER_VAR.match(g) if n == VALUE_NAME and name is None else None
            if m:
                k = int(m.group(2))
                meta = doc(m.group(1), L.OPTIMIZER_JSON) or {}
                v = by_index(meta.get("variables"), k) or {}
                name = "optimizer/" + (v.get("path") or str(k))
            if name is None:
                rel = g[len(group) + 1:] if group and g.startswith(group + "/") else (
                    "" if group and g == group else g)
                if n == VALUE_NAME:
                    parts = rel.split("/")
                    for s in range(len(parts) - 1):
                        if parts[s] == DEFAULT_COLLECTION:
                            try:
                                name = group_to_key("/".join(parts[s + 1:]))
                                break
                            except ValueError:  # not hex after all
                                continue
                if name is None:
                    name = join(rel, n)
            names.append(name)
        counts = collections.Counter(names)
        return [info.path if counts[nm] > 1 or nm in ("", "__metadata__") else nm
                for nm, info in zip(names, infos)]

    # ------------------------------------------------------------- writing
    def _w(self):
        if self.mode == "r":
            raise PermissionError(f"Trajectory {self.archive!r} is open read-only (mode='r')")
        if self._writer is None:
            self._writer = self.client.writer(self.archive, mode="append", group=self.group)
        return self._writer

    def save(self, model, frame=None, only_weights=False):
        """Save the model description and/or the weights as frame `frame` (a str),
        and wait until the daemon has them on disk."""
        from ._keras_frames import model_units, weight_entries  # imports keras: only here

        w = self._w()
        if not only_weights:
            w.write_records(model_units(model))
        elif not frame:
            raise ValueError("Trying to save only the weights of a model without a frame given")
        if frame:
            tensors, records = weight_entries(model, copy="always")
            w.submit(Unit(str(frame), tensors, records))
        w.flush()

    def save_weights(self, model, frame):
        return self.save(model, frame, only_weights=True)

    def save_model(self, model):
        return self.save(model)




# ----------------------------------------------------------------- export helpers
_KERAS_WEIGHT = re.compile(r"^(?:(.*)/)?keras/layer/(\d+)/weight/(\d+)$")
_OPTIMIZER_VAR = re.compile(r"^(?:(.*)/)?gtar_logd/optimizer/(\d+)$")
_GETAR_TYPES = {"f32", "f64", "i32", "i64", "u8", "u32", "u64"}
# numpy dtype name -> safetensors dtype
_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
              "int64": "I64", "uint64": "U64", "int32": "I32", "uint32": "U32",
              "int16": "I16", "uint16": "U16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _is_text_record(path: str) -> bool:
    """A GETAR text record (no `.{type}.{uni|ind}` suffix), e.g. a manifest."""
    parts = path.rsplit("/", 1)[-1].split(".")
    return not (len(parts) >= 3 and parts[-1] in ("uni", "ind") and parts[-2] in _GETAR_TYPES)


def _write_atomically(path: str, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, fsync, rename over it."""
    d, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{base}.export-tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_safetensors(path: str, arrays: dict, metadata: dict) -> None:
    try:
        from safetensors.numpy import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(arrays, path, metadata=metadata)
        return
    # safetensors is an optional dependency: without it, write the format
    # itself (an 8-byte little-endian header length, a JSON header naming
    # each tensor's dtype, shape and byte range, then the raw bytes).
    header, offset, blobs = {}, 0, []
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": _ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def _save_npz(path: str, arrays: dict) -> None:
    # What np.savez does (numpy's own .npy writer in an uncompressed zip),
    # without its keyword-argument interface, which would refuse keys such
    # as 'file' or 'allow_pickle'.
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for name, a in arrays.items():
            with z.open(name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(a), allow_pickle=False)


def _distributed(model) -> bool:
    """Whether `model`'s variables are laid out by a `keras.distribution`
    (JAX): then they are restored shard by shard (`_restore_sharded`)."""
    try:
        import keras
    except ImportError:
        return False
    return keras.backend.backend() == "jax" and keras.distribution.distribution() is not None
