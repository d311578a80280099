"""Bad input against a real ``mednode serve`` process: no crash, no hang, no leak.

Every shared malformed sample and every case of the fuzz corpus (:mod:`tests.fuzz.corpus`) goes to
the node byte for byte, each in its own association, three rounds. Each gets a failure status
with a comment, or Success with the bytes stored exactly as sent. The process stays up and
answers C-ECHO throughout; its open file descriptors and threads come back to the same count
after each round and its memory does not grow; nothing partial or unindexed is left in the store.
Idle half-open connections (a peer that connects and sends nothing, or half an A-ASSOCIATE-RQ)
do not stop it from serving others.
"""

from __future__ import annotations

import socket
import time
import warnings
from pathlib import Path

import httpx
import pytest

from node.listener import MAX_ASSOCIATIONS
from storage.store import PARTIAL_SUFFIX, InstanceStore
from tests.fuzz.corpus import corpus, echo, malformed_files, send_raw, sendable
from tests.peers import LOOPBACK
from tests.reliability.conftest import NodeRunFactory

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::UserWarning")]

ROUNDS = 3


def resources(pid: int) -> dict[str, int]:
    """Open file descriptors, threads and resident memory (kB) of a process, from /proc."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return {
        "fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
        "threads": int(status["Threads"].strip()),
        "rss_kb": int(status["VmRSS"].split()[0]),
    }


def settle(pid: int, baseline: dict[str, int], timeout_s: float = 20) -> dict[str, int]:
    """Resources once association threads have ended (they close shortly after the release)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = resources(pid)
        if (now["fds"] <= baseline["fds"] + 2 and now["threads"] <= baseline["threads"] + 1) \
                or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_malformed_and_fuzzed_input_never_crash_hang_or_leak(node_run: NodeRunFactory, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = corpus()
    node = node_run()
    node.start_serve()
    pid = node.serve.pid
    assert pid is not None and echo(node.dicom_port) == 0
    inputs: list[tuple[str, Path, bytes | None]] = []
    for path in malformed_files():
        inputs.append((f"malformed/{path.name}", sendable(path, tmp_path), None))
    for case in cases:
        inputs.append((case.name, case.write(tmp_path), case.dataset))

    seen: list[dict[str, int]] = []
    after_round: list[dict[str, int]] = []
    accepted_before: list[bytes] = []
    duplicates = 0
    for round_number in range(ROUNDS):
        statuses: dict[str, int] = {}
        for name, path, dataset in inputs:
            started = time.monotonic()
            status, comment = send_raw(node.dicom_port, path)
            assert time.monotonic() - started < 30, f"{name}: answered after {time.monotonic() - started:.0f} s"
            assert node.serve.is_running, f"mednode serve died on {name}:\n{node.serve.log_tail()}"
            statuses[name] = status
            if status == 0x0000:
                assert dataset is not None, f"{name}: a shared malformed sample was accepted"
                held = [InstanceStore(node.store_root).read(p) for p in node.instance_rows().values()]
                # the accepted bytes are what is stored, behind the node's own File Meta — unless
                # the instance (its SOP Instance UID: the mutations keep their seed's) was held
                # already by a complete study: then the file held stays (a duplicate, not new work)
                if not any(stored.endswith(dataset) for stored in held):
                    assert any(stored.endswith(before) for stored in held for before in accepted_before), name
                    duplicates += 1
                accepted_before.append(dataset)
            else:
                assert 0xA900 <= status <= 0xCFFF, f"{name}: 0x{status:04X}"
                assert comment, f"{name}: a failure status must say why"
            if name.startswith("malformed/"):
                assert echo(node.dicom_port) == 0, f"no C-ECHO answer after {name}"
        seen.append(statuses)
        assert echo(node.dicom_port) == 0
        after_round.append(settle(pid, after_round[0] if after_round else resources(pid)))

    # the same answers every round (idempotent), and no growth after the first round
    assert seen[0] == seen[-1]
    first, last = after_round[0], after_round[-1]
    assert last["fds"] <= first["fds"] + 2, after_round
    assert last["threads"] <= first["threads"] + 1, after_round
    assert last["rss_kb"] - first["rss_kb"] < 40_000, after_round

    # nothing partial, nothing unindexed
    on_disk = {str(p.relative_to(node.store_root)) for p in node.instance_files()}
    assert not [p for p in on_disk if p.endswith(PARTIAL_SUFFIX) or Path(p).name.startswith(".")]
    assert on_disk == set(node.instance_rows().values())
    # every duplicate the test saw was counted as one by the node (and nothing else was)
    metrics = httpx.get(f"http://{LOOPBACK}:{node.web_port}/metrics", timeout=10).text
    counted = [line for line in metrics.splitlines()
               if line.startswith('mednode_instances_received_total{outcome="duplicate"}')]
    assert (float(counted[0].rsplit(" ", 1)[1]) if counted else 0.0) == duplicates, (counted, duplicates)
    accepted = sorted(n for n, s in seen[-1].items() if s == 0)
    print(
        f"\nRELIABILITY bad-input: inputs={len(inputs)} rounds={ROUNDS} refused={len(inputs) - len(accepted)} "
        f"accepted={len(accepted)} duplicates_of_held_instances={duplicates} "
        f"resources_after_rounds={after_round}"
    )
    print(f"  accepted: {accepted}")


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    idle = []
    for index in range(count):
        sock = socket.create_connection((LOOPBACK, port), timeout=5)
        if index % 2:  # half an A-ASSOCIATE-RQ: PDU type 1, a length of 68 kB, then nothing
            sock.sendall(b"\x01\x00\x00\x01\x10\x00\x00\x01")
        idle.append(sock)
    return idle


def test_idle_and_half_open_connections_do_not_stop_the_listener(node_run: NodeRunFactory) -> None:
    """Below the listener's limit of concurrent associations (``MAX_ASSOCIATIONS``) idle peers
    change nothing for others; beyond it a new peer is rejected at once with a transient reason
    (never left hanging), and the slots come back as soon as the idle peers go (or after the
    ARTIM timer, ``ACSE_TIMEOUT_S``, if they stay)."""
    node = node_run()
    node.start_serve()
    pid = node.serve.pid
    assert pid is not None
    baseline = resources(pid)
    idle = _idle_connections(node.dicom_port, MAX_ASSOCIATIONS - 2)
    try:
        for _ in range(3):
            # the previous echo's association may still hold its slot for a moment after its
            # release (its thread ends after the peer's): under the limit a refusal is transient
            deadline = time.monotonic() + 5
            while (status := echo(node.dicom_port)) == -1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert status == 0, "idle peers under the limit blocked the listener"
        idle += _idle_connections(node.dicom_port, 12)
        time.sleep(0.5)
        started = time.monotonic()
        assert echo(node.dicom_port) == -1, "more idle peers than the association limit, yet accepted?"
        assert time.monotonic() - started < 5, "a peer beyond the limit was left waiting"
    finally:
        for sock in idle:
            sock.close()
    closed_at = time.monotonic()
    while echo(node.dicom_port) != 0:
        assert time.monotonic() - closed_at < 45, "the association slots did not come back"
        time.sleep(0.2)
    print(f"\nRELIABILITY idle-peers: slots back {time.monotonic() - closed_at:.1f} s after "
          f"{len(idle)} idle peers closed")
    after = settle(pid, baseline)
    assert after["fds"] <= baseline["fds"] + 2 and after["threads"] <= baseline["threads"] + 1, (baseline, after)
    assert node.serve.is_running
