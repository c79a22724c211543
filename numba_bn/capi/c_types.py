"""The C types of the range drivers' arguments, as annotations (:mod:`.ranges`,
:mod:`.norm_ranges`): the build reads them to type each ``@cfunc`` and to write nbn_kernels.h.
``T`` becomes float or double, by the table the function is compiled for."""

IN = "const T *"
OUT = "T *"
IN64 = "const double *"
OUT64 = "double *"
OUTI64 = "int64_t *"
I64 = "int64_t"
F64 = "double"
