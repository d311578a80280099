#!/usr/bin/env python3
"""Where one C-STORE's time goes inside mednode's listener: the breakdown behind docs/BENCHMARKS.md.

The study of ``bench/ingest.py`` (500 CT instances of 512×512 int16) is sent with ``storescu +sd``
over one association to a listener in this process (:func:`node.listener.start_listener` with a
SQLite index and a store in a temp dir), twice: once with mednode's C-STORE handler, once with a
handler that only answers Success (pynetdicom's own floor). Per instance it reports:

* the segments of the exchange, from pynetdicom's ``EVT_PDU_RECV`` / ``EVT_PDU_SENT`` and the
  handler's start and end: storescu's turn-around, the request's PDUs, the wait for the
  association thread, the handler, the response;
* the handler's steps, timed by wrapping the functions the ingest calls.

Run it on an otherwise idle machine, a few times: absolute values move with the machine, the
proportions much less. It changes nothing in docs/.

Usage::

    .venv/bin/python bench/ingest_steps.py [--count 500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pynetdicom import evt

from bench.ingest import generate_study, send_study
from dicom_io.header import Part10Prefixes, ReadInstance
from node import ingest as ingest_module
from node import listener as listener_module
from storage import store as store_module
from storage.db import make_engine, make_session_factory, upgrade
from storage.store import InstanceStore, PendingInstance
from tests.peers import free_port

#: (label, owner, attribute) of the handler steps that are timed.
STEPS: list[tuple[str, Any, str]] = [
    ("File Meta encoded (pydicom, reused per kind)", Part10Prefixes, "prefix"),
    ("data set read", ingest_module, "read_received"),
    ("UIDs checked", ReadInstance, "uids"),
    ("rest of the header checked (the disk syncing meanwhile)", ReadInstance, "header"),
    ("SHA-256", store_module, "sha256_hex"),
    ("file written, writeback started (incl. SHA-256)", InstanceStore, "begin_instance"),
    ("index statements", ingest_module, "index_instance"),
    ("rest of the sync", PendingInstance, "finish"),
]


@contextmanager
def timed(durations: dict[str, list[float]]) -> Iterator[None]:
    """Wrap each of :data:`STEPS` to record its durations; restore them afterwards."""
    originals = [(owner, name, getattr(owner, name)) for _, owner, name in STEPS]

    def wrap(label: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                durations[label].append(time.perf_counter() - start)

        return run

    for (label, owner, name), (_, _, function) in zip(STEPS, originals, strict=True):
        setattr(owner, name, wrap(label, function))
    try:
        yield
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def exchange(study: Path, work: Path, empty_handler: bool) -> tuple[float, dict[str, list[float]]]:
    """Send the study once; return the wall time and each segment's durations per instance."""
    engine = make_engine(f"sqlite:///{work / 'index.db'}")
    upgrade(engine)
    ingestor = ingest_module.Ingestor(InstanceStore(work / "store"), make_session_factory(engine))
    events: list[tuple[float, str]] = []
    clock = time.perf_counter
    handle_store = listener_module.handle_store

    def handler(event: Any, *args: Any) -> Any:
        events.append((clock(), "handler start"))
        try:
            return 0x0000 if empty_handler else handle_store(event, *args)
        finally:
            events.append((clock(), "handler end"))

    listener_module.handle_store = handler  # start_listener binds the module's handler
    port = free_port()
    try:
        server = listener_module.start_listener(ingestor, ae_title="BENCH", host="127.0.0.1", port=port)
    finally:
        listener_module.handle_store = handle_store
    server.bind(evt.EVT_PDU_RECV, lambda e: events.append((clock(), "recv")))
    server.bind(evt.EVT_PDU_SENT, lambda e: events.append((clock(), "sent")))
    try:
        seconds = send_study(port, study, "BENCH", 600)
    finally:
        server.shutdown()
        engine.dispose()
    return seconds, segments(events)


def segments(events: list[tuple[float, str]]) -> dict[str, list[float]]:
    """Cut the event stream at each response sent and measure the parts of each C-STORE."""
    out: dict[str, list[float]] = defaultdict(list)
    previous_sent: float | None = None
    cycle: list[tuple[float, str]] = []
    for when, what in events:
        cycle.append((when, what))
        if what != "sent":
            continue
        received = [t for t, w in cycle if w == "recv"]
        start = [t for t, w in cycle if w == "handler start"]
        end = [t for t, w in cycle if w == "handler end"]
        if received and start and end:
            if previous_sent is not None:
                out["response sent → first PDU of the next request"].append(received[0] - previous_sent)
            out["first → last PDU of the request"].append(received[-1] - received[0])
            out["last PDU → handler called"].append(start[0] - received[-1])
            out["handler"].append(end[0] - start[0])
            out["handler → response sent"].append(when - end[0])
        previous_sent = when
        cycle = []
    return out


def report(title: str, seconds: float, count: int, parts: dict[str, list[float]]) -> None:
    print(f"\n{title}: {count / seconds:.0f} inst/s ({1000 * seconds / count:.2f} ms per instance)")
    print("| step | median ms | mean ms |\n|---|---|---|")
    for label, values in parts.items():
        if values:
            print(f"| {label} | {1000 * statistics.median(values):.2f} | {1000 * statistics.mean(values):.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="instances in the study")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mednode-steps-") as tmp:
        work = Path(tmp)
        generate_study(work / "study", args.count)
        seconds, parts = exchange(work / "study", work / "empty", empty_handler=True)
        report("pynetdicom with a handler that only answers Success", seconds, args.count, parts)
        steps: dict[str, list[float]] = defaultdict(list)
        with timed(steps):
            seconds, parts = exchange(work / "study", work / "mednode", empty_handler=False)
        report("mednode's listener (durable store + SQLite index)", seconds, args.count, parts)
        print()
        print("| handler step | median ms | mean ms |\n|---|---|---|")
        for label, _, _ in STEPS:
            values = steps[label]
            if values:
                print(f"| {label} | {1000 * statistics.median(values):.2f} | "
                      f"{1000 * statistics.mean(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
