"""JAX: tensors of a frame as `jax.Array`s with given shardings, each
process reading only the boxes its devices hold (slice reads).

    from gtar_logd.jax_arrays import load_array
    w = load_array(client, "runs/mp.zip", "keras/layer/0/weight/0", "weight",
                   sharding=NamedSharding(mesh, P(None, "model")), frame="2")

`jax.make_array_from_callback` asks for the box of each addressable device;
each distinct box is read once (replicas share it) with
`Client.get_frame(..., slice=)`: the daemon reads just those bytes, or the
client reads them from the archive file itself. Works on any number of
processes, whatever the number that saved the frame.
"""
from __future__ import annotations

from ._slices import box_of


def load_array(client, archive: str, group: str, name: str, sharding, frame=None, *,
               position: int | None = None, dtype=None):
    """The record `group`/`name` of frame `frame` (index as written; or
    `position`; neither: the last) as a `jax.Array` laid out by `sharding`.
    `dtype`: cast to it (default: as stored)."""
    import jax
    import numpy as np

    index, info = client.tensor_header(archive, frame, group=group, names=[name],
                                       position=position)
    shape = tuple(int(n) for n in info.shape)
    boxes = {}

    def read(idx):
        box = box_of(idx, shape, f"tensor {info.path}")
        key = (box.offsets, box.shape)
        if key not in boxes:
            _, ts = client.get_frame(archive, index, group=group, names=[name], slice=box)
            got = [a for i, a in ts if i.group == info.group and i.name == info.name]
            if len(got) != 1:
                raise KeyError(f"{info.path}: {len(got)} tensors in the answer")
            a = got[0]
            boxes[key] = a if dtype is None else a.astype(dtype)
        a = boxes[key]
        return a.reshape([n for d, n in enumerate(box.shape) if d not in box.squeeze]) \
            if box.squeeze else np.asarray(a)

    return jax.make_array_from_callback(shape, sharding, read)
