"""Build the Cython extensions in ext/ as meshcore._ext.<name>.

Environment switches:
  MESHCORE_NO_EXTENSIONS=1  pure-Python build (forced on non-CPython interpreters)
  MESHCORE_CYTHON_DEBUG=1   annotate, linetrace and CYTHON_TRACE for profiling/coverage
  MESHCORE_EXT=a,b          build only these extensions (developer convenience)
"""
import glob
import os
import platform
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("MESHCORE_NO_EXTENSIONS") or platform.python_implementation() != "CPython":
        print("meshcore: pure-Python build (no extensions)", file=sys.stderr)
        return []
    from Cython.Build import cythonize

    debug = bool(os.environ.get("MESHCORE_CYTHON_DEBUG"))
    only = {n for n in os.environ.get("MESHCORE_EXT", "").split(",") if n}
    exts = []
    for pyx in sorted(glob.glob(os.path.join("ext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        if only and name not in only:
            continue
        macros = [("CYTHON_TRACE_NOGIL", "1"), ("CYTHON_TRACE", "1")] if debug else []
        exts.append(Extension(f"meshcore._ext.{name}", [pyx], define_macros=macros,
                              extra_compile_args=["-O2"]))
    directives = {
        "language_level": "3",
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
        "initializedcheck": False,
    }
    if debug:
        directives.update(linetrace=True, profile=True)
    print(f"meshcore: accelerated build ({', '.join(e.name for e in exts)})", file=sys.stderr)
    return cythonize(exts, include_path=["ext"], compiler_directives=directives, annotate=debug,
                     quiet=True)


setup(ext_modules=_extensions())
