"""Queues per model on the real RabbitMQ: each job lands on the queue of the models it needs, the
queues and consumers mednode declares are accepted by the server, and a worker that does not hold
the VLM never receives a VLM job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kombu import Consumer
from sqlalchemy import select

from node import jobs
from node.celery_app import app, configure_celery, declared_queues, worker_queues
from node.config import load_settings
from storage.db import make_engine, make_session_factory, upgrade
from storage.models import Job, JobState, Result, Study
from tests.peers import ToolMissingError, in_ci
from tests.peers.rabbitmq import PrivateRabbitMQ

VLM = {"path": "/models/vlm", "family": "qwen2_vl"}
CT_RULE = {"name": "ct", "match": {"modality": ["CT"]}, "tasks": ["ct_analysis"], "destinations": []}
#: the private server's consumer_timeout: a job held 3× longer is cut (RabbitMQ 3.10 ignores the
#: per-consumer x-consumer-timeout mednode asks)
CONSUMER_TIMEOUT_MS = 5000
CXR_RULE = {"name": "cxr", "match": {"modality": ["DX"]}, "tasks": [{"report": {"language": "en"}}],
            "destinations": []}


def _forget_earlier_configuration() -> None:
    """mednode configures its Celery app once per process; this test process may have configured
    it before (another broker, other queues), which Celery caches: drop those caches."""
    for cached in ("queues", "router", "default_queue"):
        app.amqp.__dict__.pop(cached, None)
    app.amqp._producer_pool = None
    app._pool = None


@pytest.fixture(autouse=True)
def reconfigurable_celery() -> Iterator[None]:
    _forget_earlier_configuration()
    yield
    _forget_earlier_configuration()  # the next test configures the app for its own broker


def test_jobs_land_on_their_models_queues_and_a_worker_takes_only_what_it_holds(
    tmp_path: Path, rabbitmq_url: str
) -> None:
    gpu = load_settings(data_dir=tmp_path / "var", broker_url=rabbitmq_url, models={"vlm": VLM},
                        rules=[CT_RULE, CXR_RULE])
    cpu = load_settings(data_dir=tmp_path / "var", broker_url=rabbitmq_url, rules=[CT_RULE])
    engine = make_engine(gpu.database)
    upgrade(engine)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3", version=1)
        session.add(study)
        session.flush()
        made = {}
        for name, tasks, priority in (("ct", CT_RULE["tasks"], 5), ("cxr", CXR_RULE["tasks"], 5),
                                      ("ask", [{"vqa": {"questions": ["?"]}}], 9)):
            job = Job(study_pk=study.id, study_version=1, rule_name=name, tasks=tasks, series_uids=[],
                      destinations=[], priority=priority, state=JobState.QUEUED)
            session.add(job)
            session.flush()
            made[name] = job.id
    try:
        configure_celery(gpu)
        with app.connection_for_write() as connection:  # as a worker does at start: the server takes them
            for queue in app.amqp.queues.values():
                queue(connection.default_channel).declare()
        for name, job_id in made.items():
            jobs.enqueue_job(sessions, job_id, 9 if name == "ask" else 5)
        with sessions() as session:
            assert all(session.scalars(select(Job.enqueued_at)))  # every send succeeded

        with app.connection_for_read() as connection:
            channel = connection.default_channel
            depth = {q: channel.queue_declare(queue=q, passive=True).message_count for q in declared_queues(gpu)}
            assert depth == {"delivery": 0, "inference": 1, "inference.urgent": 0, "inference.vlm": 1,
                             "inference.vlm.urgent": 1}

            # the CPU worker's queues, declared as mednode declares them (priorities, consumer timeout)
            consumed = worker_queues(["inference.urgent", "inference"], cpu)
            assert consumed == ["inference.urgent", "inference"]
            queues = [q for q in app.amqp.queues.values() if q.name in consumed]
            assert {q.name for q in queues} == set(consumed)
            assert all(q.consumer_arguments == {"x-consumer-timeout": 6 * 3600 * 1000} for q in queues)
            received: list[int] = []

            def on_message(body: object, message: object) -> None:
                received.append(message.headers["argsrepr"])  # type: ignore[attr-defined]
                message.ack()  # type: ignore[attr-defined]

            with Consumer(channel, queues=queues, callbacks=[on_message], accept=["json"]):
                for _ in range(20):
                    try:
                        connection.drain_events(timeout=0.25)
                    except TimeoutError:
                        if received:
                            break
            assert received == [f"[{made['ct']}]"]
            left = {q: channel.queue_declare(queue=q, passive=True).message_count for q in declared_queues(gpu)}
            assert left["inference.vlm"] == left["inference.vlm.urgent"] == 1
    finally:
        engine.dispose()


def test_the_worker_knows_whether_the_rabbitmq_server_honours_its_consumer_timeout(
    tmp_path: Path, rabbitmq_url: str
) -> None:
    import subprocess

    from node.celery_app import broker_server_version, consumer_timeout_warning

    configure_celery(load_settings(data_dir=tmp_path / "var", broker_url=rabbitmq_url))
    version = broker_server_version(app)
    installed = subprocess.run(["rabbitmqctl", "version"], capture_output=True, text=True, check=True).stdout.strip()
    assert version == installed
    warning = consumer_timeout_warning(version)
    if tuple(int(p) for p in version.split(".")[:2]) < (3, 12):
        assert warning is not None and "consumer_timeout = 21600000" in warning
    else:
        assert warning is None
    assert consumer_timeout_warning("3.12.0") is None and consumer_timeout_warning("4.1.2") is None
    assert consumer_timeout_warning("3.11.15") is None and consumer_timeout_warning("3.11.14") is not None


@pytest.fixture
def short_consumer_timeout_rabbitmq(tmp_path: Path) -> Iterator[PrivateRabbitMQ]:
    """A private RabbitMQ whose server-wide consumer_timeout is 5 s, checked every second (the
    channel tick, 60 s by default), as a 3.10 server applies it to every consumer."""
    try:
        rabbit = PrivateRabbitMQ(tmp_path / "rabbitmq", conf={"consumer_timeout": str(CONSUMER_TIMEOUT_MS)},
                                 advanced={"channel_tick_interval": "1000"})
    except ToolMissingError as exc:
        if in_ci():
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    with rabbit:
        yield rabbit


def test_a_job_longer_than_the_servers_consumer_timeout_runs_once_and_succeeds(
    tmp_path: Path, postgres_url: str, short_consumer_timeout_rabbitmq: PrivateRabbitMQ, mednode_factory
) -> None:
    """The job is held in its last stage (its results' table locked by this test) for twice the
    consumer timeout: RabbitMQ closes the worker's channel and delivers the message again."""
    from sqlalchemy import text

    from tests.peers import storescu
    from tests.phantom import PhantomGeometry, make_ct_phantom, write_series

    rabbit = short_consumer_timeout_rabbitmq
    config = tmp_path / "mednode.yaml"
    config.write_text(yaml.safe_dump({"rules": [CT_RULE]}))
    node = mednode_factory(database_url=postgres_url, broker_url=rabbit.url, separate_worker=True,
                           config=config, extra_env={"MEDNODE_WORKER_CONCURRENCY": "2"})
    files = write_series(make_ct_phantom(geometry=PhantomGeometry(), patient_id="LONGJOB"), tmp_path / "study")
    engine = make_engine(postgres_url)
    sessions = make_session_factory(engine)
    try:
        assert storescu("127.0.0.1", node.dicom_port, files).all_ok
        deadline = time.monotonic() + 120
        with engine.connect() as lock:
            while time.monotonic() < deadline:  # the claim reads results: lock once it has run
                with sessions() as session:
                    state = session.scalar(select(Job.state))
                if state is JobState.RUNNING:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError(f"no job ran:\n{node.logs()[-4000:]}")
            lock.execute(text("LOCK TABLE result IN ACCESS EXCLUSIVE MODE"))  # the job cannot finish
            with sessions() as session:
                assert session.scalar(select(Job.state)) is JobState.RUNNING, "the job ended before the lock"
            time.sleep(2 * CONSUMER_TIMEOUT_MS / 1000)  # the server checks it every second here
            with sessions() as session:
                assert session.scalar(select(Job.state)) is JobState.RUNNING  # its lease still renewed
            lock.rollback()
        while time.monotonic() < deadline:  # the job ends; the message delivered again is handled
            with sessions() as session:
                done = session.scalar(select(Job.state)) in (JobState.SUCCEEDED, JobState.FAILED)
            if done and "job 1 is not runnable now" in node.logs():
                break
            time.sleep(0.2)
        logs = node.logs()
        with sessions() as session:
            (job,) = session.scalars(select(Job)).all()
            results = session.scalars(select(Result)).all()
        print(f"\nlong job: state {job.state.value}, attempts {job.attempts}, results {len(results)}; "
              f"channel closed by the server: {'acknowledgement timed out' in logs or 'PRECONDITION_FAILED' in logs}")
        assert "PRECONDITION_FAILED" in logs or "acknowledgement timed out" in rabbit.log_tail(20000), \
            "RabbitMQ never cut the consumer: the test did not test the timeout"
        assert job.state is JobState.SUCCEEDED, (job.state, job.reason, logs[-4000:])
        worker = node.processes[-1]
        assert worker.is_running and "Unrecoverable error" not in logs, f"the worker stopped:\n{logs[-4000:]}"
        # the message delivered again was taken by the same worker and found the job held
        assert "job 1 is not runnable now" in logs, logs[-4000:]
        assert job.attempts == 1
        assert len({r.sop_instance_uid for r in results}) == len(results) > 0
    finally:
        engine.dispose()
