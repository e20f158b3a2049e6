"""Build the Cython CMM kernels, with OpenMP where the compiler has it.

Everything declarative lives in pyproject.toml; this file only exists because the OpenMP
flags depend on the compiler found at build time.
"""

import os
import subprocess
import sys
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
                # -fno-sanitize-recover: UBSan aborts on the first finding instead of printing
                # it and carrying on, so a test run cannot pass with undefined behaviour in it.
                base += [
                    "-fsanitize=address,undefined",
                    "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer",
                    "-O1",
                    "-g",
                ]
            candidates = [(["-fopenmp"], ["-fopenmp"])]
            if sys.platform == "darwin":
                candidates += _apple_clang_openmp_flags()
            have_openmp = False
            for compile_flags, link_flags in candidates:
                if _compiles_with(cc, compile_flags, link_flags):
                    cflags, lflags, have_openmp = base + compile_flags, link_flags, True
                    break
            if not have_openmp:
                cflags, lflags = base, []
                warnings.warn(
                    "fastff: this compiler has no OpenMP support; building the CMM kernels "
                    "serial (one thread). Install libomp (macOS: `brew install libomp`) or use gcc "
                    "for multi-threaded kernels.",
                    stacklevel=2,
                )
            if os.environ.get("FASTFF_SANITIZE"):
                lflags = lflags + ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
        for ext in self.extensions:
            ext.extra_compile_args = cflags
            ext.extra_link_args = lflags
            ext.define_macros = list(ext.define_macros or []) + [
                ("FASTFF_HAVE_OPENMP", "1" if have_openmp else "0"),
                ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
            ]
        self._rebuild_if_flavour_changed()
        super().build_extensions()
        self._write_flavour()

    # A sanitized and a plain build write the same object and library paths. setuptools skips
    # an extension whose output is newer than its sources, so switching FASTFF_SANITIZE on or
    # off could reuse the other flavour's build: a plain library in an ASan run (which would
    # then find nothing), or an ASan library in a wheel. The flavour of the last build is
    # recorded next to its objects, and a change forces a full rebuild.
    def _flavour_marker(self):
        return os.path.join(self.build_temp, "fastff-build-flavour")

    def _flavour(self):
        return "sanitize" if os.environ.get("FASTFF_SANITIZE") else "plain"

    def _rebuild_if_flavour_changed(self):
        try:
            with open(self._flavour_marker()) as f:
                previous = f.read()
        except OSError:
            previous = None
        if previous != self._flavour():
            self.force = True

    def _write_flavour(self):
        os.makedirs(self.build_temp, exist_ok=True)
        with open(self._flavour_marker(), "w") as f:
            f.write(self._flavour())


extensions = [
    Extension(
        "fastff._cmm",
        ["fastff/_cmm.pyx"],
        include_dirs=[numpy.get_include(), "fastff", "fastff/cpu"],
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
