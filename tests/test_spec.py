"""fastrnn.spec is the one source of the options' plumbing: the module side, the native
header and the Triton constexprs read it, so an option declared there reaches every layer
without code of its own. These tests fail when a layer misses one."""

import pytest
import torch

import fastrnn
from fastrnn import spec
from fastrnn.nn import options

from backend_cases import native_available_mark

# Every keyword on (values that turn its option on), per module class.
ALL_ON = dict(layer_norm=True, recurrent_dropout=0.25, zoneout=0.3, cell_clip=2.0,
              proj_clip=2.0, recurrent_grad_clip=1.0, peephole=True)


def _module(cell, proj):
    kwargs = {k: v for k, v in ALL_ON.items()
              if any(k == keyword.name and cell in keyword.cells for keyword in spec.KEYWORDS)}
    if proj:
        return fastrnn.LSTM(3, 5, proj_size=4, **kwargs).train()
    kwargs.pop("proj_clip", None)
    return {"lstm": fastrnn.LSTM, "gru": fastrnn.GRU}[cell](3, 5, **kwargs).train()


@pytest.mark.parametrize("cell,proj", [("lstm", False), ("lstm", True), ("gru", False)])
def test_every_option_of_a_cell_is_turned_on_by_its_keywords(cell, proj):
    module = _module(cell, proj)
    expected = tuple(o.name for o in spec.CELLS[cell].options if proj or not o.needs_projection)
    assert options.option_names(module) == expected
    get = lambda stem: getattr(module, f"{stem}_l0")  # noqa: E731
    width = 4 if proj else 5
    mask = torch.ones(2, width)
    zoneout_h, zoneout_c = options.zoneout_weights(module, 6, width, 5, mask)
    step = options.step_options(module, get, mask, zoneout_h, zoneout_c)
    assert step.option_names() == expected
    for name in expected:   # a parameter passed is the module's own tensor, not a copy
        for arg in next(o for o in spec.OPTIONS if o.name == name).args:
            assert getattr(step, arg.name) is not None
    assert step.peephole is (module.weight_peephole_l0 if cell == "lstm" else None)


def test_no_keyword_on_is_no_options():
    module = fastrnn.LSTM(3, 5).train()
    assert options.option_names(module) == ()
    assert options.step_options(module, None, None, None, None) is None


def test_keywords_name_op_arguments_of_their_cells():
    """What a keyword turns into are op arguments of a cell that takes the keyword."""
    for keyword in spec.KEYWORDS:
        fed = [(p.arg, p.cells) for p in keyword.parameters if p.arg]
        fed += [(arg, keyword.cells) for arg in keyword.drawn + (keyword.value_arg,) if arg]
        for arg, cells in fed:   # zoneout's zoneout_c: lstm's only
            assert any(arg in spec.OPTION_FIELDS[cell] for cell in cells), (keyword.name, arg)
    fed = {p.arg for k in spec.KEYWORDS for p in k.parameters} | {
        arg for k in spec.KEYWORDS for arg in k.drawn + (k.value_arg,)}
    assert {o.args[0].name for o in spec.OPTIONS} <= fed   # every option can be turned on


def test_module_draws_exactly_the_drawn_arguments():
    """The module's draw rules (nn/options._DRAWN) and the spec's drawn arguments name the
    same op arguments: a drawn argument the module did not draw would never be turned on."""
    assert set(options._DRAWN) == {arg for k in spec.KEYWORDS for arg in k.drawn}


def test_triton_kernels_read_the_options_from_the_spec():
    """The Triton kernels name no option in their signatures: they take the OPTIONS bit mask,
    the ``opt`` tuple of every tensor option argument and (backward) the ``grads`` tuple of
    the learnable ones' per-row gradients, in spec order."""
    step = pytest.importorskip("fastrnn.backends.triton.step")
    from fastrnn.backends.triton import _gates
    kernels = (step._step_forward_kernel, step._step_backward_kernel,
               step._proj_epilogue_kernel, step._proj_prologue_kernel)
    flags = {option.name.upper() for option in spec.OPTIONS}
    for kernel in kernels:
        assert {"OPTIONS", "opt"} <= set(kernel.arg_names)
        assert not flags & set(kernel.arg_names), kernel
        assert not [name for name in kernel.arg_names if name.endswith("_ptr")
                    and any(arg.name in name for arg in spec.ARGS)], kernel
    assert "grads" in step._step_backward_kernel.arg_names
    names = [option.name for option in spec.OPTIONS]
    assert _gates.option_bits(("peephole", "zoneout_h")) == \
        (1 << names.index("peephole")) | (1 << names.index("zoneout_h"))
    # with a projection, the options on the projected h leave the step kernels
    assert step.step_bits(("peephole", "zoneout_h", "proj_clip"), proj=True) == \
        _gates.option_bits(("peephole",))
    # one step's ``opt``: per-row arguments sliced to its rows, per-state ones to its live
    # states, the others whole, a dummy where absent
    dummy = torch.empty(0)
    options = spec.StepOptions(zoneout_h=torch.ones(6, 5), recurrent_mask=torch.ones(3, 5),
                               peephole=torch.ones(15))
    opt = step._option_tensors(options, slice(2, 4), 2, dummy)
    assert len(opt) == len(spec.TENSOR_FIELDS)
    place = spec.TENSOR_FIELDS.index
    assert opt[place("zoneout_h")].shape == (2, 5)
    assert opt[place("recurrent_mask")].shape == (2, 5)
    assert opt[place("peephole")] is options.peephole
    assert all(opt[place(name)] is dummy for name in spec.TENSOR_FIELDS
               if getattr(options, name) is None)


def test_generated_header_has_the_cell_tables():
    """The native loop reads what a cell carries and does from the spec's cell table."""
    from fastrnn import build
    header = build.spec_header()
    for table, has in (("HasCellState", lambda c: c.has_cell_state),
                       ("HasProjection", lambda c: c.has_projection),
                       ("RecurrentGrad", lambda c: c.recurrent_grad),
                       ("DirectH", lambda c: c.direct_h)):
        values = ", ".join("true" if has(c) else "false" for c in spec.CELLS.values())
        assert f"constexpr bool k{table}[kNumCells] = {{{values}}};" in header
    projected = " || ".join(f"::fastrnn::spec::is_on((o).{o.args[0].name})"
                            for o in spec.OPTIONS if o.on_projection)
    assert f"#define FASTRNN_ON_PROJECTION(o) ({projected})" in header


def test_generated_header_lists_every_option_argument():
    from fastrnn import build
    header = build.spec_header()
    line = lambda macro: next(l for l in header.splitlines()  # noqa: E731
                              if l.startswith(f"#define {macro}("))
    for arg in spec.ARGS:
        kind = "FASTRNN_TENSOR_ARGS" if arg.type == "Tensor" else "FASTRNN_FLOAT_ARGS"
        assert f"X({arg.name}, " in line(kind)
        assert (f"X({arg.name}, " in line("FASTRNN_LEARNABLE_ARGS")) == arg.learnable
    for option in spec.OPTIONS:
        assert (f"X({option.name}, " in line("FASTRNN_SPECIALISED")) == option.specialised


@native_available_mark()
@pytest.mark.parametrize("cell,arg", [("gru", "peephole"), ("gru", "cell_clip"),
                                      ("rnn_tanh", "zoneout_h")])
def test_native_refuses_an_option_of_another_cell(cell, arg):
    from backend_cases import make_case
    case = make_case(cell, proj=False, batch=2, lengths=[2, 1])
    shapes = {"peephole": (3 * 5,), "zoneout_h": (3, 5)}
    value = 1.0 if arg == "cell_clip" else torch.zeros(shapes[arg], dtype=case["xproj"].dtype)
    with pytest.raises(RuntimeError, match=f"{arg} is not an option of {cell}.*lstm options: "):
        torch.ops.fastrnn.native_forward(
            cell, case["xproj"], case["h0"], None, case["w_hh"], None, None,
            case["batch_sizes"], False, *spec.StepOptions(**{arg: value}))


def test_only_the_cell_math_names_a_cell_kind():
    """A cell kind's math is one file per language (csrc/cells.h, triton/_gates.py): the
    generic step and loop in C++ and the Triton kernels name no cell kind, only the spec's
    per-cell fields, so adding one does not touch them (docs/extending.md)."""
    import ast
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cells = "|".join(name.upper() for name in spec.CELLS)
    for name in ("step.h", "recurrence.h", "recurrence_cpu.cpp", "recurrence_cuda.cu"):
        text = (root / "csrc" / name).read_text()
        assert not re.search(rf"Cell::({cells})\b", text), name
    for name in ("step.py", "persistent.py"):
        tree = ast.parse((root / "fastrnn" / "backends" / "triton" / name).read_text())
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 for alias in node.names}
        assert not used & {name.upper() for name in spec.CELLS}, name
