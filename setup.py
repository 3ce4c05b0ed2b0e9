"""Build step only: compile the Cython backend of idpin._sys.

Metadata lives in pyproject.toml. A missing compiler or missing Python
headers is a build error that says what to install, never a silent fallback
to the slower ctypes backend.
"""
import sys
import sysconfig
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtLoudly(build_ext):
    def run(self):
        header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
        if not os.path.exists(header):
            sys.exit(
                "idpin: Python.h not found at %s.\n"
                "Install the Python development headers, e.g. "
                "'apt-get install python3-dev', then run 'pip install .' again." % header
            )
        try:
            super().run()
        except Exception as err:  # setuptools raises several unrelated types here
            sys.exit(
                "idpin: building the Cython extension failed: %s\n"
                "It needs a C compiler ('apt-get install gcc') and the Python "
                "headers ('apt-get install python3-dev')." % err
            )


# setuptools hands .pyx sources to Cython (a build requirement in
# pyproject.toml) inside build_ext, so a compile error reaches the message above.
EXTENSIONS = [
    Extension(
        "idpin._sys._cython",
        sources=["ext/_sys.pyx"],
        include_dirs=["ext"],
        define_macros=[("_GNU_SOURCE", "1")],
    )
]

setup(ext_modules=EXTENSIONS, cmdclass={"build_ext": BuildExtLoudly})
