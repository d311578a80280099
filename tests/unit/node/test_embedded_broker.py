"""The embedded broker wakes an idle consumer when a message is committed, instead of letting it
sleep out its polling interval."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from kombu import Connection, Queue

from node import embedded_broker


@pytest.fixture
def broker_url(tmp_path: Path) -> str:
    embedded_broker.install()
    return f"sqla+sqlite:///{tmp_path / 'broker.db'}"


def test_wake_dir_only_for_an_sqlite_file(tmp_path: Path) -> None:
    assert embedded_broker.wake_dir(f"sqlite:///{tmp_path}/b.db") == Path(f"{tmp_path}/b.db.wake")
    assert embedded_broker.wake_dir("sqlite://") is None
    assert embedded_broker.wake_dir("postgresql+psycopg://u@h/db") is None


def test_an_idle_consumer_gets_a_message_long_before_its_poll(broker_url: str, monkeypatch) -> None:
    # a poll every 30 s: only the wake-up can deliver within the bound below
    monkeypatch.setattr(embedded_broker.Transport, "polling_interval", 30.0)
    queue = Queue("inference")
    received: list[float] = []
    with Connection(broker_url) as consumer_conn, Connection(broker_url) as producer_conn:
        assert isinstance(consumer_conn.transport, embedded_broker.Transport)
        producer = producer_conn.Producer()
        producer.publish({"warm": True}, routing_key="inference", declare=[queue])
        with consumer_conn.Consumer(queue, callbacks=[lambda body, msg: (received.append(time.monotonic()), msg.ack())]):
            consumer_conn.drain_events(timeout=5)  # the warm-up message, and the socket exists now
            received.clear()

            def drain() -> None:
                try:
                    consumer_conn.drain_events(timeout=10)
                except TimeoutError:
                    pass

            thread = threading.Thread(target=drain)
            thread.start()
            time.sleep(0.5)  # the consumer has polled, found nothing and waits
            sent = time.monotonic()
            producer.publish({"job": 1}, routing_key="inference")
            thread.join(timeout=15)
    assert received, "the message never arrived"
    assert received[0] - sent < 1.0, f"picked up {received[0] - sent:.3f} s after it was sent"


def test_a_dead_consumers_socket_is_removed(tmp_path: Path) -> None:
    directory = tmp_path / "broker.db.wake"
    live = embedded_broker.WakeSocket(directory)
    dead = embedded_broker.WakeSocket(directory)
    dead._socket.close()  # its process died: the file stays, nobody listens
    assert embedded_broker.wake_all(directory) == 1
    assert sorted(p.name for p in directory.iterdir()) == [Path(live.path).name]
    assert live.wait(0.1)
    assert not live.wait(0.05)
    live.close()
