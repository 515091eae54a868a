"""The plugin kit: `declic plugins new` writes a project whose tests pass as generated, Declic loads
it once installed, every hook spec is documented, typed and exercised, and Declic's own docs do
not change with what happens to be installed beside it."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner

from declic_gateway import hookspecs
from declic_gateway.cli.main import cli

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = {"source": "4 passed", "sink": "3 passed"}


def generate(tmp_path: Path, name: str, kind: str) -> Path:
    result = CliRunner().invoke(cli, ["plugins", "new", name, "--kind", kind, "--into", str(tmp_path)])
    assert result.exit_code == 0, result.output
    return tmp_path / f"declic-{name.replace('_', '-')}"


def run(*args: str | Path, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("kind", ["source", "sink"])
def test_a_generated_plugin_passes_its_own_tests(tmp_path: Path, kind: str) -> None:
    root = generate(tmp_path, "acme", kind)
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "README.md",
        "declic_acme/__init__.py",
        "pyproject.toml",
        "tests/conftest.py",
        "tests/test_acme.py",
    ]
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points.declic]\nacme = "declic_acme"' in pyproject
    result = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=root, pythonpath=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert EXPECTED[kind] in result.stdout


def test_a_bad_name_or_an_existing_folder_writes_nothing(tmp_path: Path) -> None:
    for bad in ("Acme", "1acme", "ac-me", "acme/../x", ""):
        result = CliRunner().invoke(cli, ["plugins", "new", bad, "--kind", "source", "--into", str(tmp_path)])
        assert result.exit_code != 0 and "plugin name" in result.output, bad
    assert list(tmp_path.iterdir()) == []
    generate(tmp_path, "acme", "source")
    again = CliRunner().invoke(cli, ["plugins", "new", "acme", "--kind", "sink", "--into", str(tmp_path)])
    assert again.exit_code == 1 and "already exists; nothing written" in again.output
    assert "class AcmeSource" in (tmp_path / "declic-acme" / "declic_acme" / "__init__.py").read_text()


def installed_beside_declic(tmp_path: Path) -> Path:
    """The generated plugin as an installed distribution (its dist-info with the entry point) on a
    folder of its own, so only the processes given that folder see it."""
    root = generate(tmp_path / "src", "acme", "source")
    site = tmp_path / "site"
    (site / "declic_acme").mkdir(parents=True)
    (site / "declic_acme" / "__init__.py").write_text((root / "declic_acme" / "__init__.py").read_text())
    info = site / "declic_acme-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: declic-acme\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[declic]\nacme = declic_acme\n")
    return site


def test_declic_loads_an_installed_plugin_and_its_docs_ignore_it(tmp_path: Path) -> None:
    site = installed_beside_declic(tmp_path)
    declic = Path(sys.executable).parent / "declic"
    listed = run(declic, "plugins", cwd=tmp_path, pythonpath=site)
    assert listed.returncode == 0, listed.stderr
    assert re.search(
        r"^acme 0\.1\.0  \[declic-acme\]\n  hooks: register_sources\n  provides: source:acme", listed.stdout, re.M
    )

    everything = run(declic, "reference", cwd=tmp_path, pythonpath=site).stdout
    assert "### `plugin: acme`" in everything and "The signing secret Acme shows" in everything
    own = run(declic, "reference", "--builtin-only", cwd=tmp_path, pythonpath=site)
    assert own.returncode == 0 and own.stdout == (ROOT / "docs" / "config-reference.md").read_text()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_generated_plugin_installs_into_its_own_venv_and_declic_loads_it(tmp_path: Path) -> None:
    """As a plugin author works: a fresh venv, Declic and the plugin installed with pip, the
    plugin's tests run there, and `declic plugins` lists it."""
    root = generate(tmp_path, "acme", "sink")
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    python, declic = venv / "bin" / "python", venv / "bin" / "declic"
    for target in (ROOT, f"{root}[test]"):
        installed = run(python, "-m", "pip", "install", "-q", "-e", target, cwd=tmp_path)
        assert installed.returncode == 0, installed.stdout + installed.stderr
    tested = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", cwd=root)
    assert tested.returncode == 0 and EXPECTED["sink"] in tested.stdout, tested.stdout + tested.stderr
    listed = run(declic, "plugins", cwd=tmp_path)
    assert re.search(r"^acme 0\.1\.0  \[declic-acme\]$", listed.stdout, re.M), listed.stdout


SPECS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "declic_spec")]


def test_there_are_hook_specs_to_check() -> None:
    assert {"register_sources", "register_sinks", "startup", "event_received"} <= set(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_every_hook_spec_is_documented_typed_and_exercised(name: str) -> None:
    spec = getattr(hookspecs, name)
    assert (spec.__doc__ or "").strip(), f"{name} has no docstring"
    hints = typing.get_type_hints(spec, vars(hookspecs) | _type_checking_names())
    assert set(hints) == {*inspect.signature(spec).parameters, "return"}, f"{name} is not fully typed"
    documented = (ROOT / "docs" / "plugins.md").read_text()
    assert f"`{name}" in documented, f"docs/plugins.md does not mention {name}"
    # Exercised: a test implements it (and so runs it through the real plugin manager).
    implemented = [p for p in (ROOT / "tests").glob("*.py") if re.search(rf"def {name}\(", p.read_text())]
    assert implemented, f"no test implements {name}"


def _type_checking_names() -> dict[str, object]:
    """The names hookspecs imports only for type checkers, so its annotations resolve here."""
    import click
    import jinja2

    from declic_gateway.config import Settings
    from declic_gateway.kit.clock import Clock
    from declic_gateway.kit.events import Event
    from declic_gateway.kit.sinks import Sink
    from declic_gateway.kit.sources import Source
    from declic_gateway.store import Database

    return {
        "click": click,
        "jinja2": jinja2,
        "Settings": Settings,
        "Clock": Clock,
        "Event": Event,
        "Sink": Sink,
        "Source": Source,
        "Database": Database,
    }
