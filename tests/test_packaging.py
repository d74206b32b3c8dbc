"""Package-level conventions: version, `python -m normfree`, license, package data in the wheel."""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

import normfree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_version_is_one_value_everywhere():
    assert importlib.metadata.version("normfree") == normfree.__version__
    out = run("-m", "normfree", "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"normfree {normfree.__version__}"


def test_python_dash_m_runs_the_command_line():
    out = run("-m", "normfree", "models", "--methods")
    assert out.returncode == 0, out.stderr
    assert [line.split()[0] for line in out.stdout.splitlines()] == normfree.list_methods()  # sorted: arpit, ...
    assert "bn" in normfree.list_methods() and "skipinit" in normfree.list_methods()
    bad = run("-m", "normfree", "no-such-command")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_license_file_matches_pyproject():
    meta = importlib.metadata.metadata("normfree")
    assert meta["License-Expression"] == "Apache-2.0"
    with open(os.path.join(ROOT, "LICENSE")) as fh:
        text = fh.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert len(text.splitlines()) == 202  # the full standard text


def test_wheel_ships_the_digits_and_license(tmp_path):
    pytest.importorskip("setuptools")
    # build from a clean copy: a stale src/normfree.egg-info/SOURCES.txt would list the data files anyway
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "src"), src / "src",
                    ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and "No module named pip" in out.stderr:
        pytest.skip("pip is not available")
    assert out.returncode == 0, out.stderr
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "normfree/resources/digits.npz" in names and "normfree/resources/README.md" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(tmp_path / wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    requires = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert requires and not any("scikit-learn" in r for r in requires)
