"""Compile the backend's kernels for a CUDA target without a GPU (ahead of time).

The interpreter runs kernels as Python, so it cannot see what only the compiler rejects
(non-constexpr globals, names defined in a branch, dot shapes) nor report registers and
spills. This compiles kernel variants to cubin with the ptxas bundled in the triton wheel:

    python -m fastrnn.backends.triton.compile_check            # a representative subset
    python -m fastrnn.backends.triton.compile_check --all -v   # every variant, ptxas -v

Run it without TRITON_INTERPRET in the environment (kernels are built at import).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import persistent, step
from ...spec import ARGS, CELLS, LEARNABLE, TENSOR_FIELDS
from ._gates import CELL_IDS, option_bits

_INTS = {"n", "H", "P", "T", "B", "WS_STRIDE", "LN_OFF", "LNC_OFF", "P_OFF"}
_FLOATS = {arg.name for arg in ARGS if arg.type == "float"}   # the options' float arguments
_INT32_POINTERS = {"bs_ptr", "off_ptr"}
# arguments that are float32 whatever the input dtype (states, workspace, partial sums)
_FLOAT32_POINTERS = step.FLOAT32_POINTERS | {"ws_ptr", "dw_ptr", "db_ptr", "dwr_ptr"}


def _signature(fn, dtype, constexprs):
    def kind(name):
        if name in constexprs:
            return "constexpr"
        if name == "opt":   # the option tensors, input dtype; their per-row gradients float32
            return tuple("*" + dtype for _ in TENSOR_FIELDS)
        if name == "grads":
            return tuple("*fp32" for _ in LEARNABLE)
        if name in _INTS:
            return "i32"
        if name in _FLOATS:
            return "fp32"
        if name in _INT32_POINTERS:
            return "*i32"
        return "*fp32" if name in _FLOAT32_POINTERS else "*" + dtype
    return {name: kind(name) for name in fn.arg_names}


def compile_kernel(kernel, dtype, constexprs, num_warps, arch=90):
    """-> the compiled kernel (raises triton.compiler.errors.CompilationError)."""
    fn = kernel.fn if type(kernel).__name__ == "Autotuner" else kernel
    src = ASTSource(fn=fn, signature=_signature(fn, dtype, constexprs), constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def ptxas_usage(compiled, arch=90):
    """Registers and spills of a compiled kernel, as ptxas -v reports them."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        out = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", f.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    return "; ".join(line.split("info    : ")[-1].strip() for line in out.splitlines()
                     if "registers" in line or "spill" in line)


def variants(everything):
    """(name, kernel, dtype, constexprs, num_warps) to compile."""
    cells = list(CELL_IDS) if everything else [c for c in CELL_IDS if CELLS[c].options]
    block_b, block_h, step_warps = step._blocks(64, 512)  # the tile of a large step
    dtypes = ["fp32", "bf16", "fp16"] if everything else ["bf16"]
    for dtype in dtypes:
        for cell in cells:
            cid = CELL_IDS[cell]
            projs = [False, True] if CELLS[cell].has_projection else [False]
            for proj in projs:
                yield (f"step forward {cell}{' proj' if proj else ''} {dtype}",
                       step._step_forward_kernel, dtype,
                       dict(CELL=cid, HAS_BIAS=True, HAS_PROJ=proj, BLOCK_B=block_b,
                            BLOCK_H=block_h, OPTIONS=0),
                       step_warps)
            yield (f"step backward {cell} {dtype}", step._step_backward_kernel, dtype,
                   dict(CELL=cid, ADD_DOUT=True, STORE_DHH=True, BLOCK_B=block_b,
                        BLOCK_H=block_h, OPTIONS=0),
                   step_warps)
            if CELLS[cell].options:
                yield from _option_variants(cell, cid, dtype, everything)
            # largest tiles that fit (everything), else small ones: compile time grows fast
            hidden = (128 if CELLS[cell].num_gates == 1 else 64) if everything else 32
            shapes = [(hidden, hidden, False)]
            if CELLS[cell].has_projection:
                shapes = shapes + [(32, 16, True)] if everything else [(32, 16, True)]
            for h_tile, p_tile, proj in shapes:
                shape = f"H={h_tile}{f' P={p_tile}' if proj else ''}"
                for warps in ([8, 16] if everything else [8]):
                    yield (f"persistent forward {cell} {shape} {dtype} warps={warps}",
                           persistent._persistent_forward_kernel, dtype,
                           dict(CELL=cid, HAS_BIAS=True, HAS_PROJ=proj, REVERSE=False,
                                BLOCK_B=persistent.BLOCK_B, BLOCK_H=h_tile, BLOCK_P=p_tile),
                           warps)
                    yield (f"persistent backward {cell} {shape} {dtype} warps={warps}",
                           persistent._persistent_backward_kernel, dtype,
                           dict(CELL=cid, HAS_PROJ=proj, REVERSE=True,
                                BLOCK_B=persistent.BLOCK_B, BLOCK_H=h_tile, BLOCK_P=p_tile),
                           warps)


def _option_variants(cell, cid, dtype, everything):
    """The step kernels with every option of the cell on (layer norm: whole rows per
    program), at H=512 and, with ``everything``, also H=2048; the projection
    epilogue / prologue kernels once per dtype (a cell that can project)."""
    takes = tuple(option.name for option in CELLS[cell].options)
    for hidden in ([512, 2048] if everything else [512]):
        block_b, block_h, warps = step._blocks(64, hidden, whole_rows=True)
        tile = dict(BLOCK_B=block_b, BLOCK_H=block_h)
        for proj in ([False, True] if CELLS[cell].has_projection else [False]):
            yield (f"step forward {cell}{' proj' if proj else ''} all options H={hidden} "
                   f"{dtype}", step._step_forward_kernel, dtype,
                   dict(CELL=cid, HAS_BIAS=True, HAS_PROJ=proj, **tile,
                        OPTIONS=step.step_bits(takes, proj)), warps)
        yield (f"step backward {cell} all options H={hidden} {dtype}",
               step._step_backward_kernel, dtype,
               dict(CELL=cid, ADD_DOUT=True, STORE_DHH=True, **tile,
                    OPTIONS=step.step_bits(takes, False)),
               warps)
    if CELLS[cell].has_projection:
        block_b, block_h, warps = step._blocks(64, 512)
        tile = dict(BLOCK_B=block_b, BLOCK_H=block_h)
        yield (f"step projection epilogue {dtype}", step._proj_epilogue_kernel, dtype,
               dict(OPTIONS=option_bits(takes), **tile), warps)
        yield (f"step projection prologue {dtype}", step._proj_prologue_kernel, dtype,
               dict(OPTIONS=option_bits(takes), **tile), warps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every cell, dtype and warp count")
    parser.add_argument("-v", "--verbose", action="store_true", help="ptxas registers/spills")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    if type(step._step_forward_kernel).__name__ == "InterpretedFunction":
        parser.error("the kernels were built for the interpreter: unset TRITON_INTERPRET")
    for name, kernel, dtype, constexprs, warps in variants(args.all):
        compiled = compile_kernel(kernel, dtype, constexprs, warps, args.arch)
        usage = f"  [{ptxas_usage(compiled, args.arch)}]" if args.verbose else ""
        print(f"ok  {name}  shared={compiled.metadata.shared}{usage}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
