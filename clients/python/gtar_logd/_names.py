"""Names and group paths shared by the client, the writer and the Keras layout.

A module of its own so that `client.py`, `_writer.py` and `_keras_layout.py`
each import it and none of them imports another for a constant.
"""
from __future__ import annotations

#: Group under which `write_frame` stores a dict's arrays (below the stream group).
DEFAULT_COLLECTION = "tensors"
#: Record name of each array of such a dict, and of each optimizer variable.
VALUE_NAME = "value"
# Group components that GETAR reserves or that would not stay one component.
_RESERVED = {"", ".", "..", "frames", "vars"}


def join(*parts) -> str:
    """Join group components, skipping empty and None ones."""
    return "/".join(p.strip("/") for p in parts if p)


def key_to_group(key: str) -> str:
    """Encode a dict key as a group path below the collection.

    Keys whose '/'-separated components are all acceptable GETAR group
    components are kept as they are ("layer1.weight", "params/dense/kernel"),
    so the archive stays readable; any other key is stored as one component
    "~" + hex(utf-8). `group_to_key` inverts it.
    """
    if not isinstance(key, str):
        raise TypeError(f"tensor names must be str, not {type(key).__name__}: {key!r}")
    parts = key.split("/")
    if all(p not in _RESERVED and not p.startswith("~")
           and not any(ord(c) < 32 or ord(c) == 127 for c in p) for p in parts):
        return key
    return "~" + key.encode("utf-8").hex()


def group_to_key(group: str) -> str:
    """The dict key that `key_to_group` stored as `group`."""
    if group.startswith("~") and "/" not in group:
        return bytes.fromhex(group[1:]).decode("utf-8")
    return group
