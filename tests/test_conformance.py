"""torch's own module tests for nn.LSTM / GRU / RNN and their cells, run against fastrnn.

The installed torch ships ``module_db`` (torch.testing._internal.common_modules): for each
module, the sample inputs and error inputs torch tests it with. Every sample goes through
the fastrnn twin of the module (same constructor arguments, torch.nn's state_dict) on every
backend, next to torch.nn itself: outputs, states, gradients with respect to the inputs and
parameters, and second derivatives. Every error input raises the same exception type and
message as torch.nn. The samples are read from the installed torch at collection time, so a
torch that adds, drops or changes samples is followed, not pinned.
"""
import copy
import inspect
import re

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fastrnn
from fastrnn.testing import to_float64

from parity import FAST_TWIN, assert_close, flatten

pytest.importorskip("expecttest", reason="torch's test helpers import expecttest "
                                         "(requirements-dev.txt)")
from torch.testing._internal import common_modules  # noqa: E402

# Importing torch's test helpers freezes torch.backends' flags (tests may then change them
# only inside flags() blocks); thaw them so the rest of the suite runs as without this file.
torch.backends.flags_frozen.__globals__["__allow_nonbracketed_mutation_flag"] = True
assert not torch.backends.flags_frozen()

MODULE_INFOS = [info for info in common_modules.module_db if info.module_cls in FAST_TWIN]
BACKENDS = fastrnn.available_backends("cpu")


def _samples(info, dtype, training):
    func = info.module_inputs_func
    kwargs = {}
    if "with_packed_sequence" in inspect.signature(func).parameters:
        kwargs["with_packed_sequence"] = True   # where this torch offers packed samples
    return func(info, device="cpu", dtype=dtype, requires_grad=True, training=training,
                **kwargs)


def _trainings(info):
    return (False, True) if getattr(info, "train_and_eval_differ", False) else (False,)


def _name(info):
    return info.module_cls.__name__


def _sample_cases():
    """(info, sample index, training) for every sample of every mode the module_db gives."""
    cases = []
    for info in MODULE_INFOS:
        for training in _trainings(info):
            count = len(_samples(info, torch.float64, training))
            cases += [pytest.param(info, index, training,
                                   id=f"{_name(info)}-{index}-{'train' if training else 'eval'}")
                      for index in range(count)]
    return cases


def _fresh(value):
    """Equal copies of the sample's inputs, each a new leaf (requires_grad as given)."""
    if isinstance(value, PackedSequence):
        return PackedSequence(_fresh(value.data), value.batch_sizes, value.sorted_indices,
                              value.unsorted_indices)
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    return value


def _leaves(value):
    return [t for t in flatten(value) if isinstance(t, torch.Tensor) and t.requires_grad]


def _build(info, sample, dtype, backend, training):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(0)
    reference = info.module_cls(*args, **kwargs).to(dtype).train(training)
    fast = FAST_TWIN[info.module_cls](*args, **kwargs, backend=backend).to(dtype).train(training)
    fast.load_state_dict(reference.state_dict(), strict=True)
    return reference, fast


def _first_grads(module, sample, create_graph, upstream_dtype=None):
    """(outputs, inputs, first derivatives of a fixed random projection of the outputs)."""
    fw_args = _fresh(sample.forward_input.args)
    fw_kwargs = _fresh(sample.forward_input.kwargs)
    if upstream_dtype is not None:   # the float64 truth of a lower-precision sample
        fw_args, fw_kwargs = to_float64(fw_args), to_float64(fw_kwargs)
    outputs = flatten(module(*fw_args, **fw_kwargs))
    gen = torch.Generator().manual_seed(1234)
    # drawn in the sample's dtype, so a float64 truth run gets the same rounded values
    upstream = [torch.randn(o.shape, generator=gen, dtype=upstream_dtype or o.dtype).to(o.dtype)
                for o in outputs]
    inputs = _leaves(fw_args) + _leaves(list(fw_kwargs.values())) + list(module.parameters())
    grads = torch.autograd.grad(outputs, inputs, upstream, create_graph=create_graph)
    return outputs, inputs, grads


def _compare(actual, expected, what, truth=None):
    """fastrnn.testing's rule: float64 against torch.nn; lower precision against the float64
    ``truth`` (torch.nn in float64 on the same rounded values)."""
    assert len(actual) == len(expected), what
    truth = [None] * len(expected) if truth is None else truth
    for index, (a, e, t) in enumerate(zip(actual, expected, truth)):
        assert_close(a, e, t, f"{what} {index}")


def _dtype(backend):
    # the triton kernels take float32 (and half types), not float64
    return torch.float32 if backend == "triton" else torch.float64


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,index,training", _sample_cases())
def test_sample(info, index, training, backend):
    """Outputs, states and first derivatives of every module_db sample, as torch.nn."""
    dtype = _dtype(backend)
    sample = _samples(info, dtype, training)[index]
    reference, fast = _build(info, sample, dtype, backend, training)
    if backend == "triton" and training and not getattr(reference, "dropout", 0):
        pytest.skip("without dropout train mode is eval mode (the interpreter is slow)")
    want_out, _, want_grads = _first_grads(reference, sample, False)
    got_out, _, got_grads = _first_grads(fast, sample, False)
    truth_out = truth_grads = None
    if dtype != torch.float64:
        truth_out, _, truth_grads = _first_grads(copy.deepcopy(reference).double(), sample,
                                                 False, upstream_dtype=dtype)
    _compare(got_out, want_out, "output", truth_out)
    _compare(got_grads, want_grads, "gradient", truth_grads)


def _double_backward_cases():
    return [pytest.param(info, backend, id=f"{_name(info)}-{backend}")
            for info in MODULE_INFOS for backend in BACKENDS
            if backend != "triton"]   # float64 only: the triton kernels take float32


@pytest.mark.parametrize("info,backend", _double_backward_cases())
def test_sample_double_backward(info, backend):
    """Second derivatives in float64: the gradient of the sum of the squared first
    derivatives, with respect to the inputs and parameters, for every sample of a module."""
    dtype = torch.float64
    for training in _trainings(info):
        for index, sample in enumerate(_samples(info, dtype, training)):
            reference, fast = _build(info, sample, dtype, backend, training)
            results = []
            for module in (reference, fast):
                _, inputs, grads = _first_grads(module, sample, True)
                penalty = sum((g * g).sum() for g in grads)
                second = torch.autograd.grad(penalty, inputs, allow_unused=True)
                results.append([torch.zeros_like(i) if s is None else s
                                for i, s in zip(inputs, second)])
            _compare(results[1], results[0], f"sample {index} second derivative")


def _error_cases():
    cases = []
    for info in MODULE_INFOS:
        func = getattr(info, "module_error_inputs_func", None)
        if func is None:
            continue
        count = len(func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                         training=False))
        cases += [pytest.param(info, index, id=f"{_name(info)}-{index}") for index in range(count)]
    return cases


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # the exception itself is what is compared
        return exc
    return None


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,index", _error_cases())
def test_error_input(info, index, backend):
    """Every module_db error input: the exception type and message of torch.nn."""
    error_input = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                requires_grad=False, training=False)[index]
    sample = error_input.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    forward_error = error_input.error_on == common_modules.ModuleErrorEnum.FORWARD_ERROR

    def run(cls, **extra):
        module = cls(*args, **kwargs, **extra)
        if forward_error:
            module(*sample.forward_input.args, **sample.forward_input.kwargs)

    expected = _raised(lambda: run(info.module_cls))
    got = _raised(lambda: run(FAST_TWIN[info.module_cls], backend=backend))
    assert expected is not None, "torch.nn accepted this error input"
    assert got is not None, f"fastrnn accepted it; torch.nn raised {expected!r}"
    assert (type(got), str(got)) == (type(expected), str(expected))
    # the error torch's data promises, where the installed torch.nn keeps that promise
    if isinstance(expected, error_input.error_type) and re.search(error_input.error_regex,
                                                                   str(expected)):
        assert isinstance(got, error_input.error_type)
        assert re.search(error_input.error_regex, str(got))
