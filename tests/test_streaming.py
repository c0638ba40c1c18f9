"""Streaming inference: a model run frame by frame (or in small chunks), carrying its state
from call to call, gives the results of the same frames run as one sequence; and a call after
the weights changed (optimizer step, assignment, load_state_dict, dtype change) uses the new
weights, compared with torch.nn each time.

The native CPU kernels run batches up to gemv::kMaxRows rows with matrix-vector products on
the weights as stored (csrc/gemv.h) and larger ones with MKL's packed GEMM; both are tested.
"""
import copy

import pytest
import torch
from torch import nn

import fastrnn
from fastrnn import backends
from fastrnn.testing import assert_all_close, to_float64

from backend_cases import check_backend, make_case, native_available_mark

native = backends.get("native")
pytestmark = native_available_mark()

CELL_CASES = [("lstm", 0), ("lstm", 7), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]
CELL_IDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]
MODULES = {"lstm": ("LSTM", {}), "gru": ("GRU", {}), "rnn_tanh": ("RNN", {}),
           "rnn_relu": ("RNN", {"nonlinearity": "relu"})}


def stream_op(cell, case, chunk):
    """The native forward over case's rows, `chunk` steps per call, the state carried."""
    batch, rows = case["h0"].shape[0], case["xproj"].shape[0]
    h, c, outputs = case["h0"], case["c0"], []
    for start in range(0, rows, chunk * batch):
        output, h, c, _ = native.forward(cell, case["xproj"][start:start + chunk * batch], h, c,
                                         case["w_hh"], case["b_hh"], case["w_hr"], None, False,
                                         need_workspace=False)
        outputs.append(output)
    return torch.cat(outputs), h, c


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("batch", [1, 4, 8, 9])
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_chunks_give_the_bits_of_one_sequence(cell, proj, batch, chunk, dtype):
    """The same steps with the same arithmetic: the same bits, however the frames are split
    into calls (batch 9 runs MKL's packed GEMM, the others the matrix-vector products)."""
    case = make_case(cell, hidden=37, proj=proj, batch=batch, steps=32, dtype=dtype)
    whole = stream_op(cell, case, 32)
    streamed = stream_op(cell, case, chunk)
    for name, a, b in zip(("output", "h_n", "c_n"), streamed, whole):
        if b is not None:
            assert torch.equal(a, b), f"{cell} batch {batch} chunk {chunk}: {name} differs"


@pytest.mark.parametrize("batch", [1, 3, 8, 9])
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_small_batches_match_reference(cell, proj, batch):
    """Forward and backward around the switch between the two GEMM strategies, hidden sizes
    off the vector width (the products' tails), float32 by the tolerance rule."""
    for reverse in (False, True):
        check_backend(native, cell, make_case(cell, hidden=53, proj=proj and 29, batch=batch,
                                              steps=5, dtype=torch.float32), reverse)


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_thread_count_does_not_change_bits(cell, proj):
    case = make_case(cell, hidden=300, proj=proj and 100, batch=2, steps=3, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(stream_op(cell, case, 3))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert a is None or torch.equal(a, b)


def module_pair(cell, proj, dtype=torch.float32, backend="native"):
    name, kwargs = MODULES[cell]
    if proj:
        kwargs = dict(kwargs, proj_size=proj)
    torch.manual_seed(0)
    reference = getattr(nn, name)(24, 20, **kwargs).to(dtype)
    module = getattr(fastrnn, name)(24, 20, backend=backend, **kwargs).to(dtype)
    module.load_state_dict(reference.state_dict())
    return module, reference


def stream_module(module, x, chunk):
    outputs, state = [], None
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            output, state = module(x[start:start + chunk], state)
            outputs.append(output)
    return torch.cat(outputs), state


def flat(result):
    """A module's (output, state) as a list of tensors."""
    output, state = result
    return [output, *(state if isinstance(state, tuple) else (state,))]


def check_stream(module, reference, x, chunk):
    """`module` streamed in chunks against torch.nn run on the whole sequence (the truth:
    torch.nn in float64 on the same weights and input)."""
    actual = stream_module(module, x, chunk)
    with torch.no_grad():
        expected = reference(x)
        truth = copy.deepcopy(reference).double()(to_float64(x))
    assert_all_close(flat(actual), flat(expected), flat(truth) if x.dtype != torch.float64
                     else None, f"chunk {chunk}")


@pytest.mark.parametrize("backend", ["native", "auto"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_module_streaming_matches_torch_nn(cell, proj, batch, chunk, backend):
    module, reference = module_pair(cell, proj, backend=backend)
    x = torch.randn(16, batch, 24)
    check_stream(module, reference, x, chunk)


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_inference_mode_streams_like_no_grad(cell, proj):
    module, _ = module_pair(cell, proj)
    x = torch.randn(6, 2, 24)
    expected = stream_module(module, x, 1)
    outputs, state = [], None
    with torch.inference_mode():
        for frame in x.split(1):
            output, state = module(frame, state)
            outputs.append(output)
    for a, b in zip(flat((torch.cat(outputs), state)), flat(expected)):
        assert torch.equal(a, b)


def sgd_step(module, x):
    """One training step (forward with autograd, backward, in-place SGD update)."""
    module.train()
    output, _ = module(x)
    output.square().mean().backward()
    with torch.no_grad():
        for p in module.parameters():
            p -= 0.5 * p.grad
            p.grad = None


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_weight_changes_between_calls_are_seen(cell, proj):
    """Every way weights change between streaming calls: an optimizer step (in place, in
    training), an in-place edit under no_grad, a new Parameter, load_state_dict (copies in
    place) and a dtype change. After each, the streamed result is torch.nn's with the same
    weights."""
    module, reference = module_pair(cell, proj)
    x = torch.randn(8, 1, 24)
    check_stream(module, reference, x, 1)

    sgd_step(module, torch.randn(5, 2, 24))
    reference.load_state_dict(module.state_dict())
    check_stream(module, reference, x, 1)

    with torch.no_grad():
        module.weight_hh_l0.mul_(-1.5)
        reference.weight_hh_l0.mul_(-1.5)
    check_stream(module, reference, x, 4)

    fresh = torch.randn_like(module.weight_hh_l0) * 0.2
    module.weight_hh_l0 = nn.Parameter(fresh.clone())
    reference.weight_hh_l0 = nn.Parameter(fresh.clone())
    check_stream(module, reference, x, 1)

    torch.manual_seed(1)
    other = module_pair(cell, proj)[1]
    for p in other.parameters():
        nn.init.uniform_(p, -0.4, 0.4)
    module.load_state_dict(other.state_dict())
    check_stream(module, other, x, 1)

    module, other = module.double(), other.double()
    check_stream(module, other, x.double(), 1)


@pytest.mark.parametrize("cell,proj", [("lstm", 7), ("gru", 0)], ids=["lstm_proj", "gru"])
def test_streaming_copies_and_compiles(cell, proj):
    """deepcopy, a pickle round trip (state_dict keys unchanged) and
    torch.compile(fullgraph=True) of a module streamed before: all give torch.nn's results."""
    import io
    import pickle
    module, reference = module_pair(cell, proj)
    x = torch.randn(4, 1, 24)
    keys = list(module.state_dict())
    stream_module(module, x, 1)
    assert list(module.state_dict()) == keys == list(reference.state_dict())
    copied = copy.deepcopy(module)
    buffer = io.BytesIO()
    pickle.dump(module, buffer)
    loaded = pickle.loads(buffer.getvalue())
    for twin in (copied, loaded):
        check_stream(twin, reference, x, 1)
    compiled = torch.compile(module, fullgraph=True, dynamic=False)
    check_stream(compiled, reference, x, 1)


@pytest.mark.parametrize("cell,proj", CELL_CASES, ids=CELL_IDS)
def test_inference_call_without_dispatcher_equals_the_op(cell, proj):
    """fastrnn.ops.recurrence runs a plain inference call without the dispatcher: the same
    bits as the registered op; and under a dispatch mode (as tracers and FakeTensor use) the
    call goes through the op, so the mode sees it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from fastrnn import ops

    case = make_case(cell, hidden=21, proj=proj and 9, batch=2, steps=3, dtype=torch.float32)
    args = (case["xproj"], case["h0"], case["c0"], case["w_hh"], case["b_hh"], case["w_hr"],
            None, False, "native")
    with torch.no_grad():
        direct = ops.recurrence(cell, *args)
        through_op = getattr(torch.ops.fastrnn, f"{cell}_forward")(*args, need_workspace=False)
    for a, b in zip(direct, through_op):
        assert a is None or torch.equal(a, b)

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Log() as log:
        ops.recurrence(cell, *args)
    assert any(f"fastrnn.{cell}_forward" in name for name in log.seen), log.seen
