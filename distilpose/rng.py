"""The process's global RNG states (torch, NumPy, Python `random`) as plain data, so a
training state can save them with the weights and a resumed run continues the same streams.
Plain lists and numbers plus one tensor: loadable with `torch.load(weights_only=True)`."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        # The whole generator state (key, position, cached gaussian), not only the key.
        "numpy": [keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "python": [int(version), list(mt), gauss_next],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
