"""gtar_logd: clients for the gtar-logd daemon.

* `gtar_logd.keras.GTARLogger` -- Keras 3 callback (drop-in for keras_gtar's)
* `gtar_logd.Trajectory` -- keras_gtar's Trajectory API over the daemon
* `gtar_logd.Client` -- queries, and frames of named numpy arrays
* `gtar_logd.Shard` -- a slice of a global tensor, written by one rank of a job
* `gtar_logd.Box` -- a box of a tensor to read (`Client.read_tensor(..., slice=)`)
"""
from ._address import default_socket_path, resolve as resolve_address
from ._slices import Box
from ._writer import Shard
from .client import Client
from .errors import DaemonUnavailable, DurabilityTimeout, GtarLogdError, NotFound, WriteFailed
from .trajectory import Trajectory

__version__ = "0.1.0"

__all__ = ["Box", "Client", "Shard", "Trajectory", "NotFound", "DaemonUnavailable", "DurabilityTimeout",
           "GtarLogdError", "WriteFailed", "default_socket_path", "resolve_address"]
