"""Build and load the native extension (csrc/): JIT with ninja on first use, cached.

``load()`` compiles csrc/ with :func:`torch.utils.cpp_extension.load` into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions/<python>_<cuda>``) once; later
processes reuse the cached library unless a source or flag changed. Concurrent builds of the
same extension wait on cpp_extension's lock in its build directory (an OS-level file lock
in recent torch; older versions used a lock file that a killed build can leave behind, to be
deleted by hand). Sizes and dtypes are
run-time arguments of the kernels, so nothing is ever rebuilt per shape or dtype.

A library built at install time (``FASTRNN_BUILD_EXT=1``, see setup.py) is loaded instead
of a JIT build when present (fastrnn/_native_cpu*.so, fastrnn/_native_cuda*.so); it is not
rebuilt when csrc/ changes, so developers editing csrc/ should use the JIT build.

The CUDA sources are compiled only when a CUDA device is present (or ``cuda=True``); the CPU
and CUDA variants are separate extensions with separate caches. Only one of them may be
loaded into a process (both define the ``fastrnn::native_*`` ops).

Command line (prebuild, e.g. in CI)::

    python -m fastrnn.build            # the variant this machine would use
    python -m fastrnn.build --cuda     # compile AND link the CUDA sources, GPU or not

A failed build raises :class:`BuildError` whose message names what failed, the first
compiler error, the full log's path and how to fix it.

A damaged library (a link killed mid-write, a truncated copy) can crash the process inside
the dynamic loader (SIGBUS), where no exception can be caught. So a library is loaded only
when its SHA-256 matches the digest file written beside it (``<library>.sha256``) after a
build that loaded; one without a digest (built by an older fastrnn) is first loaded in a
child process. A damaged JIT library is deleted and relinked (ninja judges by timestamps,
which such a fault can leave looking current); a damaged prebuilt one raises BuildError.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import List, Optional, Tuple

import torch

CSRC_CANDIDATES = (Path(__file__).resolve().parent / "csrc",          # installed package data
                   Path(__file__).resolve().parent.parent / "csrc")   # source checkout
CPU_SOURCES = ("registration.cpp", "recurrence_cpu.cpp", "quantized.cpp")
CUDA_SOURCES = ("recurrence_cuda.cu",)
HEADERS = ("activations.h", "cells.h", "step.h", "recurrence.h", "scratch.h", "gemv.h",
           "generated/fastrnn_spec.h")
DEFAULT_CUDA_ARCH = "9.0"  # used only when no GPU is visible to detect the arch from

_loaded: Optional[str] = None  # "cpu" or "cuda": the variant loaded into this process
_loaded_path = ""


class BuildError(RuntimeError):
    """The native extension could not be built or loaded; the message says why and what to do."""


def csrc_dir() -> Path:
    for path in CSRC_CANDIDATES:
        if (path / CPU_SOURCES[0]).is_file():
            return path
    raise BuildError("the native sources (csrc/) are not shipped with this installation; "
                     "install fastrnn from a source checkout (pip install -e .) to use the "
                     "native backend")


def cpu_isa() -> Tuple[str, List[str]]:
    """The vector ISA the CPU pointwise loops are compiled for, and its compiler flags.

    The JIT build runs on the machine that uses it, so it targets that machine's vector units
    (the activations in activations.h are vectorised by the compiler: AVX-512 is ~10x faster than
    the SSE2 baseline there). The ISA is part of the extension name, so a cache shared by
    different machines never hands one a library it cannot run. FASTRNN_NATIVE_ISA=default
    forces the portable baseline.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "", []
    wanted = os.environ.get("FASTRNN_NATIVE_ISA", "").lower()
    capability = wanted.upper() if wanted else torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "avx512", ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx2",
                          "-mfma", "-mprefer-vector-width=512"]
    if capability == "AVX2":
        return "avx2", ["-mavx2", "-mfma"]
    return "", []


def extension_name(cuda: bool) -> str:
    isa = cpu_isa()[0]
    return ("fastrnn_native_cuda" if cuda else "fastrnn_native_cpu") + (f"_{isa}" if isa else "")


def _cpp_extension():
    """torch.utils.cpp_extension, imported without the "No CUDA runtime is found, using
    CUDA_HOME=..." warning it logs on import on a machine without a GPU: there that is the
    normal case, and a CUDA build that lacks something says so itself."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    note = lambda record: not str(record.msg).startswith("No CUDA runtime is found")  # noqa
    logger.addFilter(note)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.removeFilter(note)
    return cpp_extension


def file_digest(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def digest_path(library) -> Path:
    return Path(f"{library}.sha256")


def write_digest(library) -> None:
    """Record ``library`` as good (call only after it was built and loaded). Written to a
    temporary file and renamed, so a killed writer leaves no digest rather than a wrong one;
    best effort: where the directory is read-only there is no digest."""
    with contextlib.suppress(OSError):
        _replace(digest_path(library), file_digest(library) + "\n")


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _recorded_digest(library) -> Optional[str]:
    try:
        return digest_path(library).read_text().strip()
    except OSError:
        return None


def _child_load_failure(library) -> Optional[str]:
    """Load ``library`` in a child process: None when it loads, else what went wrong there
    (a damaged library may kill the loading process with a signal)."""
    script = "import sys, torch; torch.ops.load_library(sys.argv[1])"
    if not sys.executable:
        return "it cannot be test-loaded: this Python does not know its executable"
    try:
        result = subprocess.run([sys.executable, "-c", script, str(library)],
                                capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"a test load in a child process failed: {exc}"
    if result.returncode == 0:
        return None
    if result.returncode < 0:
        try:
            name = signal.Signals(-result.returncode).name
        except ValueError:
            name = f"signal {-result.returncode}"
        return f"loading it killed a test process with {name}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    last = lines[-1].strip()[:400] if lines else f"exit code {result.returncode}"
    return f"it does not load: {last}"


def library_damage(library) -> Optional[str]:
    """None when ``library`` is safe to load into this process, else what is wrong with it.

    Safe: its SHA-256 matches the digest recorded after the build that produced it, or, with
    no digest recorded, it loads in a child process (the digest is then recorded).
    """
    recorded = _recorded_digest(library)
    if recorded is not None:
        if file_digest(library) == recorded:
            return None
        return ("truncated or overwritten: its content does not match the digest recorded "
                "when it was built")
    failure = _child_load_failure(library)
    if failure is None:
        write_digest(library)
    return failure


def _build_lock(cpp_extension, build_dir: Path):
    """The lock cpp_extension holds while it builds in ``build_dir``, where it is an OS-level
    file lock (recent torch); older torch's lock file is left to cpp_extension alone."""
    lock = getattr(cpp_extension, "FileLock", None)
    return lock(str(build_dir / "lock")) if lock is not None else contextlib.nullcontext()


def _cuda_include_dirs() -> List[str]:
    """CUDA headers that torch's CUDA wheels ship outside the toolkit (cublas_v2.h, ...)."""
    dirs = []
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
                 str(Path(torch.__file__).resolve().parent.parent)}:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include",
                    "nvidia/cublas/include", "nvidia/cusparse/include"):
            path = Path(base) / sub
            if path.is_dir() and str(path) not in dirs:
                dirs.append(str(path))
    return dirs


def _fix_cuda_home(cpp_extension) -> None:
    """cpp_extension takes CUDA_HOME from the env, else two levels above `which nvcc`; a
    wrapper script such as /usr/local/bin/nvcc then yields /usr/local, which has no CUDA
    libraries to link. Fall back to the standard /usr/local/cuda in that case."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    home = cpp_extension.CUDA_HOME
    has_cudart = home is not None and any(
        (Path(home) / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))
    if not has_cudart and (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"


def _missing_tool_reason(cuda: bool) -> Optional[str]:
    cpp_extension = _cpp_extension()
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (fix: pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler: {compiler!r} not found on PATH (fix: install g++ or clang, "
                "or set CXX)")
    if cuda:
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build; it cannot compile CUDA sources"
        _fix_cuda_home(cpp_extension)
        if cpp_extension.CUDA_HOME is None:
            return "nvcc not found (fix: install the CUDA toolkit or set CUDA_HOME)"
    return None


def _first_error(log: str) -> str:
    """The first compiler or linker diagnostic ("x.cpp:1:2: error: ..."), not cpp_extension's
    "Error building extension" wrapper; else the first line naming an error; else the last."""
    for pattern in (r"\berror:", r"\berror\b"):
        for line in log.splitlines():
            if re.search(pattern, line, re.IGNORECASE):
                return line.strip()[:400]
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1].strip()[:400] if lines else "(no compiler output)"


def _prebuilt_library(cuda: bool) -> Optional[str]:
    """The library setup.py built ahead of time (FASTRNN_BUILD_EXT=1), if any."""
    package = Path(__file__).resolve().parent
    found = sorted(package.glob(f"_native_{'cuda' if cuda else 'cpu'}*.so"))
    return str(found[0]) if found else None


def spec_header() -> str:
    """The C++ tables of fastrnn/spec.py, csrc/generated/fastrnn_spec.h: the Cell enum, cell
    names and gate counts, the workspace column groups, and the option arguments (the op
    schema, parameter / argument lists, Options fields, and whether an option is on; the
    X-macros of _option_macros). Constants and macros only: the step (step.h) includes
    it, and the `::fastrnn::spec::is_on` that its macros call is recurrence.h's."""
    from . import spec
    cells, options = list(spec.CELLS.values()), spec.OPTIONS
    ctype = {"Tensor": "Tensor", "float": "c10::optional<double>"}
    param = {"Tensor": "const c10::optional<Tensor>&", "float": "c10::optional<double>"}
    groups = [(cells.index(c), -1, g) for c in cells for g in c.workspace]
    groups += [(-1, i, g) for i, o in enumerate(options) for g in o.workspace]
    on = [f"::fastrnn::spec::is_on((o).{o.args[0].name})" for o in options]  # option i is on
    lines = [
        "// Generated by fastrnn/build.py from fastrnn/spec.py; do not edit.",
        "#pragma once", "#include <cstdint>",
        "namespace fastrnn {",
        "// The cell kinds, in spec.CELLS order (the ids of the Triton kernels too)",
        "enum class Cell : int { "
        + ", ".join(f"{c.name.upper()} = {i}" for i, c in enumerate(cells)) + " };",
        "namespace spec {",
        f"constexpr double kLayerNormEps = {spec.LAYER_NORM_EPS!r};",
        f"constexpr int kNumCells = {len(cells)};",
        "constexpr const char* kCellNames[kNumCells] = {"
        + ", ".join(f'"{c.name}"' for c in cells) + "};",
        'constexpr const char* kCellList = "' + ", ".join(c.name for c in cells) + '";',
        "constexpr int64_t kNumGates[kNumCells] = {"
        + ", ".join(str(c.num_gates) for c in cells) + "};",
        "// per cell: takes options, carries c, can project (w_hr), has a recurrent gradient of",
        "// its own (not grad_xproj's), passes h_prev to h besides through w_hh",
    ] + [f"constexpr bool k{name}[kNumCells] = {{"
         + ", ".join("true" if test(c) else "false" for c in cells) + "};"
         for name, test in (("CellTakesOptions", lambda c: c.options),
                            ("HasCellState", lambda c: c.has_cell_state),
                            ("HasProjection", lambda c: c.has_projection),
                            ("RecurrentGrad", lambda c: c.recurrent_grad),
                            ("DirectH", lambda c: c.direct_h))] + [
        'constexpr const char* kProjectingCells = "'
        + ", ".join(c.name for c in cells if c.has_projection) + '";',
        "// Workspace column groups, in order: a cell's own (cell >= 0), then each option's",
        "// (option >= 0) when on; h*H + gh*G*H + p*P + one wide; `projected`: with w_hr only.",
        "struct ColumnGroup { const char* name; int cell, option; int64_t h, gh, p, one; "
        "bool projected; };",
        f"constexpr int kNumColumnGroups = {len(groups)};",
        "constexpr ColumnGroup kColumnGroups[kNumColumnGroups] = {",
        "  " + ", ".join(f'{{"{g.name}", {c}, {o}, {g.h}, {g.gh}, {g.p}, {g.one}, '
                         f'{"true" if g.projected else "false"}}}' for c, o, g in groups)
        + "};",
    ] + _option_tables(spec) + [
        "}  // namespace spec",
        "}  // namespace fastrnn",
        "// X(CELL) of every cell kind",
        "#define FASTRNN_CELLS(X) " + " ".join(f"X({c.name.upper()})" for c in cells),
        "// X(group) of every workspace column group (fastrnn/spec.py workspace_layout)",
        "#define FASTRNN_COLUMN_GROUPS(X) " + " ".join(
            f"X({name})" for name in dict.fromkeys(g.name for _, _, g in groups)),
        '#define FASTRNN_OPTIONS_SCHEMA "'
        + ", ".join(f"{a.type}? {a.name}=None" for a in spec.ARGS) + '"',
        "#define FASTRNN_OPTION_PARAMS "
        + ", ".join(f"{param[a.type]} {a.name}" for a in spec.ARGS),
        "#define FASTRNN_OPTION_ARGS " + ", ".join(a.name for a in spec.ARGS),
        "#define FASTRNN_OPTION_FIELDS "
        + " ".join(f"{ctype[a.type]} {a.name};" for a in spec.ARGS),
        "// o.<field> = get(<argument>) for a tensor, the value itself for a float",
        "#define FASTRNN_OPTION_ASSIGN(o, get) "
        + " ".join(f"o.{a.name} = {'get(' + a.name + ')' if a.type == 'Tensor' else a.name};"
                   for a in spec.ARGS),
        "// whether option i of spec.OPTIONS / any option is on in Options o",
        "#define FASTRNN_OPTION_ON(o, i) ("
        + "".join(f"(i) == {i} ? {test} : " for i, test in enumerate(on)) + "false)",
        f"#define FASTRNN_ANY_OPTION(o) ({' || '.join(on)})",
    ] + _option_macros(spec) + [
        "// backward's results: six gradients, then one per learnable option argument",
        '#define FASTRNN_BACKWARD_RETURNS "('
        + ", ".join(["Tensor"] * (6 + len(spec.LEARNABLE))) + ')"',
        "#define FASTRNN_BACKWARD_TUPLE std::tuple<"
        + ", ".join(["Tensor"] * (6 + len(spec.LEARNABLE))) + ">",
    ]
    return "\n".join(lines) + "\n"


def _option_macros(spec) -> List[str]:
    """The X-macros of the options (spec.OPTIONS) that the C++ code expands: the lists of
    option arguments by kind, with their shape rules (products over the sizes G, H, B, P, N
    in scope where a list is expanded), the options the kernels are specialised for, and
    what the argument checks say."""
    options = spec.OPTIONS
    index = {arg.name: i for i, o in enumerate(options) for arg in o.args}
    learnable = {name: i for i, name in enumerate(spec.LEARNABLE)}
    tensors = [a for a in spec.ARGS if a.type == "Tensor"]
    dims = lambda arg: ", ".join(r.replace("*", " * ") for r in arg.shape)  # noqa: E731
    specialised = [o for o in options if o.specialised]
    together = [o for o in options if len(o.args) > 1]
    return [
        "// X(argument, option, dims...) of every tensor option argument: its option's index in",
        "// spec.OPTIONS and its shape, in the sizes G, H, B, P, N",
        "#define FASTRNN_TENSOR_ARGS(X) "
        + " ".join(f"X({a.name}, {index[a.name]}, {dims(a)})" for a in tensors),
        "// X(argument, row width) of the per-row ones ([N, width]): the kernels read a row of",
        "// zeros (row stride 0) where one is absent",
        "#define FASTRNN_ROW_ARGS(X) "
        + " ".join(f"X({a.name}, {dims(a).split(', ', 1)[1]})" for a in tensors
                   if a.shape[0] == "N"),
        "// X(argument, option) of every float option argument: a positive number, +inf in the",
        "// kernels where absent",
        "#define FASTRNN_FLOAT_ARGS(X) "
        + " ".join(f"X({a.name}, {index[a.name]})" for a in spec.ARGS if a.type == "float"),
        "// X(argument, k, dims...) of the learnable ones: backward's gradient k after the six,",
        "// the column sum of per-row gradients [N, dims...] that the kernels write",
        "#define FASTRNN_LEARNABLE_ARGS(X) "
        + " ".join(f"X({name}, {k}, {dims(next(a for a in spec.ARGS if a.name == name))})"
                   for name, k in learnable.items()),
        f"#define FASTRNN_NUM_LEARNABLE {len(spec.LEARNABLE)}",
        "#define FASTRNN_LEARNED(g) " + ", ".join(f"g[{k}]" for k in learnable.values()),
        "// X(option, bit, first argument) of the options the kernels are compiled for on and off",
        "// (OptionsOn; spec::kSpecialisedOfCell, spec::kWholeRows)",
        "#define FASTRNN_SPECIALISED(X) "
        + " ".join(f"X({o.name}, {k}, {o.args[0].name})" for k, o in enumerate(specialised)),
        f"#define FASTRNN_NUM_SPECIALISED {len(specialised)}",
        "// X(\"a and b\", whether they are given together) of the options with several arguments",
        "#define FASTRNN_ARGS_TOGETHER(X, o) "
        + " ".join(f'X("{" and ".join(a.name for a in o.args)}", '
                   + " == ".join(f"::fastrnn::spec::is_on((o).{a.name})" for a in o.args) + ")"
                   for o in together),
        "// X(argument) of the options that need a projection (w_hr)",
        "#define FASTRNN_NEEDS_PROJECTION(X) "
        + " ".join(f"X({o.args[0].name})" for o in options if o.needs_projection),
        "// whether an option that acts on the projected h is on in Options o",
        "#define FASTRNN_ON_PROJECTION(o) (" + " || ".join(
            f"::fastrnn::spec::is_on((o).{o.args[0].name})" for o in options
            if o.on_projection) + ")",
    ]


def _option_tables(spec) -> List[str]:
    """The constants of the options, in namespace fastrnn::spec (see _option_macros)."""
    options, cells = spec.OPTIONS, list(spec.CELLS.values())
    specialised = [o.name for o in options if o.specialised]
    bits = lambda names: sum(1 << specialised.index(n)  # noqa: E731
                             for n in names if n in specialised)
    return [
        "// bits (FASTRNN_SPECIALISED) of each cell's specialised options / of those that need",
        "// each step's rows whole (the layer norms)",
        "constexpr unsigned kSpecialisedOfCell[kNumCells] = {"
        + ", ".join(str(bits([o.name for o in c.options])) for c in cells) + "};",
        f"constexpr unsigned kWholeRows = {bits([o.name for o in options if o.whole_rows])};",
        "// bit c: cell c takes option i (spec.OPTIONS order)",
        f"constexpr unsigned kOptionCells[{len(options)}] = {{" + ", ".join(
            str(sum(1 << i for i, c in enumerate(cells) if c.name in o.cells))
            for o in options) + "};",
        'constexpr const char* kOptionsOfCells = "' + "; ".join(
            f"{c.name} options: " + ", ".join(a.name for o in c.options for a in o.args)
            for c in cells if c.options) + '";',
    ]


def write_spec_header(directory) -> Path:
    """Writes fastrnn_spec.h into ``directory`` unless it is there already, unchanged (the
    checked-in csrc/generated/ copy: a source checkout whose spec changed regenerates it);
    returns its path."""
    path = Path(directory) / "fastrnn_spec.h"
    text = spec_header()
    if not path.is_file() or path.read_text() != text:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _replace(path, text)
        except OSError as exc:
            raise BuildError(f"{path} does not match fastrnn/spec.py and cannot be rewritten "
                             f"({exc})") from exc
    return path


def _headers_digest(src: Path) -> str:
    """cpp_extension re-versions a build when its sources or flags change, not its headers:
    pass a digest of the headers as a flag so a header edit is a new build too."""
    digest = hashlib.sha1()
    for header in HEADERS:
        digest.update((src / header).read_bytes())
    return digest.hexdigest()[:16]


def load(cuda: Optional[bool] = None, verbose: bool = False) -> str:
    """Build (if needed) and load the extension; return the loaded library's path.

    ``cuda=None`` picks the CUDA variant when a CUDA device is present.
    """
    global _loaded, _loaded_path
    if cuda is None:
        cuda = torch.cuda.is_available()
    variant = "cuda" if cuda else "cpu"
    if _loaded == variant:
        return _loaded_path
    if _loaded is not None:
        raise BuildError(f"the {_loaded} variant of the native extension is already loaded "
                         f"in this process; the {variant} variant cannot be loaded too")
    prebuilt = _prebuilt_library(cuda)
    if prebuilt is not None:
        fix = ("(fix: reinstall fastrnn with FASTRNN_BUILD_EXT=1 against this torch, or delete "
               "the file to build on first use)")
        damage = library_damage(prebuilt)
        if damage is not None:
            raise BuildError(f"the prebuilt native library {prebuilt} cannot be loaded: {damage} "
                             + fix)
        try:
            torch.ops.load_library(prebuilt)
        except Exception as exc:  # e.g. built against another torch: say so, do not guess
            raise BuildError(f"the prebuilt native library {prebuilt} does not load: {exc} "
                             + fix) from exc
        _loaded, _loaded_path = variant, prebuilt
        return prebuilt
    reason = _missing_tool_reason(cuda)
    if reason is not None:
        raise BuildError(f"cannot build the native {variant} extension: {reason}")
    cpp_extension = _cpp_extension()

    src = csrc_dir()
    sources = [str(src / f) for f in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    name = extension_name(cuda)
    build_dir = Path(cpp_extension._get_build_directory(name, verbose))
    if cuda and not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to read the arch from: pick one explicitly rather than fail detection.
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
    library = build_dir / f"{name}.so"  # where cpp_extension links it (first load in a process)
    damage = None
    if library.exists():
        with _build_lock(cpp_extension, build_dir):
            if library.exists():
                damage = library_damage(library)
            if damage is not None:  # ninja would load it as it is: delete it to be relinked
                library.unlink()
                with contextlib.suppress(OSError):
                    digest_path(library).unlink()
    if damage is not None:
        print(f"fastrnn: the cached native {variant} library {library} is damaged ({damage}); "
              "rebuilding it...", file=sys.stderr)
    elif not any(build_dir.glob(f"{name}*.so")):
        print(f"fastrnn: compiling the native {variant} kernels into {build_dir} (first use "
              f"only; takes {'a few minutes' if cuda else 'about a minute'})...", file=sys.stderr)
    log_path = build_dir / "fastrnn_build_error.log"
    write_spec_header(src / "generated")
    digest = _headers_digest(src)
    try:
        path = cpp_extension.load(
            name=name,
            sources=sources,
            # -fno-trapping-math/-fno-math-errno (as torch itself is built) let the compiler
            # vectorise the branch-free float activations of activations.h.
            extra_cflags=["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno",
                          f"-DFASTRNN_HEADERS={digest}"] + cpu_isa()[1],
            extra_cuda_cflags=["-O3", f"-DFASTRNN_HEADERS={digest}"],
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(src)] + (_cuda_include_dirs() if cuda else []),
            with_cuda=cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except Exception as exc:  # compiler/linker/loader failure: keep the log, say where
        text = f"{type(exc).__name__}: {exc}"
        try:
            log_path.write_text(text)
            where = f"full log: {log_path}"
        except OSError:
            where = "full log could not be written; rerun `python -m fastrnn.build -v`"
        raise BuildError(f"building the native {variant} extension '{name}' failed: "
                         f"{_first_error(text)} ({where}; rebuild and see the compiler output "
                         f"with `python -m fastrnn.build{' --cuda' if cuda else ''} -v`)") from exc
    if _recorded_digest(path) != file_digest(path):
        write_digest(path)
    _loaded, _loaded_path = variant, path
    return path


_module = None


def python_module():
    """The loaded library (``load()``) as a Python module: its pybind11 functions, the layer
    ops' direct entries (csrc/quantized.cpp). None where the library has none (a prebuilt one
    from an older fastrnn): the callers then use the registered ops."""
    global _module
    if _module is None:
        import importlib.util
        path = load()
        # the module's name is the library's own (TORCH_EXTENSION_NAME, versions included)
        spec = importlib.util.spec_from_file_location(Path(path).name.split(".")[0], path)
        try:
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except ImportError:
            module = False
        _module = module
    return _module or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.build", description=__doc__.split("\n")[0])
    parser.add_argument("--cuda", action="store_true",
                        help="compile and link the CUDA sources even without a GPU")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler output")
    args = parser.parse_args(argv)
    cuda = True if args.cuda else None
    start = time.perf_counter()
    try:
        path = load(cuda=cuda, verbose=args.verbose)
    except BuildError as exc:
        print(f"fastrnn.build: {exc}", file=sys.stderr)
        return 1
    ops = [n for n in ("native_forward", "native_backward") if hasattr(torch.ops.fastrnn, n)]
    print(f"fastrnn.build: loaded {path} ({', '.join(ops)}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
