"""What `pip install declic-gateway` puts on a machine: Declic's own names only, and the files the
code reads at run time (migrations, dashboard templates, the plugin kit's templates)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_wheel_installs_only_declic_named_packages(tmp_path: Path) -> None:
    built = run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", ROOT, cwd=tmp_path)
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = (tmp_path / "dist").glob("*.whl")
    assert wheel.name.startswith("declic_gateway-")  # the distribution is declic-gateway, not PyPI's unrelated `declic`
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {
        "declic_gateway",
        "declic_plugins",
    }
    for needed in (
        "declic_gateway/store/migrations/script.py.mako",
        "declic_gateway/http/dashboard/templates/base.html",
        "declic_gateway/cli/plugin_template/source.py.tmpl",
    ):
        assert needed in names

    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    site = next((venv / "lib").glob("python3*/site-packages"))
    before = {p.name for p in site.iterdir()}
    installed = run(venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr
    added = {p.name for p in site.iterdir()} - before
    assert {name for name in added if not name.endswith(".dist-info")} == {"declic_gateway", "declic_plugins"}
    assert (venv / "bin" / "declic").exists()
