"""What a worker process consumes and holds — its queues, model, device, GPU memory, batch settings —
for the Workers page.

Two ways it reaches the web process, one per kind of broker:

* RabbitMQ / Redis: the ``mednode_info`` remote-control command (:mod:`node.tasks`) answers
  :func:`process_info` to the dashboard's broadcast;
* the embedded SQLite broker: kombu's SQLAlchemy transport has no broadcast, so each worker writes
  :func:`process_info` to ``<data_dir>/workers/<name>.json`` every :data:`HEARTBEAT_S` and the web
  process reads the fresh files (:func:`read_status_files`). The embedded default runs on one
  machine, where ``data_dir`` is that machine's.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from celery import bootsteps

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
#: A status file older than this belongs to a worker that is gone.
STALE_S = 3 * HEARTBEAT_S


def _gpu_memory_mb(device: str) -> tuple[float | None, float | None]:
    """(allocated, reserved) MiB on a CUDA ``device``; (None, None) elsewhere."""
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return None, None
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return (round(torch.cuda.memory_allocated(index) / 2**20, 1),
            round(torch.cuda.memory_reserved(index) / 2**20, 1))


def model_info() -> list[dict[str, Any]]:
    """One entry per in-process model this process holds (none before the first job loads one)."""
    if "inference.vlm.loader" not in sys.modules:  # a delivery worker: no model runtime imported
        return []
    from inference.vlm.loader import loaded_vlms

    out = []
    for vlm in loaded_vlms():
        allocated, reserved = _gpu_memory_mb(vlm.device)
        out.append({
            "name": vlm.info.name, "family": vlm.info.family, "version": vlm.info.version,
            "device": vlm.device, "dtype": str(vlm.dtype).removeprefix("torch."),
            "batch_size": vlm.generation_queue().max_batch,
            "pending_prompts": vlm.generation_queue().pending(),
            "gpu_memory_allocated_mb": allocated, "gpu_memory_reserved_mb": reserved,
        })
    return out


#: this worker process's urgent slots (set by ``mednode worker``), for the remote-control answer
URGENT_SLOTS: dict[str, int] = {}


def consumed_queues(consumer: Any) -> list[str]:
    """The queues a running worker's ``consumer`` (``celery.worker.consumer.Consumer``) takes
    messages from: its task consumer's and those of its consumer bootsteps, such as the urgent
    slots (:mod:`node.urgent_slots`), which Celery's ``active_queues`` does not list."""
    kombu_consumers = [consumer.task_consumer] if consumer.task_consumer is not None else []
    for step in consumer.blueprint.steps.values():
        if isinstance(step, bootsteps.ConsumerStep):
            kombu_consumers.extend(step.consumers or [])
    return [queue.name for kombu_consumer in kombu_consumers for queue in kombu_consumer.queues]


def process_info(*, queues: list[str] | None = None, concurrency: int | None = None,
                 pool: str | None = None, urgent_slots: int | None = None) -> dict[str, Any]:
    """This worker process: the queues it consumes, its models and, summed over them, GPU memory
    (None without CUDA)."""
    models = model_info()
    allocated = [m["gpu_memory_allocated_mb"] for m in models if m["gpu_memory_allocated_mb"] is not None]
    reserved = [m["gpu_memory_reserved_mb"] for m in models if m["gpu_memory_reserved_mb"] is not None]
    first = models[0] if models else {}
    return {
        "pid": os.getpid(), "queues": queues, "concurrency": concurrency, "pool": pool,
        "urgent_slots": URGENT_SLOTS.get("n") if urgent_slots is None else urgent_slots,
        "model": ", ".join(f"{m['name']} ({m['family']}, {m['version']})" for m in models) or None,
        "device": first.get("device"), "batch_size": first.get("batch_size"),
        "gpu_memory_mb": sum(allocated) if allocated else None,
        "gpu_memory_reserved_mb": sum(reserved) if reserved else None,
        "models": models, "updated_at": time.time(),
    }


def status_dir(data_dir: Path) -> Path:
    return data_dir / "workers"


class StatusFile:
    """Writes this worker's :func:`process_info` to ``<data_dir>/workers/<name>.json`` every
    :data:`HEARTBEAT_S` (atomically: write, then rename) and removes it on :meth:`stop`."""

    def __init__(self, data_dir: Path, name: str, **info: Any) -> None:
        self.path = status_dir(data_dir) / f"{name.replace('/', '_')}.json"
        self.name, self.info = name, info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="worker-status", daemon=True)

    def start(self) -> StatusFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()
        self._thread.start()
        return self

    def write(self) -> None:
        partial = self.path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"name": self.name, **process_info(**self.info)}), encoding="utf-8")
        partial.replace(self.path)

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.write()
            except OSError as exc:  # a full or read-only disk must not stop the worker
                log.warning("could not write the worker status file %s: %s", self.path, exc)

    def stop(self) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)


def read_status_files(data_dir: Path, *, now: float | None = None) -> dict[str, dict[str, Any]]:
    """The fresh status files of ``data_dir``'s workers, by worker name."""
    now = time.time() if now is None else now
    found: dict[str, dict[str, Any]] = {}
    folder = status_dir(data_dir)
    if not folder.is_dir():
        return found
    for file in folder.glob("*.json"):
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # removed or being replaced right now
            continue
        if isinstance(info, dict) and now - float(info.get("updated_at", 0)) <= STALE_S:
            found[str(info.get("name", file.stem))] = info
    return found
