"""Fuzzing the C-STORE path: a fixed corpus and hypothesis-generated mutations of valid instances.

The property, everywhere: bad bytes get a failure (``InvalidInstanceError`` / ``RequestMismatchError``
in-process, a 0xA900/0xCxxx status with a comment on the network) and leave nothing in the store,
or they are stored exactly as sent and indexed. Nothing else may happen: no other exception, no
hang (each example is timed), no partial file. Bounded for CI: fixed example counts, derandomized
(the same examples on every run), no example database.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.errors import InvalidInstanceError
from dicom_io.header import parse_header
from node.ingest import Ingestor, RequestMismatchError
from node.listener import start_listener
from storage.db import make_engine, make_session_factory, upgrade
from storage.models import Instance
from storage.store import PARTIAL_SUFFIX, InstanceStore
from tests.fuzz.corpus import Case, Seed, corpus, echo, seeds, send_raw
from tests.peers import LOOPBACK, free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's invalid-value warnings

CASES = corpus()
SEEDS = seeds()
#: One instance must be answered well within this (the slowest real case takes ~10 ms).
MAX_CASE_S = 5.0
FUZZ_SETTINGS = settings(
    derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


@dataclass
class Node:
    store: InstanceStore
    sessions: sessionmaker[Session]
    ingestor: Ingestor

    def stored(self, sop_instance_uid: str) -> bytes | None:
        with self.sessions() as session:
            path = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid))
        return None if path is None else self.store.read(path)

    def partials(self) -> list[Path]:
        return [p for p in self.store.root.rglob("*") if p.name.endswith(PARTIAL_SUFFIX)]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("fuzz-node")
    engine = make_engine(f"sqlite:///{root / 'mednode.db'}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = InstanceStore(root / "store")
    yield Node(store, sessions, Ingestor(store, sessions))
    engine.dispose()


def ingest_property(node: Node, case: Case) -> str:
    """Ingest one case and check the property; return ``"refused"`` or ``"stored"``."""
    data = case.part10()
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about invalid values; the outcome decides
            result = node.ingestor.ingest(
                data, calling_ae_title="FUZZ", called_ae_title="MEDNODE",
                expected_sop_class_uid=case.sop_class_uid, expected_sop_instance_uid=case.sop_instance_uid,
            )
    except (InvalidInstanceError, RequestMismatchError) as exc:
        assert str(exc), "a refusal must say why"
        outcome = "refused"
    else:
        assert node.stored(result.header.sop_instance_uid) == data, "stored bytes differ from those sent"
        outcome = "stored"
    assert time.monotonic() - started < MAX_CASE_S, f"{case.name} took too long"
    assert node.partials() == []
    return outcome


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_corpus_case_is_refused_or_stored_as_sent(node: Node, case: Case) -> None:
    outcome = ingest_property(node, case)
    if case.must_fail:
        assert outcome == "refused", f"{case.name} was accepted"


# -- hypothesis: mutations of valid instances ---------------------------------------------------------
@st.composite
def mutated_cases(draw: st.DrawFn) -> Case:
    seed: Seed = draw(st.sampled_from(SEEDS))
    data = bytearray(seed.data)
    pixel_at = data.index(b"\xe0\x7f\x10\x00")
    header_end = pixel_at + 16  # most of the structure is before the pixels
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "length"]))
    if kind == "flip":
        for _ in range(draw(st.integers(1, 12))):
            data[draw(st.integers(0, header_end))] = draw(st.integers(0, 255))
    elif kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "insert":
        at = draw(st.integers(0, header_end))
        data[at:at] = draw(st.binary(min_size=1, max_size=48))
    elif kind == "overwrite":
        at = draw(st.integers(0, header_end))
        chunk = draw(st.binary(min_size=1, max_size=32))
        data[at: at + len(chunk)] = chunk
    else:  # a 4-byte length field somewhere made absurd
        at = draw(st.integers(0, max(0, len(data) - 4)))
        data[at: at + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\xf0\xff\xff\xff", b"\x00\x00\x00\x80",
                                                 b"\xff\xff\x00\x00"]))
    ts = draw(st.sampled_from([seed.transfer_syntax_uid, seed.transfer_syntax_uid,
                               "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"]))
    return seed.case(f"hypothesis-{kind}", bytes(data), ts)


@settings(FUZZ_SETTINGS, max_examples=300)
@given(case=mutated_cases())
def test_parse_header_raises_only_invalid_instance(case: Case) -> None:
    started = time.monotonic()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            header, _ = parse_header(case.part10())
    except InvalidInstanceError as exc:
        assert str(exc)
    else:
        assert header.sop_instance_uid and header.study_instance_uid
    assert time.monotonic() - started < MAX_CASE_S


@settings(FUZZ_SETTINGS, max_examples=150)
@given(case=mutated_cases())
def test_ingest_refuses_or_stores_as_sent(node: Node, case: Case) -> None:
    ingest_property(node, case)


# -- hypothesis over the network: a running SCP ---------------------------------------------------------
@dataclass
class Listener:
    node: Node
    port: int
    server: ThreadedAssociationServer


@pytest.fixture(scope="module")
def listener(node: Node) -> Iterator[Listener]:
    port = free_port()
    server = start_listener(node.ingestor, ae_title="MEDNODE", host=LOOPBACK, port=port)
    yield Listener(node, port, server)
    server.shutdown()


def network_property(listener: Listener, case: Case, directory: Path) -> int:
    path = case.write(directory)
    started = time.monotonic()
    status, comment = send_raw(listener.port, path)
    assert time.monotonic() - started < MAX_CASE_S + 5
    if status == 0x0000:
        stored = listener.node.stored(case.sop_instance_uid)
        assert stored is not None, "Success, but nothing indexed"
        assert stored.endswith(case.dataset), "not stored as sent"  # behind the SCP's own File Meta
    else:
        assert status in (0xA900, 0xC000) or 0xC000 <= status <= 0xCFFF, f"{case.name}: 0x{status:04X}"
        assert comment, f"{case.name}: a failure status says why"
    assert listener.node.partials() == []
    return status


@settings(FUZZ_SETTINGS, max_examples=60)
@given(case=mutated_cases())
def test_network_c_store_of_mutations(listener: Listener, tmp_path_factory: pytest.TempPathFactory, case: Case) -> None:
    network_property(listener, case, tmp_path_factory.mktemp("hyp", numbered=True))


def test_network_c_store_of_the_corpus_keeps_the_node_answering(listener: Listener, tmp_path: Path) -> None:
    statuses = {case.name: network_property(listener, case, tmp_path) for case in CASES}
    refused = [n for n, s in statuses.items() if s != 0]
    for case in CASES:
        if case.must_fail:
            assert statuses[case.name] != 0, f"{case.name} got Success over the network"
    assert echo(listener.port) == 0x0000, "the node stopped answering C-ECHO"
    print(f"\nFUZZ network corpus: cases={len(CASES)} refused={len(refused)} stored={len(CASES) - len(refused)}")
