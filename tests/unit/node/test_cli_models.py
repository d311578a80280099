"""``mednode models pull`` where no hub can be reached says so and exits non-zero."""

from __future__ import annotations

from typer.testing import CliRunner

from node.cli import app


def test_models_pull_without_network_says_it_cannot(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without a network amounts to
    monkeypatch.setenv("MEDNODE_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["models", "pull", "google/medgemma-4b-it", "--dest", str(tmp_path / "m")])
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "cannot download google/medgemma-4b-it" in output
    assert "MEDNODE_VLM_PATH" in output
    assert not any((tmp_path / "m").glob("*.safetensors"))
