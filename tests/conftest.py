import getpass
import os
import tempfile

# Triton kernels run on CPU tensors only under the interpreter, which must be chosen before
# triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Inductor's on-disk graph cache does not key its entries by the vector ISA, although it
# generates code for the one ATEN_CPU_CAPABILITY picks: C++ written for AVX2 (8 floats a
# vector) and then compiled for AVX-512 stores 16 floats into 8-float buffers and corrupts
# the heap, and code written for AVX-512 does not compile for the baseline ('at::vec' has not
# been declared). The suite runs under several capabilities (docs/tolerance.md), so each gets
# a cache of its own.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
    os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    or os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}"),
    f"isa-{torch.backends.cpu.get_cpu_capability().lower()}")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
