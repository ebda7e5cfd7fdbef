"""Small Keras models and a callback that captures weights, for the tests."""
import os

os.environ.setdefault("KERAS_BACKEND", "jax")
import keras  # noqa: E402
import numpy as np  # noqa: E402


def make_model(seed=0, dtype=None, width=16, name_prefix=""):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((8,)),
        keras.layers.Dense(width, activation="relu", dtype=dtype, name=name_prefix + "d1"),
        keras.layers.Dropout(0.0, name=name_prefix + "drop"),  # a layer without weights
        keras.layers.BatchNormalization(dtype=dtype, name=name_prefix + "bn"),
        keras.layers.Dense(3, dtype=dtype, name=name_prefix + "out"),
    ])
    model.compile(optimizer="adam", loss="mse")
    return model


def data(n=64, seed=1):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 8)).astype("float32"), rng.standard_normal((n, 3)).astype("float32")


class Capture(keras.callbacks.Callback):
    """Weights as the model had them at each hook, keyed by keras_gtar's index."""

    def __init__(self):
        super().__init__()
        self.post_epoch, self.pre_epoch, self.pre_batch, self.post_batch = {}, {}, {}, {}
        self.batches = 0

    def _w(self):
        return [np.array(w) for w in self.model.get_weights()]

    def on_epoch_begin(self, epoch, logs=None):
        self.pre_epoch[epoch] = self._w()

    def on_epoch_end(self, epoch, logs=None):
        self.post_epoch[epoch] = self._w()

    def on_train_batch_begin(self, batch, logs=None):
        self.pre_batch[self.batches] = self._w()

    def on_train_batch_end(self, batch, logs=None):
        self.post_batch[self.batches] = self._w()
        self.batches += 1


def same(a, b):
    """Bit-exact equality of two lists of arrays."""
    assert len(a) == len(b), (len(a), len(b))
    for x, y in zip(a, b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape, (x.dtype, y.dtype, x.shape, y.shape)
        assert x.tobytes() == y.tobytes()
    return True
