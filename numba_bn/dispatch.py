"""Backend registry: the kernels behind the functional API, chosen by name.

A backend implements, on validated C-contiguous canonical ``(outer, C, inner)`` views,
``forward_train``, ``forward_eval``, ``backward``, ``channel_stats``, ``normalize``,
``backward_sums`` and ``backward_dx`` with the signatures of :class:`numba_bn.cpu.CpuBackend`.
Its arrays live in its ``memory`` (:mod:`numba_bn.placement`; host NumPy when it has none).
"""

from .cpu import CpuBackend
from .cuda import CudaBackend
from .placement import HOST

_backends = {"cpu": CpuBackend(), "cuda": CudaBackend()}


def register(name, backend):
    """Make ``backend`` available as ``backend=name`` in the functional API and BatchNorm."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    _backends[name] = backend


def get(name):
    try:
        return _backends[name]
    except KeyError:
        known = ", ".join(sorted(_backends))
        raise ValueError(f"backend={name!r} is not registered; known backends: {known}") from None


def memory(backend):
    """Where ``backend``'s arrays live: its ``memory``, or host NumPy arrays."""
    return getattr(backend, "memory", HOST)


def names():
    return sorted(_backends)
