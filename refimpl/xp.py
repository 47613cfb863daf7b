"""The array namespace: NumPy on the CPU, CuPy on a GPU, chosen once from a `device` setting.

The math in refimpl never imports numpy or cupy itself: it receives the namespace `xp` as an
argument and uses only what the Python Array API standard offers (`concat`, `permute_dims`,
`matrix_transpose`, `take`, ...), which array-api-compat provides on top of both libraries.
The test suite runs the forward pass once more with `array_api_strict` as `xp`, which rejects
anything outside the standard: that is how a machine without a GPU guards the CuPy path.
Host/device copies happen only at the edges (loading weights, reading logits back).
"""

import numpy as np


def namespace(device="cpu"):
    """Return the array namespace for `device`: 'cpu' (NumPy) or 'cuda'/'gpu' (CuPy)."""
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
