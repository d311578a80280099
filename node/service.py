"""``mednode serve``: listener, scheduler, web and (embedded default) workers, as one service.

The workers run as child processes (``mednode worker``), never inside the listener's process: a
model crash or a GPU out-of-memory must not take the DICOM listener down. A child is restarted
if it dies.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pynetdicom.transport import ThreadedAssociationServer

from node import context
from node.celery_app import DELIVERY_QUEUE, INFERENCE_QUEUE, URGENT_QUEUE
from node.children import Children
from node.collector import freeze_start_up_objects
from node.completion import late_series_check
from node.config import ConfigError, Settings
from node.context import NodeContext
from node.ingest import Ingestor
from node.listener import start_listener
from node.listener_pool import ListenerPool
from node.peer_policy import ListenerSecurity
from node.scheduler import Scheduler
from node.stacks import dump_stacks_on_sigusr1
from storage.db import upgrade
from storage.reconcile import reindex_orphans, remove_lost_instances

log = logging.getLogger(__name__)


def prepare(settings: Settings) -> NodeContext:
    """Create the data directories, migrate the index to head, clean up after a crash."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    context.configure(settings)
    ctx = context.current()
    upgrade(ctx.engine)
    partials = ctx.store.partial_files()  # one walk of the store for both
    remove_lost_instances(ctx.store, ctx.sessions, partials)  # before remove_partials: it reads their marks
    ctx.store.remove_partials(partials)
    reindex_orphans(ctx.store, ctx.sessions, late_series_check(settings.effective_rules))
    return ctx


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGTERM this process when its parent dies, even by SIGKILL, so an embedded
    worker never outlives its node; exit at once if the parent is already gone (no-op off Linux)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:
        raise SystemExit("the node that started this worker is gone")


class WorkerSupervisor(Children):
    """Keeps the embedded ``mednode worker`` children running — inference (urgent and routine)
    and delivery — so a slow PACS never waits behind the model, a long job never holds up sending
    finished results, and an ask or a priority 8–9 job starts while long jobs run; restarts a
    child that exits unexpectedly.

    The inference worker is one process running ``concurrency`` jobs as threads that share one
    copy of the model and its ``generate`` calls (:mod:`inference.vlm.batching`); it consumes the
    urgent queues too, with ``urgent_slots`` job slots kept for them (:mod:`node.urgent_slots`),
    so an ask starts at once while long jobs run, on the same copy of the model. With
    ``urgent_worker`` (``embedded_urgent_worker: true``) a third process consumes the urgent
    queues instead, and loads a second copy of a model on its first urgent job of that model.
    """

    def __init__(self, config_path: Path | None, concurrency: int, *, urgent_worker: bool = False) -> None:
        base = [sys.executable, "-m", "node.cli", "worker"]
        if config_path is not None:
            base += ["--config", str(config_path)]
        inference = INFERENCE_QUEUE if urgent_worker else f"{URGENT_QUEUE},{INFERENCE_QUEUE}"
        super().__init__([
            [*base, "--queues", inference, "--concurrency", str(concurrency)],
            *([[*base, "--queues", URGENT_QUEUE, "--concurrency", "1"]] if urgent_worker else []),
            [*base, "--queues", DELIVERY_QUEUE, "--concurrency", "1"],
        ], "embedded worker")

    def describe(self, index: int) -> str:
        return f"embedded worker for {self.commands[index][-3]}"


def start_listeners(settings: Settings, ingestor: Ingestor, security: ListenerSecurity | None = None, *,
                    reuse_port: bool = False) -> list[ThreadedAssociationServer]:
    """The DICOM listener on ``dicom_port`` and, with ``tls`` set, a DICOM TLS one on ``tls.port``.

    Both share the calling AE allow-list. Returns the running servers (``.shutdown()`` each).

    Raises
    ------
    ConfigError
        If ``security`` is not given and the allow-list or the TLS files are invalid.
    """
    security = security or ListenerSecurity.from_settings(settings)
    servers = [start_listener(ingestor, ae_title=settings.ae_title, host=settings.dicom_host,
                              port=settings.dicom_port, allowed_calling_ae_titles=security.allowed,
                              reuse_port=reuse_port)]
    if settings.tls is not None and security.ssl_context is not None:
        try:
            servers.append(start_listener(ingestor, ae_title=settings.ae_title, host=settings.dicom_host,
                                          port=settings.tls.port, allowed_calling_ae_titles=security.allowed,
                                          ssl_context=security.ssl_context, reuse_port=reuse_port))
        except OSError:
            servers[0].shutdown()
            raise
    return servers


def serve(settings: Settings, config_path: Path | None) -> None:
    """Run the node until SIGINT/SIGTERM.

    Exits with status 2 when the listener's settings (allow-list, TLS files) are unusable.
    """
    import uvicorn

    from node.celery_app import configure_celery
    from node.tls import check_destination_tls
    from node.web.app import create_app

    dump_stacks_on_sigusr1()
    try:
        security = ListenerSecurity.from_settings(settings)
        check_destination_tls(settings)  # outbound DICOM TLS files, before anything starts
    except ConfigError as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    ctx = prepare(settings)
    configure_celery(settings)
    several = settings.listener_processes > 1
    ingestor = Ingestor(ctx.store, ctx.sessions, late_series_check(settings.effective_rules))
    servers = start_listeners(settings, ingestor, security, reuse_port=several)
    listener_pool = ListenerPool(config_path, settings.listener_processes - 1) if several else None
    if listener_pool is not None:
        listener_pool.start()
    scheduler = Scheduler(ctx)
    scheduler.start()
    supervisor = None
    if settings.embedded_worker:
        supervisor = WorkerSupervisor(config_path, settings.worker_concurrency,
                                      urgent_worker=settings.embedded_urgent_worker)
        supervisor.start()
    web = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, ingestor),  # STOW-RS stores through the listener's ingestor
            host=settings.web_host,
            port=settings.web_port,
            log_level="warning",
            access_log=False,
            # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: only from configured
            # proxies here (the failed-login lockout keys on the client address)
            proxy_headers=bool(settings.web_trusted_proxies),
            forwarded_allow_ips=list(settings.web_trusted_proxies) or None,
        )
    )
    log.info("dashboard and API on http://%s:%d", settings.web_host, settings.web_port)
    # uvicorn re-raises SIGTERM after its own shutdown, which would kill this process before the
    # cleanup below: run it in a thread (no signal handlers there) and own the signals here
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    web_thread = threading.Thread(target=web.run, name="web", daemon=True)
    web_thread.start()
    # full collections walked them on the associations' threads (0.1–0.5 s each)
    freeze_start_up_objects(full_collection_every=None)
    try:
        while not stop.wait(1.0):
            if not web_thread.is_alive():
                log.error("the web server stopped (port %d in use?); shutting down", settings.web_port)
                break
    finally:
        web.should_exit = True
        web_thread.join(timeout=10)
        log.info("shutting down")
        for server in servers:
            server.shutdown()
        if listener_pool is not None:
            listener_pool.stop()
        scheduler.stop()
        if supervisor is not None:
            supervisor.stop()
        ingestor.close()
        ctx.close()
