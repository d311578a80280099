"""The one settings object of mednode: a YAML file overridden by ``MEDNODE_*`` environment variables.

Precedence, highest first: keyword arguments, environment variables (``MEDNODE_DICOM_PORT``, nested
keys with ``__`` as in ``MEDNODE_DELIVERY__GIVE_UP_AFTER_S``), the YAML file given with ``--config``,
the defaults below. Everything is validated at start; :func:`load_settings` raises
:class:`ConfigError` whose message names the broken key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from inference.tasks import TaskSpec, parse_tasks

ENV_PREFIX = "MEDNODE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no control


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and says what is expected."""


def _check_ae_title(value: str) -> str:
    text = str(value).strip()
    if not _AE_RE.match(text):
        raise ValueError("an AE title has 1 to 16 printable characters and no backslash")
    return text


AETitle = Annotated[str, BeforeValidator(_check_ae_title)]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_pattern(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
    return value


#: accepted values of a coded attribute; one string is a list of one
Values = Annotated[list[str] | None, BeforeValidator(_as_list)]
#: a regular expression matched case-insensitively against a whole text value
Pattern = Annotated[str | None, AfterValidator(_check_pattern)]
Port = Annotated[int, Field(ge=1, le=65535)]


class DestinationTimeouts(BaseModel):
    """A destination's own timeouts; each one left out is the node's ``delivery.*_timeout_s``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    acse_s: float | None = Field(default=None, gt=0)
    dimse_s: float | None = Field(default=None, gt=0)
    network_s: float | None = Field(default=None, gt=0)


class DestinationTLS(BaseModel):
    """Outbound DICOM TLS (PS3.15 B.1) to one destination: TLS 1.2 or later, peer verified.

    The peer's certificate must chain to ``ca_file`` and name the host (or ``server_hostname``
    when the certificate names another host than the one connected to). ``cert_file`` and
    ``key_file`` are this node's client certificate, for peers that require one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_hostname: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _cert_with_key(self) -> DestinationTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls: give both cert_file and key_file (a client certificate and its key), or neither")
        return self


class Destination(BaseModel):
    """A DICOM peer results are sent to, written ``AET@host:port`` or as a mapping with options.

    ``str(destination)`` is always ``AET@host:port``: the form jobs and deliveries store, and the
    key :meth:`Settings.find_destination` finds the options by at send time.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    #: the calling AE title sent to this peer; the node's ``ae_title`` when None
    calling_ae_title: AETitle | None = None
    #: this peer's timeouts; the node's ``delivery.*_timeout_s`` for each one not given
    timeouts: DestinationTimeouts = Field(default_factory=DestinationTimeouts)
    tls: DestinationTLS | None = None
    #: send an IHE IOCM rejection note (KOS "Rejected for Quality Reasons") withdrawing the objects
    #: of a superseded result version from this peer (only where the peer supports IOCM)
    rejection_notes: bool = False

    @classmethod
    def parse(cls, text: str) -> Destination:
        """Parse ``AET@host:port``.

        Raises
        ------
        ValueError
            If ``text`` is not of that form.
        """
        match = re.match(r"^([^@]+)@(\[[^\]]+\]|[^:@]+):(\d+)$", str(text).strip())
        if not match:
            raise ValueError(f"expected AET@host:port, got {text!r}")
        return cls(ae_title=match[1], host=match[2].strip("[]"), port=int(match[3]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class DicomWebSettings(BaseModel):
    """How to reach a DICOMweb archive (PS3.18): its base URL and how to authenticate.

    ``url`` is the service root, the part before ``/studies`` (Orthanc:
    ``http://host:8042/dicom-web``). Credentials never go in the URL; a secret may come from
    the environment, e.g. ``MEDNODE_DESTINATIONS__ARCHIVE__DICOMWEB__PASSWORD``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(pattern=r"^https?://[^\s@/?#]+(/[^\s?#]*)?$", max_length=120)
    auth: Literal["none", "bearer", "basic"] = "none"
    #: the bearer token (``auth: bearer``)
    token: SecretStr | None = None
    #: the user name and password (``auth: basic``)
    username: str | None = Field(default=None, min_length=1)
    password: SecretStr | None = None
    #: CA bundle to verify an ``https`` archive with; None: the system's CAs
    ca_file: Path | None = None
    #: per request (connect and each read); a timeout is retried like a C-STORE timeout
    timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("url", mode="before")
    @classmethod
    def _strip_slash(cls, value: Any) -> Any:
        return value.strip().rstrip("/") if isinstance(value, str) else value

    @model_validator(mode="after")
    def _credentials(self) -> DicomWebSettings:
        if self.auth == "bearer" and not (self.token and self.token.get_secret_value()):
            raise ValueError("token: auth is bearer, so give the token (or set auth: none)")
        if self.auth == "basic" and not (self.username and self.password and self.password.get_secret_value()):
            raise ValueError("username/password: auth is basic, so give both (or set auth: none)")
        return self


class DicomWebDestination(BaseModel):
    """A DICOMweb archive results are sent to by STOW-RS: ``{dicomweb: {url: …, auth: …}}``.

    ``str(destination)`` is its URL: the form jobs and deliveries store, and the key
    :meth:`Settings.find_destination` finds the credentials by at send time.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    dicomweb: DicomWebSettings
    #: send IHE IOCM rejection notes withdrawing superseded results (as for DIMSE destinations)
    rejection_notes: bool = False

    def __str__(self) -> str:
        return self.dicomweb.url


def _destination_kind(value: Any) -> str:
    if isinstance(value, DicomWebDestination) or (isinstance(value, dict) and "dicomweb" in value):
        return "dicomweb"
    return "dimse"


#: a destination of either kind: DIMSE (C-STORE) or DICOMweb (STOW-RS, a mapping with ``dicomweb``)
AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomWebDestination, Tag("dicomweb")],
    Discriminator(_destination_kind),
]


def parse_destination(text: str) -> AnyDestination:
    """Parse ``AET@host:port`` or a DICOMweb URL (``http(s)://…``, no authentication).

    Raises
    ------
    ValueError
        If ``text`` is neither.
    """
    text = str(text).strip()
    if text.startswith(("http://", "https://")):
        return DicomWebDestination(dicomweb=DicomWebSettings(url=text))
    return Destination.parse(text)


def _destination(value: Any) -> Any:
    if value is None or value == "" or isinstance(value, (Destination, DicomWebDestination)):
        return value or None
    if isinstance(value, dict):
        return value
    return parse_destination(value)


DestinationField = Annotated[AnyDestination | None, NoDecode, BeforeValidator(_destination)]


class RuleMatch(BaseModel):
    """What a study must look like for a rule to apply (all given conditions must hold).

    Series-level conditions (modality, body part, SOP class, series description) must hold for at
    least one series; the rule's job then reads only the series that satisfy them. Text patterns are
    regular expressions matched case-insensitively against the whole value (``re.fullmatch``).
    """

    model_config = ConfigDict(extra="forbid")

    modality: Values = None
    body_part_examined: Pattern = None
    sop_class_uid: Values = None
    study_description: Pattern = None
    series_description: Pattern = None
    calling_ae_title: Values = None
    called_ae_title: Values = None


class SeriesPattern(BaseModel):
    """A series a study must hold (``completion.required_series``): all given conditions hold.

    ``modality`` and ``sop_class_uid`` list accepted values; the text keys are regular expressions
    matched case-insensitively against the whole value, as in :class:`RuleMatch`.
    """

    model_config = ConfigDict(extra="forbid")

    modality: Values = None
    body_part_examined: Pattern = None
    series_description: Pattern = None
    sop_class_uid: Values = None

    @model_validator(mode="after")
    def _not_empty(self) -> SeriesPattern:
        if not any(v is not None for v in (self.modality, self.body_part_examined, self.series_description,
                                           self.sop_class_uid)):
            raise ValueError("a required series names at least one of modality, body_part_examined, "
                             "series_description, sop_class_uid")
        return self

    def describe(self) -> str:
        """The pattern as a person reads it, e.g. ``modality DX, series_description 'LAT'``."""
        parts = [f"modality {'/'.join(self.modality)}" if self.modality else None,
                 f"body_part_examined {self.body_part_examined!r}" if self.body_part_examined else None,
                 f"series_description {self.series_description!r}" if self.series_description else None,
                 f"sop_class_uid {'/'.join(self.sop_class_uid)}" if self.sop_class_uid else None]
        return ", ".join(p for p in parts if p)


class RuleCompletion(BaseModel):
    """When a study this rule matches counts as complete, beyond the quiet period.

    A study waits until each ``required_series`` is present (e.g. a PA and a lateral chest
    view), but never longer than ``max_wait_s`` after it began receiving: then it completes with
    what it has, and its completion reason says which series were missing. ``max_wait_s`` alone
    bounds the wait of a study whose instances keep trickling in.
    """

    model_config = ConfigDict(extra="forbid")

    required_series: list[SeriesPattern] = Field(default_factory=list)
    max_wait_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _bounded(self) -> RuleCompletion:
        if self.required_series and self.max_wait_s is None:
            raise ValueError("max_wait_s: required with required_series, or a study that never receives "
                             "one of them would wait for ever")
        return self


class RulePriors(BaseModel):
    """The patient's prior studies a rule's job compares with, fetched from a PACS.

    The job queries ``source`` (a name in ``destinations`` or ``AET@host:port``) by C-FIND for the
    patient's earlier studies, keeps at most ``count`` (newest first) that satisfy the conditions,
    retrieves their images by C-GET and reads a prior report (an SR of the prior study) when the
    PACS holds one. Each DIMSE exchange waits at most ``timeout_s``; a PACS that does not answer
    in time makes the job go on without a prior (``on_unavailable: continue``, the SR says so) or
    retry later (``retry``, up to ``job_max_attempts``).
    """

    model_config = ConfigDict(extra="forbid")

    #: prior studies compared; one today (the prompt forms set one prior beside the current study)
    count: int = Field(default=1, ge=1, le=1)
    #: only studies holding a series of the current study's modality
    same_modality: bool = True
    #: only studies holding a series of the current study's Body Part Examined (when it has one)
    same_body_part: bool = True
    #: only studies at most this old relative to the current study's date; None: any age
    max_age_days: float | None = Field(default=730, gt=0)
    source: str = Field(min_length=1)
    on_unavailable: Literal["continue", "retry"] = "continue"
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: images of one prior study shown to the model, at most
    max_images: int = Field(default=1, ge=1, le=4)


class Rule(BaseModel):
    """A routing rule: which studies, which tasks, how urgent, where the results go."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    match: RuleMatch = Field(default_factory=RuleMatch)
    #: task specifications as data, e.g. ``["ct_analysis"]`` or ``[{"report": {"language": "zh"}}]``
    tasks: list[str | dict[str, Any]] = Field(min_length=1)
    priority: int = Field(default=5, ge=0, le=9)
    #: ``AET@host:port`` strings or names from ``destinations``; ``default`` is ``destination``
    destinations: list[str] = Field(default_factory=lambda: ["default"])
    quiet_period_s: float | None = Field(default=None, gt=0)
    #: when true, later rules are tried too; by default the first matching rule wins
    continue_matching: bool = Field(default=False, alias="continue")
    #: the rule is active only when this model is configured (``vlm``)
    requires_model: Literal["vlm"] | None = None
    #: required series and a maximum wait (:class:`RuleCompletion`); none: the quiet period alone
    completion: RuleCompletion | None = None
    #: compare with the patient's prior studies from a PACS (:class:`RulePriors`)
    priors: RulePriors | None = None

    @model_validator(mode="after")
    def _wait_beyond_quiet(self) -> Rule:
        c = self.completion
        if c is not None and c.max_wait_s is not None and self.quiet_period_s is not None \
                and c.max_wait_s < self.quiet_period_s:
            raise ValueError(f"completion.max_wait_s ({c.max_wait_s:g}) is shorter than quiet_period_s "
                             f"({self.quiet_period_s:g}): raise it or drop it")
        return self


class DeliverySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retry_initial_s: float = Field(default=5.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    give_up_after_s: float = Field(default=86400.0, gt=0)
    acse_timeout_s: float = Field(default=30.0, gt=0)
    dimse_timeout_s: float = Field(default=120.0, gt=0)
    network_timeout_s: float = Field(default=60.0, gt=0)


class VLMSettings(BaseModel):
    """A vision-language model on local disk (weights are never downloaded at run time)."""

    model_config = ConfigDict(extra="forbid")

    #: required; may come from MEDNODE_VLM_PATH
    path: Path | None = None
    #: required; may come from MEDNODE_VLM_FAMILY
    family: str | None = Field(default=None, min_length=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    #: families that ship their own modelling code run it only when this says so explicitly
    trust_remote_code: bool = False
    max_new_tokens: int = Field(default=256, ge=1)
    #: prompts per ``generate`` call, from one job or from several: the jobs a worker runs at once
    #: (``worker_concurrency``) share one model and its batches (in-process; a server batches itself)
    batch_size: int = Field(default=8, ge=1)
    #: with ``device: auto`` on a worker without CUDA, refuse a checkpoint whose weight files are
    #: larger than this (MiB), with a clear job reason; ``device: cpu`` runs any size, None never refuses
    cpu_max_weights_mb: int | None = Field(default=2048, ge=0)
    #: slices sampled from a CT/MR series for a multi-image prompt; None: the family's own number
    #: (MedGemma: 85, as it was trained; the others: 8)
    slices_per_series: int | None = Field(default=None, ge=1, le=85)
    name: str | None = None
    #: an OpenAI-compatible model server (vLLM, SGLang, LMDeploy, ``transformers serve``):
    #: with it set, workers send the prepared images there instead of loading ``path``
    server: str | None = Field(default=None, pattern=r"^https?://")
    #: the model name the server serves (one of its ``/v1/models``); required with ``server``
    model: str | None = Field(default=None, min_length=1)
    #: per request to the server; a timeout makes the job retry
    server_timeout_s: float = Field(default=300.0, gt=0)
    #: model input side; None: what the processor says (in-process), the family's default (server)
    image_size: int | None = Field(default=None, ge=16)
    #: the server is outside the hospital: what is sent is de-identified first (images that may
    #: carry burned-in text refused or masked, identifiers removed from prompt text) and each
    #: request is written to the audit trail
    remote: bool = False
    #: with ``remote``: an image that may carry burned-in text (US, SC, Burned In Annotation YES)
    #: fails the job (``refuse``), or, for ultrasound with its Sequence of Ultrasound Regions,
    #: goes masked to those regions (``mask``; images without regions are still refused)
    burned_in_text: Literal["refuse", "mask"] = "refuse"

    @model_validator(mode="after")
    def _server_and_model(self) -> VLMSettings:
        if self.server is not None and self.model is None:
            raise ValueError("models.vlm.model: needed with models.vlm.server (a name the server "
                             "lists at /v1/models)")
        if self.remote and self.server is None:
            raise ValueError("models.vlm.remote: applies to a model server; set models.vlm.server, "
                             "or remove remote (an in-process model sends nothing anywhere)")
        if self.model is not None and self.server is None:
            raise ValueError("models.vlm.server: models.vlm.model names a model on a server; "
                             "set models.vlm.server to its URL, or remove models.vlm.model")
        return self


class TLSSettings(BaseModel):
    """DICOM TLS (PS3.15 B.1): a second listener port speaking TLS."""

    model_config = ConfigDict(extra="forbid")

    port: Port
    cert_file: Path
    key_file: Path
    #: CA bundle to verify client certificates with; required when client certificates are required
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_when_verifying(self) -> TLSSettings:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("tls.ca_file: needed to verify client certificates")
        return self


class RetentionSettings(BaseModel):
    """What the retention cleaner removes, and when."""

    model_config = ConfigDict(extra="forbid")

    #: source instances and results older than this are removed once their jobs are finished
    #: (delivered, or terminal); None keeps everything
    max_age_days: float | None = Field(default=None, gt=0)
    check_every_s: float = Field(default=3600.0, gt=0)
    #: prior-study copies (``priors/<job>``) a job left behind (it died before removing them) are
    #: removed after this, whether or not ``max_age_days`` is set
    priors_max_age_s: float = Field(default=86400.0, gt=0)


class ModelsSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vlm: VLMSettings | None = None
    #: MONAI bundles on local disk by name, for ``segment: {bundle: NAME}`` tasks
    bundles: dict[str, Path] = Field(default_factory=dict)
    #: where bundles run: ``auto`` (CUDA when available), ``cpu``, ``cuda:0``…
    bundle_device: str = "auto"


#: Most listener processes ``listener_processes: 0`` (automatic) starts on PostgreSQL: each is a
#: Python process of its own, and past a few cores the index and the disk are what limit.
MAX_AUTO_LISTENER_PROCESSES = 8


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Configuration of one mednode installation (see ``mednode.example.yaml``)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    ae_title: AETitle = "MEDNODE"
    dicom_host: str = "0.0.0.0"
    dicom_port: Port = 11112
    web_host: str = "127.0.0.1"
    web_port: Port = 8080
    data_dir: Path = Path("var")
    database_url: str | None = None
    broker_url: str | None = None
    quiet_period_s: float = Field(default=15.0, gt=0)
    completion_poll_s: float = Field(default=1.0, gt=0)
    destination: DestinationField = None
    destinations: dict[str, AnyDestination] = Field(default_factory=dict)
    rules: list[Rule] | None = None
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    job_max_attempts: int = Field(default=3, ge=1)
    job_retry_backoff_s: float = Field(default=10.0, gt=0)
    #: a running job whose worker has not renewed its lease for this long is taken as lost and
    #: queued again by the sweep (the worker renews it every third of it)
    job_lease_s: float = Field(default=120.0, gt=0)
    #: processes serving the DICOM port(s) together (``SO_REUSEPORT``; each association goes to
    #: one): ``serve`` itself and listener children it starts. More than 1 needs PostgreSQL.
    #: 0 (the default): one per core this process may use on PostgreSQL, at most
    #: :data:`MAX_AUTO_LISTENER_PROCESSES`; 1 on SQLite (docs/BENCHMARKS.md, "Parallel ingest")
    listener_processes: int = Field(default=0, ge=0, le=64)
    #: ``mednode serve`` starts a worker process itself (the embedded default)
    embedded_worker: bool = True
    #: jobs one worker runs at once. Inference workers run them as threads of one process that
    #: holds one copy of the model (one process per GPU), and their prompts share ``generate``
    #: calls (``models.vlm.batch_size``, 8 by default: as many slots as prompts per call, or
    #: 8 studies in flight would be run as batches of 4); other workers run a process per job
    worker_concurrency: int = Field(default=8, ge=1)
    #: most memory (MiB) the volume jobs (built-in CT analyzer, segmentation bundles) of one worker
    #: process hold at once, by estimate: each reserves a multiple of its series' int16 pixel bytes
    #: before it loads the series (CT analyzer: 2x, measured; bundle: 4x) and waits, in arrival
    #: order, while the others hold too much; one job larger than the budget runs alone.
    #: None: no bound
    volume_memory_budget_mb: int | None = Field(default=4096, ge=1)
    #: true: a study whose rule loads a volume (CT analyzer, bundle) is read into one by an idle
    #: worker once it has been quiet for half its quiet period, and its job takes that volume
    #: instead of reading the series again, if no instance changed since (:mod:`node.preloaded`)
    volume_preload: bool = True
    #: true (with ``volume_preload``): a series of single-frame images is also read while it is
    #: being received, the files that arrived since the last read every second, so that its job
    #: finds it read however long it is; on a small machine it slows receiving while it reads
    volume_preload_while_receiving: bool = True
    #: job slots an inference worker keeps for urgent jobs (asks, priority 8-9) beside
    #: ``worker_concurrency``, when it consumes urgent and routine queues (the embedded default
    #: does): an urgent job starts at once while the other slots run long jobs, in the same
    #: process, on the same copy of the model (:mod:`node.urgent_slots`). 0: urgent jobs wait for
    #: a free slot
    urgent_slots: int = Field(default=2, ge=0)
    #: true: the embedded workers include a process of its own for ``inference.urgent``, which
    #: loads a second copy of a model on its first urgent job of that model (the layout before
    #: ``urgent_slots``); false (default): the inference worker takes urgent jobs on its urgent slots
    embedded_urgent_worker: bool = False
    #: new instances are refused (0xA700) when less than this is free on the data volume
    min_free_disk_mb: int = Field(default=200, ge=0)
    #: calling AE titles allowed to associate, each ``AET`` or ``AET@host``; None allows any peer
    allowed_calling_ae_titles: list[str] | None = None
    tls: TLSSettings | None = None
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    models: ModelsSettings = Field(default_factory=ModelsSettings)
    #: shortcut for ``models.vlm.path`` / ``models.vlm.family`` (MEDNODE_VLM_PATH, MEDNODE_VLM_FAMILY)
    #: and ``models.vlm.server`` / ``models.vlm.model`` (MEDNODE_VLM_SERVER, MEDNODE_VLM_MODEL);
    #: an empty value counts as unset (docker-compose.yml passes them through, empty by default)
    vlm_path: Path | None = None
    vlm_family: str | None = None
    vlm_server: str | None = None
    vlm_model: str | None = None
    #: dashboard login; mutations and patient fields need it (no password: nobody can log in)
    web_admin_user: str | None = None
    web_admin_password: SecretStr | None = None
    #: signs session cookies and CSRF tokens; required when web_host is not loopback
    web_secret_key: SecretStr | None = None
    #: bearer tokens with admin rights, for scripts (MEDNODE_WEB_API_TOKENS='["t1","t2"]')
    web_api_tokens: list[SecretStr] = Field(default_factory=list)
    #: failed logins (per client address or per user name) within web_login_window_s that lock
    #: further attempts out (HTTP 429) for web_login_lockout_s, doubling per lockout up to the max
    web_login_max_failures: int = Field(default=5, ge=1)
    web_login_window_s: float = Field(default=300.0, gt=0)
    web_login_lockout_s: float = Field(default=60.0, gt=0)
    web_login_max_lockout_s: float = Field(default=3600.0, gt=0)
    #: reverse proxies (addresses or networks) whose X-Forwarded-For names the client; none by default
    web_trusted_proxies: list[str] = Field(default_factory=list)
    #: largest STOW-RS request body accepted (HTTP 413 beyond); a request is held in memory whole
    stow_max_request_mb: int = Field(default=1024, ge=1)
    #: the URL clients reach the web server at (``https://node.example.org``), for the URLs the node
    #: writes into DICOMweb answers (STOW-RS RetrieveURL, WADO-RS BulkDataURI); unset, each answer
    #: takes its request's Host header, which some clients send without the port
    web_public_url: str | None = None

    #: the YAML file of this settings class (set by :func:`load_settings`)
    yaml_path: ClassVar[Path | None] = None

    @field_validator("destinations", mode="before")
    @classmethod
    def _parse_destinations(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _destination(v) for k, v in value.items()}
        return value

    @model_validator(mode="after")
    def _several_listeners_need_postgresql(self) -> Settings:
        on_postgresql = (self.database_url or "").startswith("postgresql")
        if self.listener_processes == 0:
            self.listener_processes = min(usable_cores(), MAX_AUTO_LISTENER_PROCESSES) if on_postgresql else 1
        if self.listener_processes > 1 and not on_postgresql:
            raise ValueError(
                f"listener_processes: {self.listener_processes} listener processes need database_url "
                "on PostgreSQL (SQLite has one writer at a time); set listener_processes: 1 or use PostgreSQL")
        return self

    @model_validator(mode="after")
    def _one_destination_per_address(self) -> Settings:
        seen: dict[str, tuple[str, AnyDestination]] = {}
        named = [("destination", self.destination)] if self.destination is not None else []
        for key, dest in [*named, *((f"destinations.{n}", d) for n, d in self.destinations.items())]:
            first = seen.setdefault(str(dest), (key, dest))
            if first[1] != dest:
                raise ValueError(
                    f"{key}: {dest} is also {first[0]} with other options; deliveries are kept by "
                    "AET@host:port, so give one address one set of options"
                )
        return self

    @field_validator("vlm_path", "vlm_family", "vlm_server", "vlm_model", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _apply_vlm_shortcut(self) -> Settings:
        vlm = self.models.vlm
        shortcuts = {"path": self.vlm_path, "family": self.vlm_family, "server": self.vlm_server,
                     "model": self.vlm_model}
        if any(v is not None for v in shortcuts.values()):
            base = vlm.model_dump() if vlm else {}
            base.update({k: v for k, v in shortcuts.items() if v is not None})
            vlm = VLMSettings(**base)
            self.models = ModelsSettings(vlm=vlm)
        if vlm is not None and not vlm.family:
            raise ValueError(
                "models.vlm.family: a model needs its family "
                "(models.vlm.family, or MEDNODE_VLM_FAMILY)"
            )
        if vlm is not None and vlm.path is None and vlm.server is None:
            raise ValueError(
                "models.vlm: a model needs a path (models.vlm.path or MEDNODE_VLM_PATH), "
                "or a server (models.vlm.server and models.vlm.model)"
            )
        return self

    @field_validator("web_public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"web_public_url: {value!r} is not an http(s) URL of the node's web server "
                             "(e.g. https://mednode.example.org or http://10.0.0.5:8080)")
        return value.rstrip("/")

    @field_validator("web_trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: list[str]) -> list[str]:
        import ipaddress

        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"web_trusted_proxies: {entry!r} is not an IP address or network "
                                 "(e.g. 127.0.0.1 or 10.0.0.0/24)") from None
        return value

    @model_validator(mode="after")
    def _check_web_secret(self) -> Settings:
        if self.web_login_max_lockout_s < self.web_login_lockout_s:
            raise ValueError("web_login_max_lockout_s: must be at least web_login_lockout_s")
        loopback = self.web_host in ("127.0.0.1", "localhost", "::1")
        secret = self.web_secret_key.get_secret_value() if self.web_secret_key else ""
        if not loopback and len(secret) < 32:
            raise ValueError(
                f"web_secret_key: the dashboard listens on {self.web_host}, beyond loopback; set a "
                "random secret of 32+ characters (MEDNODE_WEB_SECRET_KEY) — no default is used there"
            )
        if self.web_admin_user and not self.web_admin_password:
            raise ValueError("web_admin_password: web_admin_user is set, so set a password too")
        return self

    @model_validator(mode="after")
    def _check_rules(self) -> Settings:
        names = [r.name for r in self.effective_rules]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"rules: duplicate rule names {sorted(duplicates)}")
        for rule in self.rules if self.rules is not None else []:
            for ref in rule.destinations:
                self.resolve_destination(ref, rule=rule.name)
            if rule.priors is not None:
                try:
                    self.resolve_destination(rule.priors.source, rule=rule.name)
                except ValueError:
                    raise ValueError(f"rules.{rule.name}.priors.source: {rule.priors.source!r} is neither a "
                                     "name in destinations nor AET@host:port (the PACS to query)") from None
            try:
                plan = plan_tasks(rule.tasks)
            except ValueError as exc:
                raise ValueError(f"rules.{rule.name}.tasks: {exc}") from None
            missing = [b for b in plan.bundles if b not in self.models.bundles]
            if missing:
                raise ValueError(
                    f"rules.{rule.name}.tasks: bundle(s) {missing} are not in models.bundles "
                    f"(configured: {sorted(self.models.bundles) or 'none'})"
                )
        return self

    # -- derived values -------------------------------------------------------------------------
    @property
    def database(self) -> str:
        """The SQLAlchemy URL of the index (SQLite under ``data_dir`` by default)."""
        return self.database_url or f"sqlite:///{self.data_dir.resolve() / 'mednode.db'}"

    @property
    def broker(self) -> str:
        """The Celery broker URL (an embedded SQLite broker under ``data_dir`` by default)."""
        return self.broker_url or f"sqla+sqlite:///{self.data_dir.resolve() / 'broker.db'}"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def effective_rules(self) -> list[Rule]:
        """The active rules: the configured ones (or the built-in defaults) whose model is there.

        The defaults send every CT study to the built-in CT analyzer and, when a vision-language
        model is configured, chest radiographs (CR/DX) to it for reports, answers, labels and boxes.
        """
        rules = self.rules if self.rules is not None else default_rules(bool(self.destination))
        return [r for r in rules if r.requires_model is None or self.has_model(r.requires_model)]

    def has_model(self, name: str) -> bool:
        return name == "vlm" and self.models.vlm is not None

    def resolve_destination(self, ref: str, *, rule: str = "?") -> AnyDestination:
        """Turn a rule's destination reference into a :class:`Destination` or
        :class:`DicomWebDestination`.

        Raises
        ------
        ValueError
            If ``ref`` names no configured destination and is not ``AET@host:port``.
        """
        if ref == "default":
            if self.destination is None:
                raise ValueError(
                    f"rules.{rule}.destinations: 'default' is used but no destination is set "
                    f"(set destination: AET@host:port or {ENV_PREFIX}DESTINATION)"
                )
            return self.destination
        if ref in self.destinations:
            return self.destinations[ref]
        try:
            parsed = parse_destination(ref)
        except ValueError:
            raise ValueError(
                f"rules.{rule}.destinations: {ref!r} is neither a name in destinations "
                "nor AET@host:port nor a DICOMweb URL"
            ) from None
        return self.find_destination(str(parsed)) or parsed

    def find_destination(self, text: str) -> AnyDestination | None:
        """The configured destination (with its options) whose ``AET@host:port`` is ``text``.

        Jobs and deliveries store destinations as ``AET@host:port`` (a DICOMweb archive: its
        URL); the calling AE title, timeouts and TLS (a DICOMweb archive's credentials) of a named
        destination are looked up here at send time, so a change of options applies to deliveries
        already queued. None when no configured destination has
        that address (an inline ``AET@host:port`` of a rule, or one given on the command line).
        """
        candidates = [self.destination, *self.destinations.values()]
        return next((d for d in candidates if d is not None and str(d) == str(text).strip()), None)


    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = getattr(settings_cls, "yaml_path", None)
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


@dataclass(frozen=True)
class TaskPlan:
    """A rule's tasks sorted by who runs them."""

    ct_analysis: bool  #: the built-in CT analyzer
    bundles: tuple[str, ...]  #: MONAI bundles by name (``segment: {bundle: NAME}``)
    model_tasks: tuple[TaskSpec, ...]  #: vision-language model tasks

    @property
    def volume_modalities(self) -> tuple[str, ...] | None:
        """The modalities of the series its first volume task loads (the CT analyzer's, else a
        bundle's), or None when it loads none."""
        if self.ct_analysis:
            return CT_ANALYSIS_MODALITIES
        return BUNDLE_MODALITIES if self.bundles else None


#: the series a volume task loads: the largest of these modalities in the job's series
CT_ANALYSIS_MODALITIES = ("CT",)
BUNDLE_MODALITIES = ("CT", "MR")


def plan_tasks(tasks: list[Any]) -> TaskPlan:
    """Sort a rule's tasks: ``ct_analysis``, ``segment: {bundle: NAME}``, and model tasks.

    Raises
    ------
    ValueError
        If a task is malformed (the message names it).
    """
    ct_analysis = False
    bundles: list[str] = []
    model_tasks: list[Any] = []
    for item in tasks:
        name = item if isinstance(item, str) else next(iter(item), None) if isinstance(item, dict) else None
        if name == "ct_analysis":
            ct_analysis = True
        elif name == "segment" and isinstance(item, dict) and isinstance(item["segment"], dict) \
                and "bundle" in item["segment"]:
            options = item["segment"]
            if set(options) != {"bundle"} or not str(options["bundle"]).strip():
                raise ValueError(f"segment task {item!r}: give only the bundle name, e.g. {{bundle: spleen}}")
            bundles.append(str(options["bundle"]))
        else:
            model_tasks.append(item)
    return TaskPlan(ct_analysis, tuple(bundles), tuple(parse_tasks(model_tasks)) if model_tasks else ())


CHEST_XRAY_TASKS: list[str | dict[str, Any]] = [
    {"report": {"language": "en"}},
    {"report": {"language": "zh"}},
    {"vqa": {"questions": ["Is there a pleural effusion?", "Is the heart enlarged?"]}},
    {"classify": {"labels": ["cardiomegaly", "pneumothorax", "pleural effusion", "consolidation"]}},
    {"ground": {"phrases": ["right lung", "left lung", "heart"]}},
]


def default_rules(with_destination: bool) -> list[Rule]:
    """Rules used when the configuration has none."""
    destinations = ["default"] if with_destination else []
    return [
        Rule(name="ct-analysis", match=RuleMatch(modality=["CT"]), tasks=["ct_analysis"],
             destinations=destinations),
        Rule(name="chest-xray", match=RuleMatch(modality=["CR", "DX"]), tasks=CHEST_XRAY_TASKS,
             destinations=destinations, requires_model="vlm"),
    ]


def _without_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """``destinations.pacs.dimse.port`` → ``destinations.pacs.port``: the tag that
    :data:`AnyDestination` puts in an error's location is no key of the configuration."""
    at = 2 if loc[:1] == ("destinations",) else 1 if loc[:1] == ("destination",) else None
    if at is not None and len(loc) > at + 1 and loc[at] in ("dimse", "dicomweb"):
        return loc[:at] + loc[at + 1:]
    return loc


def _describe(error: dict[str, Any]) -> str:
    error = {**error, "loc": _without_union_tags(tuple(error.get("loc", ())))}
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "__root__")
    # the variable that sets this key: MEDNODE_DELIVERY__GIVE_UP_AFTER_S for a key of a nested
    # section, MEDNODE_DESTINATION for a value parsed from one string, MEDNODE_RULES for a list
    names: list[str] = []
    model: Any = Settings
    for part in error.get("loc", ()):
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            break
        names.append(part.upper())
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    env = f" (env {ENV_PREFIX}{'__'.join(names)})" if names else ""
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" [got {value!r}]"
    return f"{loc or 'config'}{env}: {error['msg']}{shown}"


def load_settings(config_path: Path | str | None = None, **overrides: Any) -> Settings:
    """Read the settings from ``config_path`` (YAML), the environment and ``overrides``.

    Raises
    ------
    ConfigError
        If the file is missing or unreadable, or a value is invalid; the message names each key.
    """
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        settings_cls: type[Settings] = type("FileSettings", (Settings,), {"yaml_path": path})
    else:
        settings_cls = Settings
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors(include_url=False)]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
    except (ValueError, yaml.YAMLError) as exc:  # YAML syntax errors
        raise ConfigError(f"invalid configuration file {config_path}: {exc}") from None
