"""state_dict() and load_state_dict() under PyTorch's keys, for every layer of this library."""

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from .annotations import HostArray
from .dispatch import move

_Layer = TypeVar("_Layer", bound="StateDict")


class StateDict:
    """A layer's state as PyTorch's ``state_dict``: the layer names its keys in ``_state_keys()``
    (arrays of the shapes it holds, and ``num_batches_tracked``); ``_side`` says where its arrays
    live ("cpu" or "cuda")."""

    _side = "cpu"

    def state_dict(self) -> dict[str, HostArray]:
        """Host NumPy copies (wherever the layer is), under the keys of the PyTorch module's
        ``state_dict()``."""
        state = {}
        for name in self._state_keys():
            value = getattr(self, name)
            if name == "num_batches_tracked":
                state[name] = np.array(value, dtype=np.int64)
            else:
                state[name] = move(value, "cpu") if self._side == "cuda" else value.copy()
        return state

    def load_state_dict(self: _Layer, state: Mapping[str, Any], strict: bool = True) -> _Layer:
        """Load values (numpy arrays, or anything np.asarray takes, torch CPU tensors too, and
        CUDA arrays); they land where the layer's arrays are.

        Every value is checked before any is assigned.
        """
        expected = self._state_keys()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        if strict and (missing or unexpected):
            raise KeyError(
                f"state_dict mismatch: missing keys {missing}, unexpected keys {unexpected}"
            )
        loaded = {}
        for name in expected:
            if name not in state:
                continue
            value = np.asarray(move(state[name], "cpu"))
            if name == "num_batches_tracked":
                if value.shape != () or not np.issubdtype(value.dtype, np.integer) or value < 0:
                    raise ValueError(
                        f"num_batches_tracked must be a non-negative integer scalar, got {value!r}"
                    )
                loaded[name] = int(value)
                continue
            shape = getattr(self, name).shape
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {shape}, got {value.shape}")
            if not np.issubdtype(value.dtype, np.floating):
                raise TypeError(f"{name} must hold floats, got dtype {value.dtype}")
            loaded[name] = move(value.astype(self.dtype), self._side)
        for name, value in loaded.items():
            setattr(self, name, value)
        self._saved = None  # a pending backward would mix the old forward with the new state
        return self
