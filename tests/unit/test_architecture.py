"""The dependency direction of ARCHITECTURE.md holds: import-linter's contracts in setup.cfg pass."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def _lint_imports() -> str:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if found is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[dev]' (import-linter)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_lint_imports(), "--no-cache", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def _contract_names(config: Path) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(config)
    return [parser[s]["name"] for s in parser.sections() if s.startswith("importlinter:contract:")]


def test_import_contracts_are_kept() -> None:
    names = _contract_names(REPO_ROOT / "setup.cfg")
    assert len(names) >= 3, "setup.cfg lost its import-linter contracts"
    done = _run()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for name in names:
        assert f"{name} KEPT" in output, f"contract {name!r} was not checked:\n{output}"
    assert "0 broken" in output


def test_a_broken_contract_is_reported(tmp_path: Path) -> None:
    """The check is real: a contract the code does break makes lint-imports fail."""
    config = tmp_path / "broken.ini"
    config.write_text(
        "[importlinter]\nroot_packages =\n    node\n    storage\n\n"
        "[importlinter:contract:test]\nname = node never imports storage\ntype = forbidden\n"
        "source_modules =\n    node\nforbidden_modules =\n    storage\n"
    )
    done = _run("--config", str(config))
    assert done.returncode != 0
    assert "BROKEN" in done.stdout
