"""One JAX process of a multi-process Keras 3 run (started by
test_keras_processes.py): `jax.distributed.initialize` with a local
coordinator, 2 CPU devices per process, `keras.distribution.ModelParallel`
with kernels column- and row-sharded over the 'model' axis, `fit` for 3
epochs with an unchanged `GTARLogger`. After each epoch's save, the weights
gathered from every process (`multihost_utils.process_allgather`) are
dumped by process 0 to `{out}/{epoch}-{layer}-{weight}.npy`, for the test to
compare with what the daemon stored.

With "restore": true, the model is instead compiled and restored from the
archive's last frame (`Trajectory.restore`, each process reading only its
shards), and process 0 dumps the gathered weights and optimizer variables
to `{out}/restored-{layer}-{weight}.npy` and `{out}/restored-opt-{k}.npy`.

argv[1]: JSON {port, nprocs, rank, address, archive, out, epochs, restore}
"""
import json
import os
import sys

cfg = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{cfg['port']}",
                           num_processes=cfg["nprocs"], process_id=cfg["rank"],
                           initialization_timeout=60)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from gtar_logd import Trajectory  # noqa: E402
from gtar_logd.keras import GTARLogger  # noqa: E402

devices = keras.distribution.list_devices()
assert len(devices) == 2 * cfg["nprocs"], devices
mesh = keras.distribution.DeviceMesh(shape=(2, len(devices) // 2),
                                     axis_names=("batch", "model"), devices=devices)
layout = keras.distribution.LayoutMap(mesh)
layout[".*d1/kernel"] = (None, "model")   # column-sharded (keys: regexes, fullmatch)
layout[".*d1/bias"] = ("model",)
layout[".*d2/kernel"] = ("model", None)   # row-sharded
# d2/bias: replicated on every device (sent once, by replica 0's process).
keras.distribution.set_distribution(keras.distribution.ModelParallel(
    layout_map=layout, batch_dim_name="batch", auto_shard_dataset=False))

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((12,)),
                          keras.layers.Dense(16, activation="relu", name="d1"),
                          keras.layers.Dense(8, name="d2")])
model.compile(optimizer="adam", loss="mse")
rng = np.random.default_rng(1)
x = rng.standard_normal((64, 12)).astype("float32")
y = rng.standard_normal((64, 8)).astype("float32")


def gathered(v):
    return np.asarray(multihost_utils.process_allgather(v.value, tiled=True))


if cfg.get("restore"):
    with Trajectory(cfg["archive"], address=cfg["address"]) as t:
        epoch = t.restore(model)
    for i, layer in enumerate(model.layers):
        for j, v in enumerate(layer.weights):
            g = gathered(v)
            if jax.process_index() == 0:
                np.save(os.path.join(cfg["out"], f"restored-{i}-{j}.npy"), g)
    for k, v in enumerate(model.optimizer.variables):
        g = gathered(v)
        if jax.process_index() == 0:
            np.save(os.path.join(cfg["out"], f"restored-opt-{k}.npy"), g)
    print(json.dumps({"rank": jax.process_index(), "epoch": epoch}))
    sys.stdout.flush()
    jax.distributed.shutdown()
    sys.exit(0)


class Dump(keras.callbacks.Callback):
    """The gathered weights after each epoch (after GTARLogger saved them)."""

    def on_epoch_end(self, epoch, logs=None):
        for i, layer in enumerate(self.model.layers):
            for j, v in enumerate(layer.weights):
                g = np.asarray(multihost_utils.process_allgather(v.value, tiled=True))
                if jax.process_index() == 0:
                    np.save(os.path.join(cfg["out"], f"{epoch}-{i}-{j}.npy"), g)
        for k, v in enumerate(self.model.optimizer.variables):
            g = np.asarray(multihost_utils.process_allgather(v.value, tiled=True))
            if jax.process_index() == 0:
                np.save(os.path.join(cfg["out"], f"opt-{epoch}-{k}.npy"), g)


logger = GTARLogger(cfg["archive"], address=cfg["address"], durable_timeout=60.0,
                    save_optimizer="always")
model.fit(x, y, epochs=cfg["epochs"], batch_size=16, shuffle=False, verbose=0,
          callbacks=[logger, Dump()])
shards = {f"{i}/{j}": [[int(s.start or 0) for s in sh.index] for sh in v.value.addressable_shards
                       if sh.replica_id == 0]
          for i, layer in enumerate(model.layers) for j, v in enumerate(layer.weights)}
n_opt = len(model.optimizer.variables)
print(json.dumps({"rank": jax.process_index(), "world": jax.process_count(),
                  "job": logger.ranks[2] if logger.ranks else None, "saved": logger.saved_frames,
                  "stats": {k: v for k, v in logger.stats.items() if k != "end_wait_seconds"},
                  "shards": shards, "optimizer_variables": n_opt}))
sys.stdout.flush()
jax.distributed.shutdown()
