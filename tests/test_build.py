"""Loading the native library (fastrnn/build.py): quiet, and safe when the library on disk is
damaged. A truncated library whose timestamp still looks current (a link killed mid-write)
kills the process with SIGBUS inside the dynamic loader, so it must never be loaded: it is
relinked, or, when it cannot be, ``auto`` falls back with one warning and
``backend="native"`` raises.

Each case runs in a child process (a signal must not kill pytest) on a private copy of this
session's JIT build cache, so no case compiles from scratch (a relink takes seconds).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastrnn import build

from backend_cases import native_available_mark

pytestmark = native_available_mark()

# For each argument: "auto" prints the backend auto picks for a call; "native" runs a GRU on
# the native backend against torch.nn and prints whether they agree, or the error it raises.
CHILD = """
import sys
import torch
import fastrnn
from fastrnn import backends
for mode in sys.argv[1:]:
    if mode == "auto":
        print(backends.resolve("auto", "gru", torch.device("cpu"), torch.float64, 4))
        continue
    gru = fastrnn.GRU(3, 4, backend="native").double()
    twin = torch.nn.GRU(3, 4).double()
    twin.load_state_dict(gru.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    try:
        out = gru(x)[0]
    except ValueError as exc:
        print("error:", exc)
    else:
        print(torch.allclose(out, twin(x)[0], rtol=1e-12, atol=1e-12))
"""

FALLBACK_WARNING = "fastrnn: using the reference backend because native:"


@pytest.fixture(scope="module")
def built_library():
    """This session's JIT-built library (built now if no other test did yet)."""
    if any(build._prebuilt_library(cuda) for cuda in (False, True)):
        pytest.skip("the native library is an install-time build; these cases need a JIT cache")
    return Path(build.load())


@pytest.fixture
def cache(built_library, tmp_path):
    """A private TORCH_EXTENSIONS_DIR holding a copy of the built cache (timestamps kept, so
    ninja finds it current); -> (extensions dir, library path in it)."""
    root = tmp_path / "extensions"
    shutil.copytree(built_library.parent, root / built_library.parent.name, symlinks=True)
    return root, root / built_library.parent.name / built_library.name


def run_child(root, *modes):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(root),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", CHILD, *modes], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, (f"child exited with {result.returncode}: "
                                    f"{result.stderr[-3000:]}")
    return result.stdout, result.stderr


def truncate_keeping_mtime(path, size=4096):
    """What a link killed mid-write leaves once its timestamp is restored (`touch -r`)."""
    stat = os.stat(path)
    os.truncate(path, size)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_cached_library_loads_quietly_and_is_not_rebuilt(cache):
    """No "No CUDA runtime is found, using CUDA_HOME=..." (nor anything else) on a CPU
    machine, and a good cached library is used as it is."""
    root, library = cache
    before = library.stat().st_mtime_ns
    stdout, stderr = run_child(root, "native")
    assert stdout == "True\n"
    assert stderr == ""
    assert library.stat().st_mtime_ns == before
    assert build.digest_path(library).read_text().strip() == build.file_digest(library)


def test_truncated_library_is_relinked(cache):
    root, library = cache
    size = library.stat().st_size
    assert build.digest_path(library).is_file()  # recorded by this session's load()
    truncate_keeping_mtime(library)
    stdout, stderr = run_child(root, "native")
    assert stdout == "True\n"
    assert stderr.count("is damaged") == 1 and "truncated or overwritten" in stderr, stderr
    assert library.stat().st_size == size
    assert build.digest_path(library).read_text().strip() == build.file_digest(library)


def test_truncated_library_without_digest_is_relinked_under_auto(cache):
    """A first link killed mid-write leaves no digest: a test load in a grandchild process
    takes the signal instead."""
    root, library = cache
    build.digest_path(library).unlink(missing_ok=True)
    truncate_keeping_mtime(library)
    stdout, stderr = run_child(root, "auto")
    assert stdout == "native\n"
    assert stderr.count("is damaged") == 1 and "SIGBUS" in stderr, stderr
    assert build.digest_path(library).read_text().strip() == build.file_digest(library)


def test_unrepairable_library_falls_back_with_one_warning_or_raises_when_named(cache):
    """When relinking fails too (here: a truncated object file that ninja also finds
    current), auto runs the reference backend with one warning and backend="native" raises
    a clear error; no signal either way."""
    root, library = cache
    build.digest_path(library).unlink(missing_ok=True)
    truncate_keeping_mtime(library)
    truncate_keeping_mtime(library.parent / "registration.o", 1024)
    stdout, stderr = run_child(root, "auto", "native")
    auto, named = stdout.splitlines()
    assert auto == "reference"
    assert stderr.count("Warning") == 1 and stderr.count(FALLBACK_WARNING) == 1, stderr
    assert named.startswith("error: fastrnn backend 'native' cannot run gru")
    assert f"building the native {build._loaded} extension" in named
    assert "error:" in named and "registration.o" in named  # the linker's own words


PREBUILT_CHILD = """
import sys
from fastrnn import build
for path in sys.argv[1:]:
    build._prebuilt_library = lambda cuda: path
    try:
        print("loaded", build.load())
    except build.BuildError as exc:
        print("error:", exc)
"""


def test_prebuilt_library_is_verified_before_loading(built_library, tmp_path):
    """An install-time library (setup.py records its digest) is checked the same way; a
    damaged one is never loaded: auto falls back, as for a failed build."""
    truncated, overwritten, good = (tmp_path / f"{name}.so" for name in
                                    ("truncated", "overwritten", "good"))
    for library in (truncated, overwritten, good):
        shutil.copy2(built_library, library)
    build.write_digest(overwritten)
    truncate_keeping_mtime(truncated)  # and no digest: a test load takes the signal
    truncate_keeping_mtime(overwritten)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run([sys.executable, "-c", PREBUILT_CHILD, str(truncated),
                             str(overwritten), str(good)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for line, library, why in zip(lines, (truncated, overwritten),
                                  ("SIGBUS", "truncated or overwritten")):
        assert line.startswith(f"error: the prebuilt native library {library} cannot be "
                               "loaded: "), line
        assert why in line and "delete the file to build on first use" in line, line
    # no digest yet: loaded after a test load, and the digest recorded
    assert lines[2] == f"loaded {good}"
    assert build.digest_path(good).read_text().strip() == build.file_digest(good)


def test_digest_matches_until_the_library_changes(tmp_path):
    library = tmp_path / "lib.so"
    library.write_bytes(b"\x7fELF" + bytes(100))
    build.write_digest(library)
    assert build.digest_path(library).read_text() == build.file_digest(library) + "\n"
    assert build.library_damage(library) is None
    library.write_bytes(b"\x7fELF" + bytes(99))
    assert "truncated or overwritten" in build.library_damage(library)
    build.write_digest(tmp_path / "missing.so")  # nothing to hash: no digest, no error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.so", "lib.so.sha256"]


def test_generated_spec_header_is_current():
    """csrc/generated/fastrnn_spec.h holds fastrnn/spec.py's tables (build.py rewrites it in a
    checkout whose spec changed; an installed copy must already match)."""
    header = build.csrc_dir() / "generated" / "fastrnn_spec.h"
    assert header.read_text() == build.spec_header()
    assert "generated/fastrnn_spec.h" in build.HEADERS   # a spec change is a new build
