"""A worker freezes its start-up objects for the cyclic garbage collector (issue 16): once before
Celery's worker starts, again when it is ready, and in each prefork child, and considers full
collections rarely (it runs one after each job), so no job pays for a full collection that walks
the objects of the worker's imports (~0.8 million in an inference worker: 0.3–1.3 s each,
docs/BENCHMARKS.md, latency run 5)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

from node.collector import FULL_COLLECTION_EVERY
from tests.integration.conftest import REPO_ROOT
from tests.peers.processes import ManagedProcess

FROZEN = re.compile(r" (\S+) node\.collector: start-up objects frozen: (\d+) kept out of the cyclic garbage "
                    r"collector, a full collection considered every (\d+) ")


def test_a_worker_and_its_pool_freeze_their_start_up_objects(tmp_path: Path) -> None:
    env = {"MEDNODE_DATA_DIR": str(tmp_path / "var"), "MEDNODE_LOG_LEVEL": "INFO"}
    # a delivery worker of two processes: the prefork pool (an inference worker runs the solo or
    # thread pool, the same start-up without the children)
    worker = ManagedProcess([sys.executable, "-m", "node.cli", "worker", "--queues", "delivery",
                             "--concurrency", "2"], log_dir=tmp_path, name="worker", env=env, cwd=REPO_ROOT)
    worker.start()
    try:
        deadline = time.monotonic() + 90
        text = ""
        while time.monotonic() < deadline and not re.search(r"@\S+ ready\.", text):
            assert worker.is_running, f"the worker exited:\n{worker.log_tail()}"
            time.sleep(0.2)
            text = worker.log_path.read_text(errors="replace")
        frozen: dict[str, list[int]] = {}
        for process, count, every in FROZEN.findall(text):
            frozen.setdefault(process, []).append(int(count))
            assert int(every) == FULL_COLLECTION_EVERY
        # the main process before Celery's worker starts (what the imports left) and on
        # worker_ready (what Celery's start-up added: a frozen object stays frozen, so the count
        # holds the first); each child once, on worker_process_init, inheriting the first
        main = frozen.pop("MainProcess", [])
        assert len(main) == 2 and main[0] > 100_000 and main[1] >= main[0], f"{main}\n{worker.log_tail()}"
        assert sorted(frozen) == ["ForkPoolWorker-1", "ForkPoolWorker-2"], f"{frozen}\n{worker.log_tail()}"
        assert all(len(c) == 1 and c[0] >= main[0] for c in frozen.values()), frozen
        assert worker.is_running, worker.log_tail()
    finally:
        worker.stop()
