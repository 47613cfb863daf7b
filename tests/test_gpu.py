"""The same golden log-probabilities with CuPy on a CUDA device (device="cuda").

Skipped, with the reason shown by `pytest -ra`, where CuPy is not installed or no CUDA device is
present. The CPU-only guard for this path is test_array_api.py.
"""

import pytest

from refimpl.models import load_model

from conftest import GOLDEN, load_golden
from test_model_golden import TINY, check_prompt

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def cuda():
    """CuPy, or a skip unless it imports and sees at least one CUDA device."""
    cupy = pytest.importorskip("cupy", reason="cupy is not installed (pip install -e '.[cupy]')")
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        pytest.skip(f"no usable CUDA device: {e}")
    if count == 0:
        pytest.skip("no CUDA device present")
    return cupy


@pytest.mark.parametrize("name", TINY)
def test_tiny_model_on_gpu_matches_transformers(cuda, name):
    golden = load_golden(f"tiny/{name}/reference.json")
    model = load_model(GOLDEN / golden["model"], device="cuda")
    assert isinstance(model.weights.lm_head, cuda.ndarray)  # really on the device
    for case in golden["cases"]:
        check_prompt(model, case)


def test_default_model_on_gpu_matches_transformers(cuda, default_model_dir):
    model = load_model(default_model_dir, device="cuda")
    assert isinstance(model.weights.lm_head, cuda.ndarray)
    for case in load_golden("smollm2-135m-instruct.json")["cases"]:
        check_prompt(model, case)
