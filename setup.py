"""Thin setuptools shim: configure and build the CMake project, drop fusedopt/_C into the package.

Environment:
  FUSEDOPT_CUDA=auto|on|off     build the CUDA backend when nvcc is found / require it / skip it
  FUSEDOPT_CUDA_ARCHS="80;90a"  CMAKE_CUDA_ARCHITECTURES for the CUDA backend
  FUSEDOPT_BUILD_TYPE=Release   CMake build type
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: str = ".") -> None:
        super().__init__(name, sources=[])
        self.source_dir = str(Path(source_dir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("FUSEDOPT_CUDA", "auto").upper()
        if cuda not in ("AUTO", "ON", "OFF"):  # "0" or "false" would otherwise build CUDA as auto does
            raise SystemExit(f"FUSEDOPT_CUDA must be auto, on or off (got {os.environ['FUSEDOPT_CUDA']!r})")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('FUSEDOPT_BUILD_TYPE', 'Release')}",
            f"-DFUSEDOPT_CUDA={cuda}",
            "-GNinja",
        ]
        if os.environ.get("FUSEDOPT_CUDA_ARCHS"):
            args.append(f"-DFUSEDOPT_CUDA_ARCHS={os.environ['FUSEDOPT_CUDA_ARCHS']}")
        # --fresh: the build folder survives between `pip install .` runs in one checkout, and its
        # cache would keep the last run's settings (archs, nvcc) and pip's since-deleted ninja.
        # Ninja's own log still keeps an unchanged rebuild incremental.
        subprocess.run(["cmake", "--fresh", ext.source_dir, *args], cwd=build_temp, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_temp, check=True)


setup(ext_modules=[CMakeExtension("fusedopt._C")], cmdclass={"build_ext": CMakeBuild})
