"""Bitwise reproducible CPU numerics for deterministic streams."""

from __future__ import annotations

import ctypes
import os

import torch

MKL_CBWR_AUTO, MKL_CBWR_STRICT = 2, 0x10000  # mkl_cbwr.h


def reproducible_blas() -> bool:
    """Make MKL's GEMMs (every matmul of a CPU forward on x86) bitwise reproducible run to run.

    By default MKL may change how many threads a GEMM uses at run time (``MKL_VERBOSE`` shows
    ``Dyn:1``), and a GEMM's result depends on its thread count; Intel documents both as sources of
    run-to-run differences. This turns dynamic threads off and selects strict conditional numerical
    reproducibility, under which ``?gemm`` is bitwise reproducible whatever the thread count.
    Returns False where torch has no MKL (nothing to do).
    """
    if not torch.backends.mkl.is_available():
        return False
    library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    library.MKL_Set_Dynamic(ctypes.c_int(0))
    return library.mkl_serv_cbwr_set(ctypes.c_int(MKL_CBWR_AUTO | MKL_CBWR_STRICT)) == 0
