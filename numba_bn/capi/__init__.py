"""The C library: libnumba_bn.so from the library's own Numba kernels, and C backends.

* ``csrc/`` (package data): the C API (numba_bn.h), the shim that runs the compiled range drivers
  on its persistent worker threads (nbn_pool.h), the argument checks, the layer handle over the
  entry points (nbn_layer.h), a plain reference backend and the C test and bench hosts.
* :mod:`.ranges`: the serial range drivers over :mod:`numba_bn.cpu.items`, exported with
  ``@cfunc``; :mod:`.norm_ranges`, those of group and layer norm (ABI 1.3) over the items of
  :mod:`numba_bn.cpu.norm_kernels`; :mod:`.c_types`, the C types of their arguments.
* :mod:`.build`: ``numba-bn build-plugin``, which compiles those drivers and links them with
  csrc/ into ``libnumba_bn.so``.
* :mod:`.backend`: ``register_backend``, any library with the ABI of numba_bn.h as a backend.
* :mod:`.calls`: ``use_compiled_calls``, the functional API's plain host calls through a CPython
  extension over the library (csrc/nbn_python.c), which ``build-plugin`` builds next to it.

:mod:`numba_bn.cpu` never imports this package: the C library is built on the CPU work items,
not the other way round.
"""

from .backend import CBackend, register_backend
from .build import build_plugin, build_reference_backend, csrc_dir
from .calls import use_compiled_calls

__all__ = [
    "CBackend",
    "build_plugin",
    "build_reference_backend",
    "csrc_dir",
    "register_backend",
    "use_compiled_calls",
]
