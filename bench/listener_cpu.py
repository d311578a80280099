#!/usr/bin/env python3
"""CPU seconds a listener process spends per instance, old and new code alternating.

Each run starts a fresh Python process (``PYTHONPATH`` = the checkout under test) that imports
what ``mednode serve`` imports (the web app and Celery's, so the heap the garbage collector walks
is the real one), starts :func:`node.listener.start_listener` on a fresh PostgreSQL database
(127.0.0.1:5432) or a SQLite file, and receives ``--associations`` ``storescu +sd`` sends of
``--per-association`` CT instances (512×512 int16) at once, after a 5-instance study over one
association that is not measured (what happens once per process: the first compilation of each
statement, the first series). It reports the CPU time of its own
process (``getrusage``, user + system) and of the database's backends (``/proc``, PostgreSQL on
this host) over the sends, per instance, and the wall time. Runs of the checkouts alternate.

This is the measure of docs/BENCHMARKS.md "Per-instance cost (issue 14)"; CPU time is much less
noisy than rates on a shared machine. It changes nothing in docs/.

Usage::

    /work/main/.venv/bin/python bench/listener_cpu.py --code old=/tmp/old-checkout --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: instances of the study sent before the measured ones (not measured)
WARM_UP_INSTANCES = 5


def _cpu_of(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child(args: argparse.Namespace) -> None:
    """One run, in the process under test: prints one JSON line."""
    import sqlalchemy

    import node.celery_app  # what serve's process holds besides the listener
    import node.web.app  # noqa: F401
    from bench.ingest import send_study
    from node.ingest import Ingestor
    from node.listener import start_listener
    from storage.db import make_engine, make_session_factory, upgrade
    from storage.store import InstanceStore
    from tests.peers import free_port
    from tests.peers.services import postgres_database

    dirs = [Path(d) for d in args.studies.split(",")]
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mednode-cpu-")))
        url = f"sqlite:///{work / 'index.db'}" if args.sqlite else stack.enter_context(postgres_database())
        engine = make_engine(url)
        upgrade(engine)
        ingestor = Ingestor(InstanceStore(work / "store"), make_session_factory(engine))
        port = free_port()
        server = start_listener(ingestor, ae_title="BENCH", host="127.0.0.1", port=port)
        try:
            # once per process, not measured: the first statements' compilation, the first series
            send_study(port, Path(args.warm_up), "BENCH", 600)
            backends: list[int] = []
            if not args.sqlite:
                name = url.rsplit("/", 1)[1]
                admin = sqlalchemy.create_engine("postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
            load_before = os.getloadavg()[0]
            print("sending", file=sys.stderr, flush=True)  # a profiler may attach now
            gc_before = [g["collections"] for g in gc.get_stats()]
            gc_seconds = [0.0]
            gc_started = [0.0]

            def gc_timer(phase: str, info: dict[str, int]) -> None:
                if phase == "start":
                    gc_started[0] = time.process_time()
                else:
                    gc_seconds[0] += time.process_time() - gc_started[0]

            gc.callbacks.append(gc_timer)
            before = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.perf_counter()
            with ThreadPoolExecutor(len(dirs)) as pool:
                list(pool.map(lambda d: send_study(port, d, "BENCH", 600), dirs))
            wall = time.perf_counter() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
            gc.callbacks.remove(gc_timer)
            collections = [g["collections"] - b for g, b in zip(gc.get_stats(), gc_before, strict=True)]
            db_cpu = 0.0
            if not args.sqlite:
                with admin.connect() as connection:
                    backends = [pid for (pid,) in connection.execute(sqlalchemy.text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = :name"), {"name": name})]
                admin.dispose()
                db_cpu = sum(_cpu_of(pid) for pid in backends)
            with engine.connect() as connection:
                stored = connection.execute(sqlalchemy.text("SELECT count(*) FROM instance")).scalar()
        finally:
            server.shutdown()
            engine.dispose()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"cpu_s": cpu, "db_cpu_s": db_cpu, "wall_s": wall, "stored": stored,
                      "load": load_before, "user_s": after.ru_utime - before.ru_utime,
                      "gc_collections": collections, "gc_s": gc_seconds[0]}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--per-association", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sqlite", action="store_true", help="index on SQLite instead of PostgreSQL")
    parser.add_argument("--code", action="append", default=[], metavar="NAME=PATH",
                        help="another checkout to measure beside this one")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--studies", help=argparse.SUPPRESS)
    parser.add_argument("--warm-up", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    from bench.ingest import generate_study

    codes = [(name, Path(path).resolve()) for name, path in (item.split("=", 1) for item in args.code)]
    codes.append(("this", REPO_ROOT))
    count = args.associations * args.per_association
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in codes}
    with tempfile.TemporaryDirectory(prefix="mednode-cpu-studies-") as tmp:
        dirs = [Path(tmp) / f"s{i}" for i in range(args.associations)]
        for i, d in enumerate(dirs):
            generate_study(d, args.per_association, seed=7000 + i)
        warm_up = Path(tmp) / "warm-up"
        generate_study(warm_up, WARM_UP_INSTANCES, seed=6999)
        for round_ in range(args.rounds):
            for name, code in codes:
                env = dict(os.environ, PYTHONPATH=str(code), TCP_NODELAY="1")
                done = subprocess.run(
                    [sys.executable, "-P", str(REPO_ROOT / "bench" / "listener_cpu.py"), "--child",
                     "--studies", ",".join(map(str, dirs)), "--warm-up", str(warm_up), *(["--sqlite"] if args.sqlite else [])],
                    env=env, capture_output=True, text=True, timeout=900, check=False, cwd=code)
                if done.returncode != 0:
                    print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                run = json.loads(done.stdout.strip().splitlines()[-1])
                if run["stored"] != count + WARM_UP_INSTANCES:
                    print(f"{name}: indexed {run['stored']} of {count}", file=sys.stderr)
                    return 1
                results[name].append(run)
                print(f"round {round_ + 1} {name}: listener {1000 * run['cpu_s'] / count:.2f} ms/inst "
                      f"(user {1000 * run['user_s'] / count:.2f}), db {1000 * run['db_cpu_s'] / count:.2f} ms/inst, "
                      f"{count / run['wall_s']:.0f} inst/s, load {run['load']:.1f}", flush=True)
    for name, runs in results.items():
        cpu = [1000 * r["cpu_s"] / count for r in runs]
        db = [1000 * r["db_cpu_s"] / count for r in runs]
        print(f"{name}: listener CPU ms/inst {', '.join(f'{c:.2f}' for c in cpu)} (median "
              f"{statistics.median(cpu):.2f}); db {', '.join(f'{c:.2f}' for c in db)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
