"""The state of every layer of this library: where its arrays live (host or CUDA device) and how
they move (:class:`LayerState`), and state_dict() / load_state_dict() under PyTorch's keys."""

from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np

from .annotations import Device, HostArray
from .dispatch import DEVICES, move
from .memory import is_device_array

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


class LayerState(StateDict):
    """A layer whose arrays (named in ``_device_arrays``) live on one side: ``device`` "auto"
    (they follow the input: host for NumPy, the GPU for CUDA arrays), "cpu" or "cuda" (pinned
    there); ``_side`` is where they are now. A layer with ``runs_on_cuda = False`` stays on the
    host and leaves a CUDA input to the functional layer, whose refusal names it. Moving drops
    what the last forward saved (``_saved``): a saved input on the other side cannot feed
    backward()."""

    device = "auto"
    runs_on_cuda = True
    _device_arrays: tuple[str, ...] = ()

    def to(self: _Layer, device: Device) -> _Layer:
        """Move parameters, buffers and gradients to ``device`` ("cpu", "cuda" or "auto", which
        leaves them where they are and lets them follow the input); returns self."""
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
        if device == "cuda" and not self.runs_on_cuda:
            raise TypeError(f"{type(self).__name__} runs on the CPU only (docs/norms.md)")
        if device != "auto":
            self._move(device)
        self.device = device
        return self

    def _move(self, side):
        if side == self._side:
            return
        for name in self._device_arrays:
            value = getattr(self, name, None)
            if value is not None:
                setattr(self, name, move(value, side))
        self._side = side
        self._saved = None

    def _follow(self, x):
        """Bring the arrays to the side of ``x`` (device="auto"), or raise."""
        side = "cuda" if is_device_array(x) else "cpu"
        if side == self._side or not self.runs_on_cuda:
            return
        if self.device != "auto":
            where = "a CUDA device array" if side == "cuda" else "a host (NumPy) array"
            raise ValueError(
                f"this {type(self).__name__} keeps its arrays on {self.device!r} but x is "
                f"{where}: move x, or the layer with .to({side!r})"
            )
        self._move(side)
