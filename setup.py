"""Packaging is declared in pyproject.toml; this file only hosts the optional ahead-of-time
build of the native extension (see fastrnn/build.py).

By default the install is pure Python and the native kernels are compiled on first use (JIT,
cached). ``FASTRNN_BUILD_EXT=1`` compiles them at install time instead, into
``fastrnn/_native_cpu*.so`` (or ``fastrnn/_native_cuda*.so`` with ``FASTRNN_BUILD_CUDA=1``),
which fastrnn.build loads in preference to a JIT build (after checking it against the SHA-256
recorded beside it here, ``<library>.sha256``). torch must already be installed::

    FASTRNN_BUILD_EXT=1 pip install --no-build-isolation -e .
"""
import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    """Ship csrc/ inside the package (fastrnn/csrc) so a wheel can JIT-build the kernels."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastrnn", "csrc")
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree("csrc", target)


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if os.environ.get("FASTRNN_BUILD_EXT") == "1":
    import importlib.util  # fastrnn/build.py needs only torch: load it without the package
    spec = importlib.util.spec_from_file_location("fastrnn_build", "fastrnn/build.py")
    fastrnn_build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fastrnn_build)
    cpp_extension = fastrnn_build._cpp_extension()

    class BuildExtRecordingDigest(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        """Records each library's SHA-256 beside it once built: fastrnn.build loads a
        prebuilt library only when it still matches (a truncated one can crash the loader)."""

        def build_extension(self, ext):
            super().build_extension(ext)
            fastrnn_build.write_digest(self.get_ext_fullpath(ext.name))

    cuda = os.environ.get("FASTRNN_BUILD_CUDA") == "1"
    sources = ["csrc/registration.cpp", "csrc/recurrence_cpu.cpp", "csrc/quantized.cpp"]
    flags = {"cxx": ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]}
    include_dirs = [os.path.abspath("csrc")]
    if cuda:
        sources.append("csrc/recurrence_cuda.cu")
        flags["nvcc"] = ["-O3"]
        include_dirs += fastrnn_build._cuda_include_dirs()
    extension = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    ext_modules.append(extension(
        name="fastrnn._native_cuda" if cuda else "fastrnn._native_cpu", sources=sources,
        include_dirs=include_dirs, extra_compile_args=flags, extra_link_args=["-fopenmp"]))
    cmdclass["build_ext"] = BuildExtRecordingDigest

setup(ext_modules=ext_modules, cmdclass=cmdclass)
