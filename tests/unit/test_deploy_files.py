"""docker-compose.yml and Dockerfile.gpu, checked as far as is possible without a Docker engine.

Neither `docker compose` nor an engine runs here, so these tests read the files: what the
services are, what they wait for, what they share, and that every name they use exists in
the code (settings, commands, routes, modules).
"""

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app import app
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"api", "worker", "redis", "postgres"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of Dockerfile.gpu, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile.gpu").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(maxsplit=1)[0].upper(), line.split(maxsplit=1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _command(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else command


def test_the_four_services_each_have_a_health_check(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == SERVICES
    for name, service in compose["services"].items():
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no health check"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name


def test_the_api_and_workers_start_once_what_they_need_is_healthy(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, needs in {
        "api": {"postgres", "redis"},
        "worker": {"postgres", "redis", "api"},
    }.items():
        depends = services[name]["depends_on"]
        assert set(depends) == needs, name
        assert {d["condition"] for d in depends.values()} == {"service_healthy"}, name


def test_the_worker_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    # Compose refuses a device with both, and one with neither reserves nothing countable.
    assert all(("count" in d) != ("device_ids" in d) for d in devices)
    assert "container_name" not in compose["services"]["worker"], "it would block --scale"


def test_api_and_workers_share_the_data_directory_on_a_named_volume(
    compose: dict[str, Any],
) -> None:
    mounts = {}
    for name in ("api", "worker"):
        service = compose["services"][name]
        data_dir = service["environment"]["ALLY_DATA_DIR"]
        mounted = dict(volume.split(":")[::-1][:2] for volume in service["volumes"])
        assert data_dir in mounted, f"{name} keeps {data_dir} on its own disk"
        mounts[name] = (mounted[data_dir], data_dir)
    assert mounts["api"] == mounts["worker"]
    volume = mounts["api"][0]
    assert volume in compose["volumes"], "a named volume, declared at the top level"
    for name, path in (("postgres", "/var/lib/postgresql/data"), ("redis", "/data")):
        [mount] = compose["services"][name]["volumes"]
        assert mount.split(":")[1] == path and mount.split(":")[0] in compose["volumes"]


def test_every_setting_the_services_pass_is_one_the_code_reads(compose: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        environment = compose["services"][name]["environment"]
        assert {"ALLY_DATABASE_URL", "ALLY_BROKER_URL", "ALLY_DATA_DIR"} <= set(environment)
        for variable in environment:
            assert variable.startswith("ALLY_"), variable
            assert variable.removeprefix("ALLY_").lower() in Settings.model_fields, variable
    environment = compose["services"]["worker"]["environment"]
    assert environment["ALLY_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert environment["ALLY_DATABASE_URL"].split("@")[1].startswith("postgres:5432/")
    assert environment["ALLY_BROKER_URL"].startswith("redis://redis:6379/")
    assert compose["services"]["api"]["environment"] == environment


def test_the_round_time_limit_defaults_stay_below_the_redelivery_timeout(
    compose: dict[str, Any],
) -> None:
    environment = compose["services"]["worker"]["environment"]

    def default(variable: str) -> int:
        match = re.fullmatch(r"\$\{\w+:-(\d+)\}", str(environment[variable]))
        assert match, f"{variable}: expected ${{NAME:-default}}"
        return int(match.group(1))

    limit = default("ALLY_ROUND_TIME_LIMIT_SECONDS")
    assert limit < default("ALLY_BROKER_VISIBILITY_TIMEOUT_SECONDS")
    assert limit == Settings.model_fields["round_time_limit_seconds"].default


def test_the_commands_and_probes_name_what_exists(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api = _command(services["api"])
    assert api[:2] == ["ally", "serve"] and api[api.index("--host") + 1] == "0.0.0.0"
    port = api[api.index("--port") + 1]
    assert any(mapping.endswith(f":{port}") for mapping in services["api"]["ports"])
    assert _command(services["worker"])[:2] == ["ally", "worker"]
    probe = " ".join(services["api"]["healthcheck"]["test"])
    path = re.search(rf"127\.0\.0\.1:{port}(/\w+)", probe)
    assert path and path.group(1) in app.openapi()["paths"]
    worker_probe = " ".join(services["worker"]["healthcheck"]["test"])
    module = re.search(r"celery -A ([\w.]+) inspect ping", worker_probe)
    assert module and importlib.util.find_spec(module.group(1)) is not None
    assert "$$HOSTNAME" in worker_probe  # $$: the container's shell expands it, not Compose
    for name in ("api", "worker"):
        assert services[name]["build"]["dockerfile"] == "Dockerfile.gpu"
        assert services[name]["image"] == services["worker"]["image"]


def test_the_image_is_cuda_runtime_python_3_11_plus_and_runs_the_worker_unprivileged(
    dockerfile: list[tuple[str, str]],
) -> None:
    arguments = dict(args.split("=", 1) for instruction, args in dockerfile if instruction == "ARG")
    [base] = [args for instruction, args in dockerfile if instruction == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: arguments[m.group(1)], base)
    match = re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu(?P<ubuntu>[\d.]+)", image)
    assert match, image
    # The distribution's python3: 3.12 on 24.04; 22.04's 3.10 is too old for this project.
    assert match.group("ubuntu") == "24.04"
    instructions = [instruction for instruction, _ in dockerfile]
    users = [args for instruction, args in dockerfile if instruction == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert instructions.index("USER") > max(
        i for i, instruction in enumerate(instructions) if instruction == "RUN"
    )
    [cmd] = [args for instruction, args in dockerfile if instruction == "CMD"]
    assert yaml.safe_load(cmd)[:2] == ["ally", "worker"]
    installs = " ".join(args for instruction, args in dockerfile if instruction == "RUN")
    assert "pip install" in installs


def test_the_image_gets_every_file_it_copies(dockerfile: list[tuple[str, str]]) -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "data"} <= ignored
    for instruction, args in dockerfile:
        if instruction == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source not in ignored and source.rstrip("/") not in ignored, source
