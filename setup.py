"""Build the Cython CMM kernels, with OpenMP where the compiler has it.

Everything declarative lives in pyproject.toml; this file only exists because the OpenMP
flags depend on the compiler found at build time.
"""
import os
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_TEST = r"""
#include <omp.h>
int main(void) { int n = 0;
#pragma omp parallel reduction(+:n)
  n += 1;
  return n > 0 ? 0 : 1; }
"""


def _compiles_with(compiler_cmd, compile_flags, link_flags):
    """True when a tiny OpenMP program builds and links with these flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write(OPENMP_TEST)
        cmd = list(compiler_cmd) + compile_flags + [src, "-o", os.path.join(tmp, "t")] + link_flags
        try:
            return subprocess.run(cmd, capture_output=True).returncode == 0
        except OSError:
            return False


def _apple_clang_openmp_flags():
    """Apple clang has no bundled OpenMP runtime: it needs `-Xpreprocessor -fopenmp` and libomp.

    Homebrew installs libomp keg-only (not on the default search paths), so try $LIBOMP_PREFIX
    (set it to `$(brew --prefix libomp)`), then Homebrew's default prefixes on Apple silicon and
    Intel, then plain `-lomp` for a libomp already on the compiler's paths.
    """
    homebrew = ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    prefixes = [os.environ.get("LIBOMP_PREFIX")] + homebrew
    flags = [
        (["-Xpreprocessor", "-fopenmp", f"-I{p}/include"], [f"-L{p}/lib", "-lomp"])
        for p in prefixes
        if p and os.path.isdir(os.path.join(p, "include"))
    ]
    flags.append((["-Xpreprocessor", "-fopenmp"], ["-lomp"]))
    return flags


class BuildExtWithOpenMP(build_ext):
    def build_extensions(self):
        ctype = self.compiler.compiler_type
        if ctype == "msvc":
            cflags, lflags = ["/openmp", "/O2"], []
            have_openmp = True
        else:
            cc = self.compiler.compiler_so[:1]
            # -fopenmp-simd honours `#pragma omp simd` even in a serial build.
            base = ["-O3", "-fopenmp-simd", "-fno-math-errno"]
            if os.environ.get("FASTFF_SANITIZE"):
                base += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1"]
            candidates = [(["-fopenmp"], ["-fopenmp"])]
            if sys.platform == "darwin":
                candidates += _apple_clang_openmp_flags()
            have_openmp = False
            for c, l in candidates:
                if _compiles_with(cc, c, l):
                    cflags, lflags, have_openmp = base + c, l, True
                    break
            if not have_openmp:
                cflags, lflags = base, []
                warnings.warn(
                    "fastff: this compiler has no OpenMP support; building the CMM kernels "
                    "serial (one thread). Install libomp (macOS: `brew install libomp`) or use gcc "
                    "for multi-threaded kernels."
                )
            if os.environ.get("FASTFF_SANITIZE"):
                lflags = lflags + ["-fsanitize=address,undefined"]
        for ext in self.extensions:
            ext.extra_compile_args = cflags
            ext.extra_link_args = lflags
            ext.define_macros = list(ext.define_macros or []) + [
                ("FASTFF_HAVE_OPENMP", "1" if have_openmp else "0"),
                ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
            ]
        super().build_extensions()


extensions = [
    Extension(
        "fastff._cmm",
        ["fastff/_cmm.pyx"],
        include_dirs=[numpy.get_include(), "fastff"],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
    ),
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
