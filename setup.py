"""Ships nixlib/, backdoor/ and modules/ inside the wheel as the package's data (ntng/_data).

They live at the top of the repository, where Nix and the guest image read them, outside the
Python package; build_py copies them into the built package, so a wheel has the same tree
under ntng/_data that a checkout has at its root (nixlib/mkTest.nix imports ../modules,
nixlib/pkgs/agent.nix reads ../../python/ntng/protocol.py).  An editable install copies
nothing: python/ntng/paths.py finds the checkout itself.  Everything else is in pyproject.toml.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA_DIRS = ("nixlib", "backdoor", "modules")
# Read by nixlib/pkgs/agent.nix at its checkout path, so the data tree keeps it there too.
DATA_FILES = ("python/ntng/protocol.py",)


class BuildPyWithData(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "ntng" / "_data"
        shutil.rmtree(dest, ignore_errors=True)  # no files left from an older build
        for name in DATA_DIRS:
            if not (ROOT / name).is_dir():
                raise SystemExit(f"setup.py: {ROOT / name} is missing: it ships inside the wheel")
            shutil.copytree(ROOT / name, dest / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "result*"))
        for name in DATA_FILES:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


setup(cmdclass={"build_py": BuildPyWithData})
