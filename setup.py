"""Build script: the Python package `sfmkern`, its Triton kernels (`kernels/` installed as `sfmkern.kernels`) and
the C++ decoder `sfmkern._decode` (csrc/, built by CMake through pybind11's CMake config, Ninja when present).

Rebuild the decoder after a C++ change (editable install): `python3 setup.py build_ext --inplace`.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class CMakeExtension(Extension):
    """An extension whose sources are built by CMakeLists.txt in `sourcedir` (pybind11's cmake_example)."""

    def __init__(self, name: str, sourcedir: str = "") -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(Path(sourcedir).resolve())


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        cfg = "Debug" if os.environ.get("SFMKERN_DEBUG") else "Release"
        import pybind11

        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        if "CMAKE_ARGS" in os.environ:
            cmake_args += [item for item in os.environ["CMAKE_ARGS"].split(" ") if item]
        generator = os.environ.get("CMAKE_GENERATOR", "")
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        if not generator and shutil.which("ninja") and not (build_temp / "Makefile").exists():
            cmake_args += ["-GNinja"]
        build_args = []
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += [f"-j{os.cpu_count() or 1}"]
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


setup(
    name="sfmkern",
    version="0.1.0",
    description="Fused kernels and a thin API for dataset distillation by Statistical Flow Matching",
    packages=["sfmkern", "sfmkern.artifacts", "sfmkern.cli", "sfmkern.data", "sfmkern.distillation",
              "sfmkern.evaluation", "sfmkern.kernels"],
    package_dir={"sfmkern": "sfmkern", "sfmkern.kernels": "kernels"},
    ext_modules=[CMakeExtension("sfmkern._decode")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    # torch/torchvision are pinned in requirements.txt; here only a floor so pip never resolves a bare torch.
    install_requires=["torch>=2.11", "timm>=1.0", "numpy", "safetensors", "tqdm", "nvtx", "pyyaml"],
    entry_points={"console_scripts": ["sfmkern=sfmkern.cli:main"]},
    zip_safe=False,
)
