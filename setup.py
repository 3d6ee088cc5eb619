"""Metadata lives in pyproject.toml. This file only adds the optional native
ops (csrc/, CMakeLists.txt): built with CMake where a C++ compiler exists
(the CUDA part only where torch has CUDA and nvcc exists) and skipped
cleanly otherwise — installing never requires CUDA or CMake."""
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vllm.native_build import STAMP, build_native  # noqa: E402

PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm")


class CMakeBuild(build_ext):
    """Builds the native libraries with CMake instead of compiling the
    placeholder extension (whose only role is to make setuptools run this)."""

    def run(self) -> None:
        target = os.path.join(self.build_lib, "vllm")
        try:
            names = build_native(target, self.build_temp)
        except Exception as e:  # no compiler, a failed build: the package works without
            print(f"vllm: native ops not built ({e}); Triton/torch implementations are used")
            names = []
        self.native_files = [os.path.join(target, n + ".so") for n in names]
        if names:
            self.native_files.append(os.path.join(target, STAMP))
        if self.inplace:  # editable install: the package is the source tree
            for path in self.native_files:
                self.copy_file(path, os.path.join(PACKAGE_DIR, os.path.basename(path)))

    def get_outputs(self) -> list[str]:
        return list(getattr(self, "native_files", []))

    def get_output_mapping(self) -> dict[str, str]:
        if not self.inplace:
            return {}
        return {p: os.path.join(PACKAGE_DIR, os.path.basename(p)) for p in self.get_outputs()}


setup(ext_modules=[Extension("vllm._native", sources=[], optional=True)]
      if shutil.which("cmake") else [],
      cmdclass={"build_ext": CMakeBuild})
