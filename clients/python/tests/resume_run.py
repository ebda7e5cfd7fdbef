"""One training run for test_resume.py, in a process of its own so that it
can be killed with SIGKILL like a job that hits its wall-clock limit.

    python resume_run.py ARCHIVE ADDRESS --epochs 6 [--resume] [--kill-after E]

Prints one JSON line: the epochs this run trained and what GTARLogger resumed.
"""
import argparse
import json
import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402

from gtar_logd.keras import GTARLogger  # noqa: E402
from kerasutil import data, make_model  # noqa: E402


class KillAfter(keras.callbacks.Callback):
    """SIGKILL this process once epoch `epoch`'s frame is durable."""

    def __init__(self, logger, epoch):
        super().__init__()
        self.logger, self.epoch = logger, epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.logger.writer.flush(60)
            print(json.dumps({"killed_after": epoch}), flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("archive")
    p.add_argument("address")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-after", type=int)
    p.add_argument("--init-seed", type=int, default=11)
    p.add_argument("--save-optimizer", default="always")
    a = p.parse_args()
    # A resumed run starts from other initial weights: only the archive can
    # bring it back to where the killed run was.
    model = make_model(seed=a.init_seed)
    logger = GTARLogger(a.archive, address=a.address, save_optimizer=a.save_optimizer,
                        resume=a.resume)
    callbacks = [logger]
    if a.kill_after is not None:
        callbacks.append(KillAfter(logger, a.kill_after))
    x, y = data()
    hist = model.fit(x, y, batch_size=16, epochs=a.epochs, verbose=0, shuffle=False,
                     callbacks=callbacks)
    print(json.dumps({"epochs": hist.epoch, "resumed": logger.resumed}), flush=True)


if __name__ == "__main__":
    main()
