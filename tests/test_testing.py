"""fastrnn.testing: the tolerance rule every parity test uses. It must pass correct results
whatever their machine-dependent rounding, and fail wrong ones."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from fastrnn import testing


def lstm_results(module, x, grad):
    """Output and input gradient of an LSTM (torch.nn or fastrnn) under an upstream gradient."""
    x = x.detach().requires_grad_()
    out = module(x)[0]
    (dx,) = torch.autograd.grad(out, x, grad)
    return [out.detach(), dx]


@pytest.fixture(scope="module")
def lstm_case():
    """A float32 torch.nn LSTM, fastrnn's twin, and the float64 truth of both."""
    torch.manual_seed(0)
    ref = nn.LSTM(5, 7)
    fast = fastrnn.LSTM(5, 7, backend="reference")
    fast.load_state_dict(ref.state_dict())
    x, grad = torch.randn(9, 3, 5), torch.randn(9, 3, 7)
    truth = lstm_results(copy.deepcopy(ref).double(), testing.to_float64(x),
                         testing.to_float64(grad))
    return lstm_results(fast, x, grad), lstm_results(ref, x, grad), truth


def test_correct_kernel_passes(lstm_case):
    actual, baseline, truth = lstm_case
    testing.assert_all_close(actual, baseline, truth, "lstm")


@pytest.mark.parametrize("which", [0, 1], ids=["output", "grad"])
@pytest.mark.parametrize("delta", [1e-3, 1e-5])
def test_one_element_off_fails(lstm_case, which, delta):
    """One element off by 1e-3 (or 1e-5, the old fixed bound) is caught."""
    actual, baseline, truth = lstm_case
    wrong = [t.clone() for t in actual]
    wrong[which].view(-1)[17] += delta
    verdict = testing.check_all(wrong, baseline, truth, "lstm")
    assert not verdict.ok and f"lstm {which}" in verdict.message


def test_error_within_twice_the_baseline_passes():
    """A result as far from the truth as the baseline (other side) passes where a fixed
    1e-5 bound would not: the rule follows torch's own rounding."""
    truth = torch.linspace(-1, 1, 11, dtype=torch.float64)
    baseline = (truth + 1.2e-5).float()
    actual = (truth - 1.2e-5).float()
    assert (actual.double() - baseline.double()).abs().max() > 2e-5
    testing.assert_close(actual, baseline, truth)
    verdict = testing.check((truth - 4e-5).float(), baseline, truth)
    assert not verdict.ok and verdict.baseline_error == pytest.approx(1.2e-5, rel=0.01)


def test_floor_allows_a_few_ulps_when_the_baseline_is_exact():
    truth = torch.linspace(-1, 1, 9, dtype=torch.float64)   # scale 1: errors are absolute
    exact = truth.float()
    for dtype, ulps in testing.FLOOR_ULPS.items():
        eps = torch.finfo(dtype).eps
        testing.assert_close(exact.to(dtype) + (ulps - 1) * eps, exact.to(dtype), truth)
        assert not testing.check(exact.to(dtype) + (ulps + 2) * eps, exact.to(dtype), truth).ok


def test_float64_is_absolute():
    expected = torch.randn(4, 3, dtype=torch.float64) * 10
    testing.assert_close(expected + 1e-10, expected)          # scale 10: 1e-10 relative
    verdict = testing.check(expected + 1e-8, expected)
    assert not verdict.ok and "float64" in verdict.message


def test_bad_arguments():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="float64 truth"):
        testing.check(x, x)
    with pytest.raises(ValueError, match="must be float64"):
        testing.check(x, x, x)
    assert not testing.check(x, torch.zeros(4)).ok
    assert not testing.check(x.double(), x).ok
    nan = torch.tensor([0.0, float("nan"), 0.0])
    assert not testing.check(nan, x, x.double()).ok
    assert testing.check(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.float64)).ok
    assert not testing.check_all([x, None], [x, x], [x.double(), x.double()]).ok


def test_to_float64_keeps_structure_and_leaves():
    seqs = [torch.randn(n, 2) for n in (3, 1)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    h = torch.randn(2, 4).requires_grad_()
    value = {"x": packed, "state": (h, torch.ones(2, dtype=torch.long)), "p": 0.5}
    out = testing.to_float64(value)
    assert out["x"].data.dtype == torch.float64
    assert torch.equal(out["x"].batch_sizes, packed.batch_sizes)
    assert torch.equal(out["x"].unsorted_indices, packed.unsorted_indices)
    h64, index = out["state"]
    assert h64.dtype == torch.float64 and h64.requires_grad and h64.is_leaf
    assert torch.equal(h64, h.double()) and index.dtype == torch.long and out["p"] == 0.5
