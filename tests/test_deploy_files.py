"""The files a deployment starts from: Dockerfile, compose.yaml with Caddy, the systemd unit.

No container runs here (see docs/deployment.md for what CI can and cannot do): each file is
checked by the tool its ecosystem uses (hadolint, the Compose Specification's JSON Schema,
systemd-analyze), what Declic reads from them is loaded for real, and the image's entry
point runs the demo with the image's environment and folders mapped into a temporary one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from declic_gateway.config import load_config
from declic_gateway.plugins import collect, get_plugin_manager
from declic_gateway.testing import SmtpCatcher, free_port, shopify_headers
from processes import order_body, request, wait_until

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """A linter installed with the test extras (or, for systemd-analyze, by .ci/run); CI must have it."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {name} is not installed")
        pytest.skip(f"{name} is not installed")
    return found


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_runs_as_a_user_with_a_health_check_and_sigterm() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert "/readyz" in re.search(r"^HEALTHCHECK .*(?:\n  .*)*", text, re.M).group()  # type: ignore[union-attr]
    assert re.search(r'^ENTRYPOINT \["declic"\]$', text, re.M), "exec form: declic is PID 1 and gets SIGTERM"
    copied = {line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line}
    ignored = (ROOT / ".dockerignore").read_text()
    assert all(f"!{path.rstrip('/')}" in ignored for path in copied - {"pyproject.toml", "README.md"}), copied


def test_the_compose_file_follows_the_compose_specification() -> None:
    done = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_runs_declic_read_only_on_postgresql_behind_caddy() -> None:
    services = compose()["services"]
    declic, migrate, caddy = services["declic"], services["migrate"], services["caddy"]
    assert declic["read_only"] and declic["cap_drop"] == ["ALL"] and declic["user"] == "10001:10001"
    assert declic["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}
    assert migrate["command"] == ["db", "upgrade"] and migrate["depends_on"]["db"] == {"condition": "service_healthy"}
    assert declic["environment"]["DECLIC_DATABASE_URL"].startswith("postgresql://declic:")
    assert "ports" not in declic and {"80:80", "443:443"} <= set(caddy["ports"])
    caddyfile = (ROOT / "deploy" / "Caddyfile").read_text()
    assert re.search(r"^\{\$DECLIC_DOMAIN\} \{$", caddyfile, re.M) and "reverse_proxy declic:8080" in caddyfile


def test_every_variable_compose_requires_is_in_the_env_example() -> None:
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "compose.yaml").read_text()))
    example = dict(
        line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert required and required <= set(example), required - set(example)


def test_the_config_compose_mounts_loads_with_the_environment_compose_gives(tmp_path: Path) -> None:
    """What `docker compose up` hands Declic, with the example .env's values: `declic check` passes."""
    env = {
        "DECLIC_PUBLIC_URL": "https://hooks.example.com",
        "DECLIC_ADMIN_TOKEN": "a-long-random-admin-token-0123456789abcdef",
        "SHOPIFY_WEBHOOK_SECRET": "shpss_0123456789",
        "SMTP_HOST": "smtp.example.com",
        "SMTP_PORT": "587",
        "SMTP_TLS": "starttls",
        "SMTP_USERNAME": "declic",
        "SMTP_PASSWORD": "smtp-password",
        "SMTP_SENDER": "Boutique <bonjour@shop.example>",
    }
    declic = compose()["services"]["declic"]
    assert set(env) <= set(declic["environment"]), "the environment compose sets"
    pm = get_plugin_manager()
    settings = load_config(ROOT / "config" / "declic.yaml", collect(pm), pm, env=env)
    assert settings.public_url == "https://hooks.example.com"
    assert settings.sink_plugins["email"][1].sender == "Boutique <bonjour@shop.example>"  # type: ignore[attr-defined]
    [(_, smtp)] = settings.sink_plugins.values()
    assert (smtp.host, smtp.port, smtp.tls, smtp.username) == ("smtp.example.com", 587, "starttls", "declic")  # type: ignore[attr-defined]


def systemd_analyze(*args: str, unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), *args, str(unit)], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """The unit, with ExecStart pointing at this environment's `declic` (verify checks it exists)."""
    declic = shutil.which("declic", path=str(Path(sys.executable).parent)) or "/usr/bin/true"
    text = (ROOT / "deploy" / "declic.service").read_text().replace("/opt/declic/bin/declic", declic)
    path = tmp_path / "declic.service"
    path.write_text(text)
    return path


def test_the_systemd_unit_is_valid(unit: Path) -> None:
    done = systemd_analyze("verify", unit=unit)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")  # a bad value is only a warning: none at all


def test_the_systemd_unit_is_hardened(unit: Path) -> None:
    done = systemd_analyze("security", "--offline=true", "--threshold=20", unit=unit)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    score = re.search(r"Overall exposure level for declic.service: (\d+\.\d+)", done.stdout)
    assert score and float(score.group(1)) <= 2.0, done.stdout[-500:]


# --- the image's entry point, run without a container runtime ------------------------------------


def final_stage(dockerfile: str) -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile's last stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", dockerfile)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last = max(i for i, line in enumerate(lines) if line.startswith("FROM "))
    return [tuple(line.split(None, 1)) for line in lines[last:]]  # type: ignore[misc]


@pytest.mark.timeout(90)
def test_the_images_entry_point_serves_the_demo_checks_health_and_stops_on_sigterm(tmp_path: Path) -> None:
    """What the image runs (its ENV, WORKDIR, ENTRYPOINT + CMD and HEALTHCHECK, read from the
    Dockerfile) run here with the image's folders mapped into tmp_path: the demo answers, mails,
    writes only to its state folder, and stops cleanly on SIGTERM."""
    stage = dict(final_stage((ROOT / "Dockerfile").read_text()))
    etc, state = tmp_path / "etc", tmp_path / "state"
    shutil.copytree(ROOT / "config", etc, ignore=shutil.ignore_patterns("*.db*"))
    state.mkdir()
    port = free_port()

    def mapped(text: str) -> str:
        bin_dir = str(Path(sys.executable).parent)
        return (
            text.replace("/etc/declic", str(etc))
            .replace("/var/lib/declic", str(state))
            .replace("/opt/declic/bin", bin_dir)
        )

    image_env = dict(re.findall(r"(\w+)=(\S+)", stage["ENV"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DECLIC_", "SMTP_"))}
    env |= {k: mapped(v).replace("$PATH", os.environ["PATH"]) for k, v in image_env.items()}
    command = [*json.loads(stage["ENTRYPOINT"]), *json.loads(stage["CMD"])]
    command = [mapped(c) for c in command]
    command[command.index("--port") + 1] = str(port)
    health = json.loads(stage["HEALTHCHECK"].split(" CMD ", 1)[1])
    health = [mapped(part).replace(":8080/", f":{port}/") for part in health]
    assert stage["WORKDIR"] == "/var/lib/declic" and stage["USER"] == "10001:10001"
    before = sorted(p.relative_to(etc) for p in etc.rglob("*"))

    smtp = SmtpCatcher().start()
    env |= {"SMTP_PORT": str(smtp.port)}
    log = tmp_path / "declic.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, cwd=state, stdout=out, stderr=subprocess.STDOUT)
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()
            return subprocess.run(health, env=env, capture_output=True, timeout=10).returncode == 0

        wait_until(healthy, 30, "the HEALTHCHECK to pass")
        body = order_body(1)
        headers = shopify_headers(body, "demo-secret", "orders/create", "image-1")
        assert request(f"http://127.0.0.1:{port}/hooks/shop", body, headers).status == 200
        wait_until(lambda: len(smtp.messages) == 1, 30, "the order confirmation")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        smtp.stop()
    text = log.read_text()
    events = [json.loads(line)["event"] for line in text.splitlines()]
    assert events[0] == "listening" and events[-1] == "gateway stopped", text
    assert sorted(p.relative_to(etc) for p in etc.rglob("*")) == before  # the config folder may be read-only
    assert (state / "declic.db").exists()
