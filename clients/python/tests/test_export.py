"""Exports of a frame (`Trajectory.export` and `gtar-logd export`) read back
with Hugging Face's `safetensors` and NumPy from PyPI: bit-identical to
GetFrame's arrays, dtypes and names included. A Keras model rebuilt from a
frame saves and reloads as `.keras`.
"""
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors  # noqa: F401  (the reader under test: test.sh installs it)
from safetensors import safe_open
from safetensors.numpy import load_file

from conftest import BIN
from gtar_logd import Trajectory

DTYPES = ["float32", "float64", "int32", "int64", "uint8", "uint32", "uint64",
          "float16", "bfloat16", "int8", "int16", "uint16", "bool"]


def _dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _arrays(seed):
    """One array of every dtype, random bit patterns (NaN payloads, -0.0,
    subnormals), plus a scalar and keys the client has to encode."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, name in enumerate(DTYPES):
        dt = _dtype(name)
        shape = (3, k + 1)
        raw = rng.integers(0, 256, size=int(np.prod(shape)) * dt.itemsize, dtype=np.uint8)
        if name == "bool":
            raw &= 1
        out[f"t_{name}"] = raw.view(dt).reshape(shape)
    out["scalar"] = np.array(3.5, dtype=np.float32)
    out["frames/x"] = np.arange(4, dtype=np.int16)       # stored hex-encoded
    out["layer1.weight"] = np.ones((2, 2), dtype=np.float16)
    return out


def _same(got, want, name):
    assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert got.tobytes() == want.tobytes(), name


def _load(path, fmt):
    """{name: array} as safetensors / numpy read the file."""
    if fmt == "safetensors":
        got = load_file(str(path))
        with safe_open(str(path), framework="np") as f:
            assert sorted(f.keys()) == sorted(got)
            for k in f.keys():
                _same(f.get_tensor(k), got[k], k)
        return got
    with np.load(str(path)) as z:
        got = {k: z[k] for k in z.files}
    # npz has no bfloat16: stored as 2-byte void, as np.savez does.
    for k, a in got.items():
        if a.dtype == np.dtype("V2"):
            got[k] = a.view(ml_dtypes.bfloat16)
    return got


def _cli_export(daemon, archive, out, fmt, *extra):
    r = subprocess.run([str(BIN), "export", str(daemon.path(archive)), "--format", fmt,
                        "-o", str(out), *extra], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("fmt", ["safetensors", "npz"])
def test_export_is_bit_exact_with_every_dtype_and_the_dict_keys(daemon, client, archive,
                                                                 tmp_path, fmt):
    first, last = _arrays(1), _arrays(2)
    client.write_frame(archive, 7, first)
    client.write_frame(archive, 9, last)
    getframe = client.read_frame(archive, 7)  # what GetFrame returns
    assert sorted(getframe) == sorted(first)
    with Trajectory(archive, address=daemon.address) as t:
        written = t.export(tmp_path / f"a.{fmt}", frame="7", format=fmt)
        t.export(tmp_path / f"last.{fmt}", format=fmt)  # frame=-1: the last
    assert sorted(written) == sorted(first)
    for path, want in ((tmp_path / f"a.{fmt}", getframe), (tmp_path / f"last.{fmt}", last)):
        got = _load(path, fmt)
        assert sorted(got) == sorted(want)
        for k in want:
            _same(got[k], np.asarray(want[k]), k)
    # The offline CLI on the archive file: the same names, the same bytes.
    said = _cli_export(daemon, archive, tmp_path / f"cli.{fmt}", fmt, "--frame", "7")
    assert "frame 7" in said
    got = _load(tmp_path / f"cli.{fmt}", fmt)
    assert sorted(got) == sorted(getframe)
    for k in getframe:
        _same(got[k], getframe[k], k)
    if fmt == "safetensors":
        with safe_open(str(tmp_path / "a.safetensors"), framework="np") as f:
            assert f.metadata()["frame"] == "7"


def test_export_without_the_safetensors_package_writes_the_same_format(
        daemon, client, archive, tmp_path, monkeypatch):
    arrays = _arrays(3)
    client.write_frame(archive, 1, arrays)
    monkeypatch.setitem(sys.modules, "safetensors.numpy", None)  # import fails
    with Trajectory(archive, address=daemon.address) as t:
        t.export(tmp_path / "fallback.safetensors", format="safetensors")
    monkeypatch.undo()
    got = _load(tmp_path / "fallback.safetensors", "safetensors")
    for k, a in arrays.items():
        _same(got[k], np.asarray(a), k)
    with safe_open(str(tmp_path / "fallback.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "gtar-logd-export/1", "frame": "1"}


def test_export_refuses_what_it_cannot_do(daemon, client, archive, tmp_path):
    client.write_frame(archive, 1, {"x": np.zeros(3, np.float32)})
    with Trajectory(archive, address=daemon.address) as t:
        with pytest.raises(ValueError, match="format must be"):
            t.export(tmp_path / "x.h5", format="h5")
        with pytest.raises(IndexError, match="out of range"):
            t.export(tmp_path / "x.npz", frame=5, format="npz")
    assert not list(tmp_path.iterdir()), "nothing written, no temporary left"


def test_export_of_a_keras_run_uses_layer_and_weight_names(daemon, archive, tmp_path):
    import keras
    from gtar_logd.keras import GTARLogger
    from kerasutil import data, make_model

    model = make_model(seed=4)
    x, y = data()
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False,
              callbacks=[GTARLogger(archive, address=daemon.address, save_optimizer="always")])
    with Trajectory(archive, address=daemon.address) as t:
        t.export(tmp_path / "k.safetensors", format="safetensors")
        weights = t.get_weights()
        optimizer = t.load_optimizer()
        rebuilt = t.load()
    got = _load(tmp_path / "k.safetensors", "safetensors")
    paths = [v.path for layer in model.layers for v in layer.weights]
    assert sorted(k for k in got if not k.startswith("optimizer/")) == sorted(paths)
    for p, w in zip(paths, weights):
        _same(got[p], w, p)
    for p, v in optimizer.items():
        _same(got["optimizer/" + p], v, p)
    _cli_export(daemon, archive, tmp_path / "cli.safetensors", "safetensors")
    cli = _load(tmp_path / "cli.safetensors", "safetensors")
    assert sorted(cli) == sorted(got)
    for k in got:
        _same(cli[k], got[k], k)
    # The whole model: rebuilt from the frame, saved and reloaded as .keras.
    rebuilt.save(tmp_path / "model.keras")
    again = keras.models.load_model(tmp_path / "model.keras")
    for a, b in zip(again.get_weights(), weights):
        _same(np.asarray(a), b, "reloaded")
