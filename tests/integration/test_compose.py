"""docker-compose.yml is valid Compose and wires the services the way the node expects.

``docker compose config`` (or Debian's ``docker-compose config``) parses, interpolates and
normalises the file without a Docker engine, so this runs on CI machines that have none.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from node.config import load_settings
from tests.peers import find_tool, require_tool
from tests.peers.processes import ToolMissingError

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
SERVICES = {"postgres", "rabbitmq", "node", "worker", "orthanc"}
MEDNODE_SERVICES = ("node", "worker")
#: started only with ``--profile gpu`` (Debian's docker-compose 1.29 lists them in ``config`` anyway)
GPU_SERVICES = {"vllm"}
SECRET = "s" * 40


def compose_command() -> list[str]:
    """Return ``docker compose`` when the plugin works, else ``docker-compose``."""
    try:
        docker = find_tool("docker")
    except ToolMissingError:
        docker = None
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    return [require_tool("docker-compose")]


def run_compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    """Run ``compose config`` on the repository's file with only ``env`` of ours set."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("POSTGRES_", "RABBITMQ_", "MEDNODE_", "COMPOSE_"))
    }
    return subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**clean, **env},
        timeout=60,
        check=False,
    )


def compose_config(**env: str) -> dict[str, Any]:
    """Return the parsed ``compose config`` with ``env`` (and a secret key) set."""
    done = run_compose_config(**{"MEDNODE_SECRET_KEY": SECRET, **env})
    assert done.returncode == 0, f"compose config failed:\n{done.stderr}\n{done.stdout}"
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return compose_config()


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services_and_healthchecks(config: dict[str, Any]) -> None:
    services = config["services"]
    assert set(services) - GPU_SERVICES == SERVICES
    for name in set(services) & GPU_SERVICES:
        assert services[name]["profiles"] == ["gpu"], f"{name} would start without a GPU"
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in MEDNODE_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["rabbitmq"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name, command", [("node", ["serve"]), ("worker", ["worker"])])
def test_node_and_worker_env(config: dict[str, Any], name: str, command: list[str]) -> None:
    service = config["services"][name]
    assert service["command"] == command
    assert Path(service["build"]["context"]).resolve() == REPO_ROOT
    env = env_of(service)
    db = urlsplit(env["MEDNODE_DATABASE_URL"])
    assert (db.scheme, db.hostname, db.path) == ("postgresql+psycopg", "postgres", "/mednode")
    broker = urlsplit(env["MEDNODE_BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("amqp", "rabbitmq", 5672)
    assert env["MEDNODE_DESTINATION"] == "ORTHANC@orthanc:4242"
    assert env["MEDNODE_EMBEDDED_WORKER"] == "false"
    assert env["TCP_NODELAY"] == "1"
    assert env["MEDNODE_WEB_SECRET_KEY"] == SECRET


def test_node_settings_accept_the_compose_env(
    config: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env names are real settings: the node's own loader reads them as intended."""
    for key in list(os.environ):
        if key.startswith("MEDNODE_"):
            monkeypatch.delenv(key)
    for key, value in env_of(config["services"]["node"]).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    assert settings.database.startswith("postgresql+psycopg://mednode:")
    assert settings.broker.startswith("amqp://")
    assert settings.embedded_worker is False
    assert settings.destination is not None
    assert (settings.destination.ae_title, settings.destination.host) == ("ORTHANC", "orthanc")
    assert settings.destination.port == 4242
    assert settings.web_host == "0.0.0.0" and settings.dicom_port == 11112
    assert settings.web_secret_key is not None and settings.web_secret_key.get_secret_value() == SECRET
    assert settings.models.vlm is None  # the MEDNODE_VLM_* pass-throughs are empty by default


def test_the_gpu_profile_serves_the_model_to_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--profile gpu``: vLLM on an NVIDIA GPU, serving the name the workers ask for; the
    workers' settings point at it through MEDNODE_VLM_SERVER/_MODEL/_FAMILY."""
    config = compose_config(COMPOSE_PROFILES="gpu", MEDNODE_VLM_SERVER="http://vllm:8000",
                            MEDNODE_VLM_MODEL="medgemma-1.5", MEDNODE_VLM_FAMILY="medgemma",
                            VLLM_MODEL="medgemma-1.5-4b-it")
    vllm = config["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    [device] = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    command = [str(c) for c in vllm["command"]]
    assert command[0] == "/models/medgemma-1.5-4b-it"
    assert command[command.index("--served-model-name") + 1] == "medgemma-1.5"
    assert vllm["healthcheck"]["test"]
    for key in list(os.environ):
        if key.startswith("MEDNODE_"):
            monkeypatch.delenv(key)
    for key, value in env_of(config["services"]["worker"]).items():
        monkeypatch.setenv(key, value)
    vlm = load_settings().models.vlm
    assert vlm is not None and vlm.path is None
    assert (vlm.server, vlm.model, vlm.family) == ("http://vllm:8000", "medgemma-1.5", "medgemma")


def test_listener_and_worker_share_the_instance_volume(config: dict[str, Any]) -> None:
    def data_mounts(name: str) -> set[tuple[str, str]]:
        mounts = set()
        for volume in config["services"][name]["volumes"]:
            if isinstance(volume, str):
                source, target = volume.split(":")[:2]
            else:
                source, target = volume["source"], volume["target"]
            mounts.add((source, target))
        return mounts

    data_dir = env_of(config["services"]["node"])["MEDNODE_DATA_DIR"]
    for worker in ("worker",):
        shared = data_mounts("node") & data_mounts(worker)
        assert any(target == data_dir for _, target in shared), shared
        assert {source for source, _ in shared} <= set(config["volumes"])
        # the workers' metrics reach the node's /metrics through <data_dir>/metrics on that volume
        assert env_of(config["services"][worker])["MEDNODE_DATA_DIR"] == data_dir
        assert "PROMETHEUS_MULTIPROC_DIR" not in env_of(config["services"][worker])


def test_orthanc_knows_the_node_as_a_modality(config: dict[str, Any]) -> None:
    orthanc = config["services"]["orthanc"]
    assert orthanc["image"].startswith(("orthancteam/orthanc", "jodogne/orthanc"))
    env = env_of(orthanc)
    modalities = json.loads(env["ORTHANC__DICOM_MODALITIES"])
    node_env = env_of(config["services"]["node"])
    assert modalities["mednode"] == [
        node_env["MEDNODE_AE_TITLE"],
        "node",
        int(node_env["MEDNODE_DICOM_PORT"]),
    ]
    assert env["ORTHANC__DICOM_AET"] == "ORTHANC" and env["ORTHANC__DICOM_PORT"] == "4242"


def test_compose_refuses_to_run_without_a_secret_key() -> None:
    done = run_compose_config()
    assert done.returncode != 0
    assert "MEDNODE_SECRET_KEY" in done.stderr + done.stdout


def test_passwords_come_from_the_environment() -> None:
    config = compose_config(POSTGRES_PASSWORD="pg-from-env", RABBITMQ_PASSWORD="mq-from-env")
    services = config["services"]
    assert env_of(services["postgres"])["POSTGRES_PASSWORD"] == "pg-from-env"
    assert env_of(services["rabbitmq"])["RABBITMQ_DEFAULT_PASS"] == "mq-from-env"
    for name in MEDNODE_SERVICES:
        env = env_of(services[name])
        assert urlsplit(env["MEDNODE_DATABASE_URL"]).password == "pg-from-env"
        assert urlsplit(env["MEDNODE_BROKER_URL"]).password == "mq-from-env"


def test_dockerfile_builds_from_python_311_slim_with_constraints() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    assert [line for line in text.splitlines() if line.startswith("FROM ")] == [
        "FROM python:3.11-slim"
    ]
    assert "-c constraints.txt" in text
    assert "USER mednode" in text
