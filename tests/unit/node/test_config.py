"""Settings: YAML file, ``MEDNODE_*`` overrides, and start-up errors that name the broken key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from node.config import ConfigError, Destination, Settings, load_settings


def _yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mednode.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_embedded_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert (settings.ae_title, settings.dicom_port, settings.web_port) == ("MEDNODE", 11112, 8080)
    assert settings.web_host == "127.0.0.1"
    assert settings.data_dir == Path("var")
    assert settings.database == f"sqlite:///{tmp_path / 'var' / 'mednode.db'}"
    assert settings.broker.startswith("sqla+sqlite:///") and settings.broker.endswith("broker.db")
    assert settings.destination is None
    assert [r.name for r in settings.effective_rules] == ["ct-analysis"]
    assert settings.effective_rules[0].destinations == []


def test_yaml_file_is_read(tmp_path: Path) -> None:
    path = _yaml(tmp_path, """
ae_title: FROMYAML
dicom_port: 4000
web_port: 4001
quiet_period_s: 7.5
destination: PACS@10.0.0.5:104
destinations:
  archive: ARCHIVE@archive.example:11112
delivery:
  give_up_after_s: 60
rules:
  - name: chest-ct
    match: {modality: CT, body_part_examined: "chest|thorax"}
    tasks: [ct_analysis]
    priority: 8
    destinations: [default, archive, "OTHER@127.0.0.1:105"]
""")
    settings = load_settings(path)
    assert settings.ae_title == "FROMYAML"
    assert (settings.dicom_port, settings.web_port, settings.quiet_period_s) == (4000, 4001, 7.5)
    assert settings.destination == Destination(ae_title="PACS", host="10.0.0.5", port=104)
    assert settings.delivery.give_up_after_s == 60
    [rule] = settings.effective_rules
    assert rule.match.modality == ["CT"]
    assert rule.priority == 8
    resolved = [str(settings.resolve_destination(d)) for d in rule.destinations]
    assert resolved == ["PACS@10.0.0.5:104", "ARCHIVE@archive.example:11112", "OTHER@127.0.0.1:105"]


ENV_CASES = [
    ("MEDNODE_AE_TITLE", "ENVNODE", "ae_title", "ENVNODE"),
    ("MEDNODE_DICOM_PORT", "11113", "dicom_port", 11113),
    ("MEDNODE_WEB_PORT", "8081", "web_port", 8081),
    ("MEDNODE_DATA_DIR", "/srv/mednode", "data_dir", Path("/srv/mednode")),
    ("MEDNODE_DATABASE_URL", "postgresql+psycopg://u@db:5432/m", "database_url", "postgresql+psycopg://u@db:5432/m"),
    ("MEDNODE_BROKER_URL", "amqp://guest:guest@mq:5672//", "broker_url", "amqp://guest:guest@mq:5672//"),
    ("MEDNODE_QUIET_PERIOD_S", "2.5", "quiet_period_s", 2.5),
    ("MEDNODE_DESTINATION", "ORTHANC@127.0.0.1:4242", "destination",
     Destination(ae_title="ORTHANC", host="127.0.0.1", port=4242)),
    ("MEDNODE_DELIVERY__GIVE_UP_AFTER_S", "30", "delivery.give_up_after_s", 30.0),
    ("MEDNODE_MIN_FREE_DISK_MB", "0", "min_free_disk_mb", 0),
]


@pytest.mark.parametrize(("env", "value", "attribute", "expected"), ENV_CASES)
def test_environment_overrides_the_yaml_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: str, value: str, attribute: str, expected: object
) -> None:
    path = _yaml(tmp_path, """
ae_title: FROMYAML
dicom_port: 4000
web_port: 4001
data_dir: /from/yaml
database_url: sqlite:////from/yaml.db
broker_url: memory://
quiet_period_s: 99
destination: YAML@10.0.0.1:104
delivery: {give_up_after_s: 999}
min_free_disk_mb: 5
""")
    monkeypatch.setenv(env, value)
    settings = load_settings(path)
    found: object = settings
    for part in attribute.split("."):
        found = getattr(found, part)
    assert found == expected
    if attribute != "ae_title":
        assert settings.ae_title == "FROMYAML"  # the rest still comes from the file


def test_database_and_broker_urls_are_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNODE_DATABASE_URL", "postgresql+psycopg://u@db:5432/m")
    monkeypatch.setenv("MEDNODE_BROKER_URL", "amqp://guest:guest@mq:5672//")
    settings = load_settings()
    assert settings.database == "postgresql+psycopg://u@db:5432/m"
    assert settings.broker == "amqp://guest:guest@mq:5672//"


def test_listener_processes_default_to_the_cores_on_postgresql_and_one_on_sqlite(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from node import config as config_module

    monkeypatch.setattr(config_module, "usable_cores", lambda: 3)
    assert load_settings().listener_processes == 1  # SQLite: one writer at a time
    postgres = "postgresql+psycopg://u@db:5432/m"
    assert load_settings(database_url=postgres).listener_processes == 3
    assert load_settings(database_url=postgres, listener_processes=1).listener_processes == 1
    monkeypatch.setattr(config_module, "usable_cores", lambda: 64)
    assert load_settings(database_url=postgres).listener_processes == config_module.MAX_AUTO_LISTENER_PROCESSES
    with pytest.raises(ConfigError, match="need database_url on PostgreSQL"):
        load_settings(listener_processes=2)


def test_destination_env_feeds_the_default_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNODE_DESTINATION", "PACS@[::1]:104")
    settings = load_settings()
    assert settings.destination == Destination(ae_title="PACS", host="::1", port=104)
    [rule] = settings.effective_rules
    assert [str(settings.resolve_destination(d)) for d in rule.destinations] == ["PACS@::1:104"]


INVALID_ENV = [
    ("MEDNODE_AE_TITLE", "THIS_IS_SEVENTEEN", "ae_title"),
    ("MEDNODE_AE_TITLE", "BACK\\SLASH", "ae_title"),
    ("MEDNODE_DICOM_PORT", "70000", "dicom_port"),
    ("MEDNODE_DICOM_PORT", "0", "dicom_port"),
    ("MEDNODE_WEB_PORT", "http", "web_port"),
    ("MEDNODE_QUIET_PERIOD_S", "-1", "quiet_period_s"),
    ("MEDNODE_QUIET_PERIOD_S", "soon", "quiet_period_s"),
    ("MEDNODE_DESTINATION", "just-a-host:104", "destination"),
    ("MEDNODE_DESTINATION", "PACS@host:99999", "destination"),
    ("MEDNODE_MIN_FREE_DISK_MB", "-5", "min_free_disk_mb"),
    ("MEDNODE_LOG_LEVEL", "LOUD", "log_level"),
]


@pytest.mark.parametrize(("env", "value", "key"), INVALID_ENV)
def test_invalid_environment_value_names_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, key: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError) as raised:
        load_settings()
    message = str(raised.value)
    assert key in message
    assert f"(env {env})" in message, f"the message should name the variable to fix: {message}"


def test_invalid_nested_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDNODE_DELIVERY__RETRY_INITIAL_S", "-1")
    with pytest.raises(ConfigError) as raised:
        load_settings()
    assert "delivery.retry_initial_s" in str(raised.value)
    assert "(env MEDNODE_DELIVERY__RETRY_INITIAL_S)" in str(raised.value)


def test_invalid_yaml_value_names_the_key(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "dicom_port: 123456\nae_title: OK\n")
    with pytest.raises(ConfigError, match="dicom_port"):
        load_settings(path)


def test_unknown_yaml_key_is_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "dicom_prot: 104\n")
    with pytest.raises(ConfigError, match="dicom_prot"):
        load_settings(path)


def test_missing_and_unparsable_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError):
        load_settings(_yaml(tmp_path, "rules: [\n  - {name: x\n"))


def test_rule_naming_an_unknown_destination_is_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, """
destinations:
  pacs: PACS@10.0.0.5:104
rules:
  - name: ct
    match: {modality: CT}
    tasks: [ct_analysis]
    destinations: [pacs, nowhere]
""")
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    assert "rules.ct.destinations" in str(raised.value) and "'nowhere'" in str(raised.value)


def test_default_destination_without_destination_is_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "rules:\n  - {name: ct, match: {modality: CT}, tasks: [ct_analysis]}\n")
    with pytest.raises(ConfigError, match="MEDNODE_DESTINATION"):
        load_settings(path)


@pytest.mark.parametrize(
    "rule",
    [
        "{name: ct, tasks: []}",
        "{name: 'bad name', tasks: [ct_analysis]}",
        "{name: ct, tasks: [ct_analysis], priority: 10}",
        "{name: ct, tasks: [ct_analysis], match: {series_description: '(unclosed'}}",
        "{name: ct, tasks: [ct_analysis], match: {modality_typo: CT}}",
        "{name: ct, tasks: [ct_analysis], quiet_period_s: 0}",
    ],
)
def test_invalid_rules_are_refused_with_the_rule_key(tmp_path: Path, rule: str) -> None:
    path = _yaml(tmp_path, f"destination: PACS@127.0.0.1:104\nrules:\n  - {rule}\n")
    with pytest.raises(ConfigError, match=r"rules\.0"):
        load_settings(path)


def test_duplicate_rule_names_are_refused(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "rules:\n  - {name: ct, tasks: [a], destinations: []}\n"
                           "  - {name: ct, tasks: [b], destinations: []}\n")
    with pytest.raises(ConfigError, match="duplicate"):
        load_settings(path)


def test_keyword_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch,
                                                settings_for: Callable[..., Settings]) -> None:
    monkeypatch.setenv("MEDNODE_DICOM_PORT", "2000")
    assert settings_for(dicom_port=3000).dicom_port == 3000


def test_vlm_on_a_server_needs_no_path(tmp_path: Path) -> None:
    path = _yaml(tmp_path, "models:\n  vlm: {server: 'http://127.0.0.1:8000', model: medgemma-4b, "
                           "family: medgemma}\n")
    vlm = load_settings(path).models.vlm
    assert vlm is not None and vlm.path is None
    assert (vlm.server, vlm.model, vlm.family) == ("http://127.0.0.1:8000", "medgemma-4b", "medgemma")


@pytest.mark.parametrize(("vlm", "key"), [
    ("{server: 'http://127.0.0.1:8000', family: medgemma}", "models.vlm.model"),
    ("{model: medgemma-4b, family: medgemma, path: /m}", "models.vlm.server"),
    ("{server: 'http://127.0.0.1:8000', model: m}", "models.vlm.family"),
    ("{family: medgemma}", "models.vlm"),
    ("{server: '127.0.0.1:8000', model: m, family: medgemma}", "server"),
])
def test_vlm_server_settings_are_checked_with_the_key(tmp_path: Path, vlm: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(_yaml(tmp_path, f"models:\n  vlm: {vlm}\n"))


def test_vlm_server_from_the_environment_and_empty_values_as_unset(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """What docker-compose.yml passes: MEDNODE_VLM_SERVER/_MODEL/_FAMILY, empty when not used."""
    for name in ("SERVER", "MODEL", "FAMILY", "PATH"):
        monkeypatch.setenv(f"MEDNODE_VLM_{name}", "")
    assert load_settings(_yaml(tmp_path, "log_level: INFO\n")).models.vlm is None
    monkeypatch.setenv("MEDNODE_VLM_SERVER", "http://vllm:8000")
    monkeypatch.setenv("MEDNODE_VLM_MODEL", "medgemma")
    monkeypatch.setenv("MEDNODE_VLM_FAMILY", "medgemma")
    vlm = load_settings(_yaml(tmp_path, "models:\n  vlm: {server_timeout_s: 60}\n")).models.vlm
    assert vlm is not None and vlm.path is None
    assert (vlm.server, vlm.model, vlm.family, vlm.server_timeout_s) == ("http://vllm:8000", "medgemma",
                                                                         "medgemma", 60)


def test_the_public_url_of_the_web_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings().web_public_url is None
    monkeypatch.setenv("MEDNODE_WEB_PUBLIC_URL", "https://mednode.example.org:8443/")
    assert load_settings().web_public_url == "https://mednode.example.org:8443"
    for wrong in ("mednode.example.org", "ftp://mednode.example.org", "https://mednode.example.org/?a=1"):
        monkeypatch.setenv("MEDNODE_WEB_PUBLIC_URL", wrong)
        with pytest.raises(ConfigError, match="web_public_url"):
            load_settings()
