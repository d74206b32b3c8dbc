"""Builds the optional fused weight-standardization kernel (plain C, loaded
with ctypes by ``normfree.fused``). Everything else is in pyproject.toml. If
the compiler is missing or fails, the install goes on without the kernel and
normfree uses its torch implementation (same results, more passes over memory).
"""
import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fopenmp-simd"]

setup(ext_modules=[Extension("normfree._ws_kernel", ["src/normfree/_ws_kernel.c"],
                             extra_compile_args=flags, optional=True)])
