"""The array namespace: NumPy on the CPU, CuPy on a GPU, chosen once from a `device` setting.

The math in refimpl never imports numpy or cupy itself: it receives the namespace `xp` as an
argument and uses only what the Python Array API standard offers (`concat`, `permute_dims`,
`matrix_transpose`, `take`, ...), which array-api-compat provides on top of both libraries.
The test suite runs the forward pass once more with `array_api_strict` as `xp`, which rejects
anything outside the standard: that is how a machine without a GPU guards the CuPy path.
Host/device copies happen only at the edges (loading weights, reading logits back).
"""

import ctypes
import ctypes.util

import numpy as np


def namespace(device="cpu"):
    """Return the array namespace for `device`: 'cpu' (NumPy) or 'cuda'/'gpu' (CuPy).

    Choosing a namespace changes nothing else in the process (modules call this at import);
    tuning the allocator for a CPU model is load_model's decision (keep_freed_memory)."""
    if device == "cpu":
        import array_api_compat.numpy

        return array_api_compat.numpy
    if device in ("cuda", "gpu"):
        import array_api_compat.cupy  # only the GPU path ever imports cupy

        return array_api_compat.cupy
    raise ValueError(f"unknown device {device!r} (expected 'cpu' or 'cuda')")


def to_numpy(x):
    """Copy an array of any namespace to a NumPy array on the host."""
    if hasattr(x, "get"):  # CuPy
        return x.get()
    return np.asarray(x)


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the system.

    A decoding step allocates the same short-lived arrays of 0.1-30 MB in every layer. glibc
    serves blocks that size from fresh mmap'd pages by default, and the first touch of each page
    faults: an earlier batched decode attention of 8 sequences took 1.0 ms per layer that way and
    0.3 ms with reused memory. (PyTorch's CPU tuning guide makes the same point with jemalloc.)
    A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed value
    mallopt(M_TRIM_THRESHOLD, 256 << 20)
