"""The ``mednode`` command line: serve, worker, status, send, echo, jobs, studies."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from node.config import (
    AnyDestination,
    ConfigError,
    DicomWebDestination,
    Settings,
    load_settings,
    parse_destination,
)
from node.logging_setup import configure_logging

app = typer.Typer(help="mednode: a DICOM node that runs a medical imaging model on studies.",
                  no_args_is_help=True, add_completion=False)
jobs_app = typer.Typer(help="Act on jobs (the same functions as the API).", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
studies_app = typer.Typer(help="Act on studies (the same functions as the API).", no_args_is_help=True)
app.add_typer(studies_app, name="studies")
models_app = typer.Typer(help="Model weights on local disk.", no_args_is_help=True)
app.add_typer(models_app, name="models")
console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML configuration file (see mednode.example.yaml).")
]


def _settings(config: Path | None) -> Settings:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2)
    configure_logging(settings.log_level)
    return settings


def _context(settings: Settings):  # type: ignore[no-untyped-def]
    from node import context
    from storage.db import upgrade

    context.configure(settings)
    ctx = context.current()
    upgrade(ctx.engine)
    return ctx


def _check_before_start(settings: Settings) -> None:
    """Refuse unusable listener and destination security settings (allow-list, TLS files)
    before anything touches the data directory: exit status 2 with the key that is wrong."""
    from node.peer_policy import ListenerSecurity
    from node.tls import check_destination_tls

    try:
        ListenerSecurity.from_settings(settings)
        check_destination_tls(settings)
    except ConfigError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def _check_model_server(settings: Settings) -> None:
    """With ``models.vlm.server``: refuse to start when the server does not serve
    ``models.vlm.model`` (exit status 2); a server that does not answer yet is only a warning."""
    if settings.models.vlm is None or settings.models.vlm.server is None:
        return
    from inference.errors import ModelNotConfiguredError
    from node.vlm_stage import check_server_at_start

    try:
        warning = check_server_at_start(settings.models.vlm)
    except ModelNotConfiguredError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if warning:
        console.print(f"[yellow]{escape(warning)}[/yellow]", highlight=False, soft_wrap=True)


@app.command()
def serve(config: ConfigOpt = None) -> None:
    """Run the node: DICOM listener, completion and routing, web, and (embedded) workers."""
    from node import multiprocess_metrics

    settings = _settings(config)
    _check_before_start(settings)
    _check_model_server(settings)
    # before anything creates a metric; the embedded workers start after this, so their
    # directory can be emptied of a previous run's files
    multiprocess_metrics.enable(settings.data_dir, clean=settings.embedded_worker)
    from node.service import serve as run

    run(settings, config)


@app.command(hidden=True)
def listen(config: ConfigOpt = None) -> None:
    """A listener process beside ``mednode serve`` (started by it when listener_processes > 1)."""
    from node.listener_pool import run_listener

    run_listener(_settings(config))


@app.command()
def worker(
    config: ConfigOpt = None,
    queues: Annotated[str, typer.Option(help=(
        "Comma-separated queues to consume: inference.urgent (priority 8-9: asks, STAT rules), "
        "inference, delivery. Run one worker with --queues inference.urgent beside the others so "
        "an urgent job starts while a long one runs. 'inference' and 'inference.urgent' stand for "
        "the queues of every model this worker's configuration holds (inference.vlm, "
        "inference.monai.<bundle>…); name one of those to take only its jobs."))] = "inference.urgent,inference,delivery",
    concurrency: Annotated[int | None, typer.Option(help=(
        "Jobs run at once (default: worker_concurrency). A worker of inference queues runs them as "
        "threads of one process sharing one copy of the model; a delivery worker as processes."))] = None,
    urgent_slots: Annotated[int | None, typer.Option(help=(
        "Job slots kept for urgent jobs beside --concurrency, when this worker consumes both urgent "
        "and routine inference queues (default: urgent_slots; 0: none, urgent jobs then wait for a "
        "free slot)."))] = None,
) -> None:
    """Run a Celery worker (one per GPU host for scale-out)."""
    from node import multiprocess_metrics

    settings = _settings(config)
    _check_model_server(settings)
    multiprocess_metrics.enable(settings.data_dir, clean=False)  # before any metric is created
    from node import context
    from node.celery_app import (
        broker_server_version,
        configure_celery,
        consumer_timeout_warning,
        is_urgent_queue,
        worker_queues,
    )
    from node.children import PARENT_PID_ENV
    from node.service import die_with_parent

    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is not None:  # started by `mednode serve`: live and die with it
        die_with_parent(int(parent))
    processes = concurrency or settings.worker_concurrency
    inference = any(q.strip().startswith("inference") for q in queues.split(","))
    urgent = [q for q in worker_queues([q.strip() for q in queues.split(",")], settings)
              if is_urgent_queue(q)]
    routine = any(q.startswith("inference") and not is_urgent_queue(q)
                  for q in worker_queues([q.strip() for q in queues.split(",")], settings))
    # urgent and routine jobs in one process: urgent ones get slots of their own (node.urgent_slots)
    slots = (settings.urgent_slots if urgent_slots is None else urgent_slots) if urgent and routine else 0
    # one process: tasks run in the worker itself (the model stays loaded where the remote-control
    # answers come from). An inference worker runs concurrent jobs as threads of that process:
    # one copy of the model per worker (per GPU), and the jobs' prompts share its generate calls
    # (inference.vlm.batching); with urgent slots, even one routine job runs on a thread, so the
    # consumer keeps taking urgent messages meanwhile. Other workers: a prefork pool.
    pool = "threads" if inference and (processes > 1 or slots) else "solo" if processes == 1 else "prefork"
    if pool == "prefork":
        # prefork children each run torch: one thread each, or they fight over the cores
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    context.configure(settings)
    celery = configure_celery(settings)
    if inference:
        from node.worker_status import URGENT_SLOTS

        URGENT_SLOTS["n"] = slots
    if slots:
        from node.urgent_slots import urgent_slots_step

        celery.steps["consumer"].add(urgent_slots_step(urgent, slots))
    requested = queues
    warning = consumer_timeout_warning(broker_server_version(celery) or "")
    if warning is not None:
        typer.echo(f"warning: {warning}", err=True)
    consumed = worker_queues([q.strip() for q in queues.split(",") if q.strip()], settings)
    queues = ",".join(q for q in consumed if not (slots and q in urgent))  # urgent slots take those
    if inference:
        # import the model runtime (torch, transformers) now, not in the first job: an urgent
        # job must start within a second or two of being asked. Model weights still load lazily,
        # on first use, so a worker that never runs a model's job holds no copy of it.
        import node.pipeline

        node.pipeline.warm_up()
    name = f"mednode-{requested.replace(',', '-')}-{os.getpid()}@{socket.gethostname()}"
    argv = [
        "worker",
        "--queues", queues,
        "--concurrency", str(processes),
        "--pool", pool,
        "--loglevel", settings.log_level,
        "--without-gossip", "--without-mingle",
        # one name per worker process on a host: remote control (dashboard) tells them apart
        "--hostname", name,
    ]
    status = None
    if settings.broker.startswith("sqla+"):
        # the embedded broker has no broadcast: the Workers page reads this file instead
        from node.worker_status import StatusFile

        status = StatusFile(settings.data_dir, name, queues=consumed, concurrency=processes,
                            pool=pool, urgent_slots=slots).start()
    from celery import signals

    from node.collector import collect_after_job, freeze_start_up_objects

    # what is loaded by now (torch, transformers, the standard's tables: ~770,000 objects the
    # collector tracks) lives as long as the worker: keep it out of the collector's full passes,
    # which otherwise walked it all every few jobs, in the middle of one (0.3–0.7 s on 2 cores,
    # landing in whichever stage was running; docs/BENCHMARKS.md, Latency, runs 5 and 5b)
    freeze_start_up_objects()
    signals.worker_ready.connect(freeze_start_up_objects, weak=False)
    signals.worker_process_init.connect(freeze_start_up_objects, weak=False)
    signals.task_postrun.connect(collect_after_job, weak=False)
    try:
        celery.worker_main(argv)
    finally:
        if status is not None:
            status.stop()


@app.command()
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print counts as JSON.")] = False,
) -> None:
    """Show studies and jobs by state."""
    from node.jobs import status_counts

    ctx = _context(_settings(config))
    with ctx.sessions() as session:
        counts = status_counts(session)
    if as_json:
        typer.echo(json.dumps(counts, indent=2))
        return
    out = Console()
    out.print(f"instances stored: [bold]{counts['instances']}[/bold]")
    for section in ("studies", "jobs", "deliveries"):
        table = Table(title=section)
        table.add_column("state")
        table.add_column("count", justify="right")
        for state, count in counts[section].items():
            table.add_row(state, str(count))
        out.print(table)


def _destination(text: str, settings: Settings | None = None) -> AnyDestination:
    """A destination by name (``default``, a key of ``destinations``), ``AET@host:port`` or a
    DICOMweb URL; a configured one comes with its options (calling AE title, timeouts, TLS, or
    a DICOMweb archive's credentials)."""
    if settings is not None and text != "default" and text in settings.destinations:
        return settings.destinations[text]
    if settings is not None and text == "default" and settings.destination is not None:
        return settings.destination
    try:
        parsed = parse_destination(text)
    except ValueError as exc:
        names = f" or one of {['default', *settings.destinations]}" if settings is not None else ""
        raise typer.BadParameter(f"{exc}{names}")
    return (settings.find_destination(str(parsed)) if settings is not None else None) or parsed


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or directories.", exists=True)],
    to: Annotated[str, typer.Option("--to", help="AET@host:port, a DICOMweb URL or a name in destinations.")],
    config: ConfigOpt = None,
    ae_title: Annotated[str | None, typer.Option("--ae-title", help="Calling AE title.")] = None,
) -> None:
    """C-STORE files to a peer, each in its own transfer syntax (STOW-RS to a DICOMweb archive)."""
    from rich.progress import Progress

    from node import dicomweb_delivery
    from node.delivery import DeliveryError, send_files

    settings = _settings(config)
    destination = _destination(to, settings)
    files = sorted({f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()})
    if not files:
        console.print("[red]no files to send[/red]")
        raise typer.Exit(1)
    failed = 0
    with Progress(console=console) as progress:
        bar = progress.add_task(f"sending to {destination}", total=len(files))

        def advance(result):  # type: ignore[no-untyped-def]
            nonlocal failed
            if not result.ok:
                failed += 1
                line = f"{result.path}: {result.describe()} [{result.outcome}]"
                progress.console.print(f"[red]{escape(line)}[/red]")
            progress.advance(bar)

        try:
            for start in range(0, len(files), 1000):
                if isinstance(destination, DicomWebDestination):
                    dicomweb_delivery.send_files(destination, files[start:start + 1000], progress=advance)
                else:
                    send_files(destination, files[start:start + 1000],
                               calling_ae_title=ae_title or settings.ae_title, progress=advance)
        except (DeliveryError, ValueError) as exc:  # ConfigError (TLS files) is a ValueError
            console.print(f"[red]{escape(f'{destination}: {exc}')}[/red]")
            raise typer.Exit(1)
    console.print(escape(f"sent {len(files) - failed} of {len(files)} file(s) to {destination}"))
    raise typer.Exit(1 if failed else 0)


@app.command()
def echo(
    destination: Annotated[str, typer.Argument(help="AET@host:port, a DICOMweb URL or a name in destinations.")],
    config: ConfigOpt = None,
) -> None:
    """C-ECHO a peer and show the round trip (with its calling AE title, timeouts and TLS); a
    DICOMweb archive gets a one-study QIDO-RS search with its credentials instead."""
    from node import dicomweb_delivery
    from node.delivery import echo as do_echo

    settings = _settings(config)
    try:
        target = _destination(destination, settings)
        if isinstance(target, DicomWebDestination):
            result = dicomweb_delivery.echo(target)
        else:
            result = do_echo(target, calling_ae_title=settings.ae_title)
    except ConfigError as exc:
        typer.echo(f"{destination}: {exc}", err=True)
        raise typer.Exit(2)
    if result.ok:
        typer.echo(f"{result.destination}: success in {result.latency_s * 1000:.1f} ms")
        return
    typer.echo(f"{result.destination}: failed ({result.error or hex(result.status or 0)})", err=True)
    raise typer.Exit(1)


@jobs_app.command("retry")
def jobs_retry(job_id: int, config: ConfigOpt = None) -> None:
    """Queue a failed or cancelled job again."""
    from node import jobs
    from node.celery_app import configure_celery

    settings = _settings(config)
    ctx = _context(settings)
    configure_celery(settings)
    try:
        jobs.retry_job(ctx.sessions, job_id)
    except (jobs.JobNotFoundError, jobs.InvalidTransitionError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1)
    typer.echo(f"job {job_id} queued")


@jobs_app.command("cancel")
def jobs_cancel(job_id: int, config: ConfigOpt = None) -> None:
    """Cancel a job that has not finished."""
    from node import jobs

    ctx = _context(_settings(config))
    try:
        jobs.cancel_job(ctx.sessions, job_id)
    except (jobs.JobNotFoundError, jobs.InvalidTransitionError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1)
    typer.echo(f"job {job_id} cancelled")


@jobs_app.command("priority")
def jobs_priority(job_id: int, priority: Annotated[int, typer.Argument(min=0, max=9)], config: ConfigOpt = None) -> None:
    """Give a queued job another priority (9 runs first)."""
    from node import jobs
    from node.celery_app import configure_celery

    settings = _settings(config)
    ctx = _context(settings)
    configure_celery(settings)
    try:
        jobs.set_priority(ctx.sessions, job_id, priority)
    except (jobs.JobNotFoundError, jobs.InvalidTransitionError) as exc:
        console.print(escape(str(exc)))
        raise typer.Exit(1)
    typer.echo(f"job {job_id} has priority {priority}")


@jobs_app.command("send")
def jobs_send(
    job_id: int,
    to: Annotated[str | None, typer.Option("--to", help="AET@host:port (default: destination).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Send a finished job's result objects to a destination."""
    from node import jobs
    from node.celery_app import configure_celery

    settings = _settings(config)
    destination = _destination(to, settings) if to else settings.destination
    if destination is None:
        console.print("no destination: give --to AET@host:port or configure destination")
        raise typer.Exit(2)
    ctx = _context(settings)
    configure_celery(settings)
    try:
        created = jobs.send_results(ctx.sessions, job_id, [str(destination)])
    except (jobs.JobNotFoundError, jobs.InvalidTransitionError) as exc:
        console.print(escape(str(exc)))
        raise typer.Exit(1)
    for delivery_id in created:
        jobs.enqueue_delivery(ctx.sessions, delivery_id)
    typer.echo(f"job {job_id}: {len(created)} object(s) queued for {destination}")


@studies_app.command("complete")
def studies_complete(
    study_uid: Annotated[str, typer.Argument(help="Study Instance UID of a study still receiving.")],
    config: ConfigOpt = None,
) -> None:
    """Complete a receiving study now (no more waiting for its quiet period, required series or
    maximum wait) and queue the jobs its rules make."""
    from node.celery_app import configure_celery
    from node.web import actions

    settings = _settings(config)
    ctx = _context(settings)
    configure_celery(settings)
    try:
        job_ids = actions.complete_now(ctx.sessions, settings, study_uid, "cli")
    except (actions.StudyNotFoundError, actions.ActionRefusedError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1)
    typer.echo(f"study {study_uid} complete: " + (f"job(s) {', '.join(map(str, job_ids))} queued"
                                                  if job_ids else "no rule matched"))


@models_app.command("pull")
def models_pull(
    repo_id: Annotated[str, typer.Argument(help="Hugging Face hub id, e.g. google/medgemma-4b-it")],
    dest: Annotated[Path | None, typer.Option(help="Target directory (default: <data_dir>/models/<name>).")] = None,
    revision: Annotated[str | None, typer.Option(help="Branch, tag or commit.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Download a model to local disk (where a network exists), for models.vlm.path."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    settings = _settings(config)
    target = dest or settings.data_dir / "models" / repo_id.replace("/", "--")
    try:
        path = snapshot_download(repo_id, revision=revision, local_dir=target)
    except (GatedRepoError, RepositoryNotFoundError) as exc:
        console.print(escape(f"{repo_id}: {type(exc).__name__}: the model does not exist or needs "
                             "access (accept its licence on the hub and set HF_TOKEN)"))
        raise typer.Exit(1)
    except Exception as exc:  # noqa: BLE001 (boundary: no network, proxy, DNS... say so plainly)
        console.print(escape(
            f"cannot download {repo_id}: the hub is not reachable from this machine "
            f"({type(exc).__name__}). Copy the model directory here by other means and set "
            "models.vlm.path (or MEDNODE_VLM_PATH) to it."
        ))
        raise typer.Exit(1)
    typer.echo(f"{repo_id} is in {path}; set models.vlm.path (or MEDNODE_VLM_PATH) to it")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
