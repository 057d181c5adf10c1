"""Packaging: the wheel holds every file the package reads at run time, and (``make test-install``, marker
``install``: it downloads packages) a fresh virtual environment with the CPU torch and the built wheel runs lancet
from outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def package_data_files() -> set[str]:
    """Every non-Python file under lancet/ that the package reads at run time."""
    return {str(p.relative_to(ROOT)) for p in (ROOT / "lancet").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, cwd=out)
    (found,) = out.glob("lancet_llm-*.whl")
    return found


def test_wheel_holds_package_data_license_and_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = package_data_files()
    assert {"lancet/evaluate/suites/small.json", "lancet/evaluate/suites/default.json", "lancet/py.typed"} <= data
    assert data <= names, f"missing from the wheel: {sorted(data - names)}"
    py = {str(p.relative_to(ROOT)) for p in (ROOT / "lancet").rglob("*.py")}
    assert py <= names
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(wheel).read(meta).decode()
    requires = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]
    assert "torch>=2.11" in requires  # a floor, so an existing (GPU) torch is kept
    assert not any(r.startswith(("pandas", "torch==")) for r in requires)
    assert any(r.startswith("transformers>=4.56") for r in requires)
    assert any(r.startswith("datasets") and "extra == \"data\"" in r for r in requires)
    assert any(r.startswith("gguf") and "extra == \"model\"" in r for r in requires)
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def fixture_shared(root: Path) -> Path:
    """Empty files at every path the shipped suites name: enough for load_suite, which checks that paths exist."""
    for name in ("small", "default"):
        suite = json.loads((ROOT / "lancet/evaluate/suites" / f"{name}.json").read_text())
        paths = [s["path"] for s in suite["sets"] if "path" in s] + [suite["judge_data"]]
        for p in paths:
            target = root / p.replace("{shared}/", "")
            if p == suite["judge_data"]:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
    return root


@pytest.mark.install
def test_fresh_venv_installs_the_wheel_and_finds_the_suites(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, cwd=tmp_path)  # the CPU wheel first, as the Makefile
    subprocess.run([*pip, str(wheel)], check=True, cwd=tmp_path)
    shared = fixture_shared(tmp_path / "shared")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import lancet, sys; from lancet.evaluate import load_suite; "
            "assert 'site-packages' in lancet.__file__, lancet.__file__; "
            f"s = load_suite('small', shared={str(shared)!r}); print(s.name, len(s.sets))")
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["small", "10"]
    no_data = subprocess.run([str(venv / "bin" / "lancet"), "evaluate", "smollm2-135m-instruct", "--suite", "small",
                              "--out", str(tmp_path / "m.json"), "--shared", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, cwd=tmp_path, env=env)
    assert no_data.returncode == 2
    lines = no_data.stderr.strip().splitlines()
    assert len(lines) == 1 and "--shared" in lines[0], no_data.stderr
