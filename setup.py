"""Build the optional Cython extensions of llama_orch.ext.

Every compiled module has a pure-Python twin, so a failed compile (no C compiler, no
Cython) still leaves a working install; the failure is reported in one clear line.
``LLAMA_ORCH_NO_EXTENSIONS=1`` at build time skips compiling altogether.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

EXTENSION_MODULES = ["_queue_c", "_sse_c"]


class OptionalBuildExt(build_ext):
    """build_ext that degrades to the pure-Python twins instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure means "use the twins"
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc, ext.name)

    @staticmethod
    def _warn(exc, name="extensions"):
        sys.stderr.write(
            f"llama-orch: could not compile {name} ({exc.__class__.__name__}: {exc}); "
            "the pure-Python twins will be used\n"
        )


def extensions():
    if os.environ.get("LLAMA_ORCH_NO_EXTENSIONS") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        sys.stderr.write("llama-orch: Cython not available; the pure-Python twins will be used\n")
        return []
    exts = [
        Extension(f"llama_orch.ext.{name}", [f"llama_orch/ext/{name}.pyx"], extra_compile_args=["-O2"])
        for name in EXTENSION_MODULES
        if os.path.exists(f"llama_orch/ext/{name}.pyx")
    ]
    return cythonize(exts, compiler_directives={"language_level": "3"}, quiet=True)


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
