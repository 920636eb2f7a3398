"""pip works: the sdist and wheel built from a copy of the checkout carry nixlib/, backdoor/ and
modules/, and `ntng` installed from the wheel into a fresh venv outside the checkout runs from
another folder (--version, check on an example, a node-less run).  A data folder missing from
an installation is a SetupError that says so, not a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from ntng import paths, protocol
from ntng.errors import SetupError

ROOT = Path(__file__).resolve().parents[2]
# What a release is built from; everything else in the checkout (tests, bench, .venv) stays out.
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md",
           "python", "nixlib", "backdoor", "modules")
NODELESS = '#: nodes = { };\nwith subtest("adds"):\n    assert 1 + 1 == 2\nprint("all good")\n'


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def copy_sources(dest: Path) -> Path:
    """The checkout's release files in `dest`: building there leaves no build/ or egg-info
    behind in the checkout, and no stale build/ from an older build gets into the wheel."""
    dest.mkdir()
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "*.egg-info", "result*"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from the sdist, as pip does from a source release, with build isolation:
    pip installs pyproject's build requirements (setuptools) from the configured index."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = copy_sources(tmp / "src")
    dist = tmp / "dist"
    # The sdist by setuptools' PEP 517 hook (pip makes no sdists), with pyproject's build
    # requirements installed aside.
    requires = tomllib.loads((src / "pyproject.toml").read_text())["build-system"]["requires"]
    run([sys.executable, "-m", "pip", "install", "-q", "--target", str(tmp / "build-env"), *requires], cwd=tmp)
    run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; b.build_sdist(sys.argv[1])",
         str(dist)], cwd=src, env={**os.environ, "PYTHONPATH": str(tmp / "build-env")})
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    (unpacked,) = (tmp / "unpacked").iterdir()
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(unpacked)], cwd=tmp)
    (whl,) = dist.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel installed.  The runtime dependencies (construct, cffi,
    pyroute2) and mypy come from this test's environment through a path line in a .pth file:
    a plain path, so that environment's own .pth files (an editable ntng) are not read."""
    env_dir = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], cwd=env_dir.parent)
    python = env_dir / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=env_dir).stdout.strip()
    Path(purelib, "ntng-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--no-index", str(wheel)], cwd=env_dir)
    return env_dir


def user_env() -> dict[str, str]:
    """The environment of a user who never saw the checkout: no PYTHONPATH, no NTNG_DATA."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NTNG_DATA")}


def test_wheel_carries_the_data_and_the_version(wheel: Path) -> None:
    assert wheel.name.startswith(f"nixos_test_ng-{protocol.PACKAGE_VERSION}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("ntng/_data/nixlib/default.nix", "ntng/_data/nixlib/mkTest.nix",
                 "ntng/_data/backdoor/ntng_agent.py", "ntng/_data/backdoor/debian/ntng-backdoor.service",
                 "ntng/_data/modules/backdoor.nix", "ntng/_data/python/ntng/protocol.py", "ntng/py.typed"):
        assert name in names, f"{name} is not in {wheel.name}"
    for rel in ("nixlib", "backdoor", "modules"):  # every file of the checkout's data folders
        for f in (ROOT / rel).rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                assert f"ntng/_data/{f.relative_to(ROOT)}" in names, f"{f} is not in the wheel"
    assert not any("__pycache__" in n for n in names if n.startswith("ntng/_data/"))
    meta = zipfile.ZipFile(wheel).read(
        f"nixos_test_ng-{protocol.PACKAGE_VERSION}.dist-info/METADATA").decode()
    assert "License-Expression: MIT" in meta
    assert f"nixos_test_ng-{protocol.PACKAGE_VERSION}.dist-info/licenses/LICENSE" in names


def test_installed_wheel_runs_outside_the_checkout(venv: Path, tmp_path: Path) -> None:
    ntng = str(venv / "bin" / "ntng")
    env = user_env()
    where = run([str(venv / "bin" / "python"), "-c", "import ntng.paths as p; print(p.__file__); "
                 "print(p.data_root())"], cwd=tmp_path, env=env).stdout.split()
    assert where[0].startswith(str(venv)) and where[1].startswith(str(venv)), where

    assert run([ntng, "--version"], cwd=tmp_path, env=env).stdout.strip() == f"ntng {protocol.PACKAGE_VERSION}"

    shutil.copy(ROOT / "examples" / "two_nodes.py", tmp_path / "two_nodes.py")
    checked = run([ntng, "check", "two_nodes.py"], cwd=tmp_path, env=env)
    assert "two_nodes.py: ok" in checked.stderr, checked.stderr

    (tmp_path / "nodeless.py").write_text(NODELESS)
    ran = run([ntng, "run", "nodeless.py", "-o", str(tmp_path / "out")], cwd=tmp_path, env=env)
    assert "all good" in ran.stdout + ran.stderr
    assert list((tmp_path / "out").glob("*/junit.xml"))


def test_missing_data_is_a_setup_error(venv: Path, tmp_path: Path) -> None:
    """An installation without its data (a wheel built without setup.py's copy) says what is
    missing and exits with the setup code, instead of a FileNotFoundError traceback."""
    broken = tmp_path / "broken"
    purelib = run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=tmp_path).stdout.strip()
    shutil.copytree(Path(purelib) / "ntng", broken / "ntng", ignore=shutil.ignore_patterns("_data"))
    (tmp_path / "hello.py").write_text(NODELESS)
    env = {**user_env(), "PYTHONPATH": str(broken)}
    proc = subprocess.run([str(venv / "bin" / "python"), "-m", "ntng.cli", "check", "hello.py"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == SetupError.exit_code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "ntng: error: nixos-test-ng's data (nixlib/, backdoor/, modules/) is in none of" in proc.stderr
    assert "NTNG_DATA" in proc.stderr


def test_ntng_data_without_nixlib_is_a_setup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NTNG_DATA", str(tmp_path))
    with pytest.raises(SetupError, match=f"NTNG_DATA={tmp_path} has no nixlib/default.nix"):
        paths.nixlib_dir()


def test_agent_reports_the_package_version() -> None:
    import ntng_agent  # tests/conftest.py puts backdoor/ on the path

    assert ntng_agent.AGENT_VERSION == protocol.PACKAGE_VERSION
