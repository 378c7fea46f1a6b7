"""The wheel installs one import name, `spa`, with the pipeline folders as its subpackages and the console script.

The wheel is built offline (no build isolation: the venv's setuptools) from a copy of the checkout, so the
build's own build/ and *.egg-info never land in the working tree that parallel tests read.
"""
from __future__ import annotations

import configparser
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".hypothesis", ".bench", ".ruff_cache", "*.onnx", "*.onnx.data")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    out = tmp / "dist"
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (whl,) = out.glob("spa_prune-*.whl")
    with zipfile.ZipFile(whl) as zf:
        yield zf


def _dist_info(zf: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in zf.namelist() if n.split("/")[0].endswith(".dist-info") and n.endswith("/" + name)]
    return zf.read(path).decode()


def test_one_top_level_import_name(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"spa"}
    assert _dist_info(wheel, "top_level.txt").split() == ["spa"]


def test_pipeline_folders_are_spa_subpackages(wheel):
    names = set(wheel.namelist())
    for path in ("spa/__init__.py", "spa/cli/__init__.py", "spa/search/__init__.py", "spa/passes/analyse.py",
                 "spa/operators/__init__.py", "spa/models/__init__.py"):
        assert path in names, path
    # every module of the source folders is shipped
    for folder, pkg in (("passes", "spa/passes"), ("operators", "spa/operators"), ("models", "spa/models"),
                        ("spa", "spa")):
        for f in (ROOT / folder).rglob("*.py"):
            assert f"{pkg}/{f.relative_to(ROOT / folder).as_posix()}" in names, f


def test_no_tools_or_tests_in_wheel(wheel):
    bench = {f.name for f in (ROOT / "tools").glob("*.py")} | {f.name for f in (ROOT / "tests").glob("*.py")}
    for n in wheel.namelist():
        parts = n.split("/")
        assert not {"tools", "tests", "fixtures"} & set(parts), n
        if parts[0] == "spa":
            assert parts[-1] not in bench - {"__init__.py"}, n


def test_console_script(wheel):
    ep = configparser.ConfigParser()
    ep.read_string(_dist_info(wheel, "entry_points.txt"))
    assert ep["console_scripts"]["spa-prune"].strip() == "spa.cli:main"
