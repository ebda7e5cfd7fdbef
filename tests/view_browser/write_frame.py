"""Write one more frame to ARCHIVE while the page is open: prints `start` (and
flushes) just before the write begins, `done` once it is durable."""
import sys

import numpy as np

from gtar_logd import Client

address, archive, frame = sys.argv[1:4]
c = Client(address)
arr = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
print("start", flush=True)
c.write_frame(archive, frame, {"probe": arr})
print("done", flush=True)
