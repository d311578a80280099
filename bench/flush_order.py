#!/usr/bin/env python3
"""One flush or two per instance: the ingestor on PostgreSQL, the row's commit after the file's
sync (the order before issue 14's change) or while it runs, alternating in one process.

A fresh PostgreSQL database (127.0.0.1:5432) and store per round; ``--instances`` 512×512 CT
instances of one series (``bench.ingest.generate_study``) go through
:meth:`node.ingest.Ingestor.ingest` one after another, in blocks of ``--block`` that alternate
between the two orders (``two flushes`` makes :attr:`storage.store.PendingInstance.syncing_in_background`
false, which is exactly the code path before the change: sync, then the statement). Reports the
wall time of each ``ingest`` call (what a C-STORE waits for in the handler) and the process's CPU
time per instance, per order. No network, no pynetdicom: only the handler's own wait.

Usage::

    /work/main/.venv/bin/python bench/flush_order.py --instances 600 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.ingest import _load, generate_study, machine
from node.ingest import Ingestor
from storage.db import make_engine, make_session_factory, upgrade
from storage.store import InstanceStore, PendingInstance
from tests.peers.services import postgres_database

ORDERS = ("two flushes", "one flush")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=600)
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    background = PendingInstance.syncing_in_background
    walls: dict[str, list[float]] = {order: [] for order in ORDERS}
    cpus: dict[str, list[float]] = {order: [] for order in ORDERS}
    loads = [_load()]
    with tempfile.TemporaryDirectory(prefix="mednode-flush-") as tmp:
        studies = Path(tmp) / "study"
        generate_study(studies, args.instances + 1)
        files = sorted(studies.iterdir())
        data = [f.read_bytes() for f in files]
        for round_number in range(args.rounds):
            with postgres_database("mednode_flush") as url:
                engine = make_engine(url)
                upgrade(engine)
                ingestor = Ingestor(InstanceStore(Path(tmp) / f"store{round_number}"), make_session_factory(engine))
                ingestor.ingest(data[0], calling_ae_title="CT", called_ae_title="MEDNODE")  # the series
                for start in range(1, len(data), args.block):
                    order = ORDERS[(start // args.block + round_number) % 2]
                    PendingInstance.syncing_in_background = (  # type: ignore[method-assign]
                        background if order == "one flush" else property(lambda _self: False)
                    )
                    cpu0 = time.process_time()
                    for blob in data[start:start + args.block]:
                        t0 = time.perf_counter()
                        ingestor.ingest(blob, calling_ae_title="CT", called_ae_title="MEDNODE")
                        walls[order].append(time.perf_counter() - t0)
                    cpus[order].append((time.process_time() - cpu0) / len(data[start:start + args.block]))
                PendingInstance.syncing_in_background = background  # type: ignore[method-assign]
                engine.dispose()
            loads.append(_load())
    print(f"{machine()}; load average {', '.join(loads)} (before, after each round); "
          f"{args.rounds} rounds × {args.instances} instances, blocks of {args.block} alternating")
    print("| order | ingest wall, median ms | mean ms | p90 ms | CPU per instance ms | instances |")
    print("|---|---|---|---|---|---|")
    for order in ORDERS:
        w = sorted(walls[order])
        print(f"| {order} | {statistics.median(w) * 1e3:.2f} | {statistics.fmean(w) * 1e3:.2f} | "
              f"{w[int(len(w) * 0.9)] * 1e3:.2f} | {statistics.fmean(cpus[order]) * 1e3:.2f} | {len(w)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
