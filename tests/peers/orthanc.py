"""Orthanc as a real test PACS: temp config, free ports, REST helpers, stop by PID."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Self, TypeVar

from tests.peers.ports import LOOPBACK, free_port
from tests.peers.processes import ManagedProcess, PeerError, find_tool

T = TypeVar("T")

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

#: Tags copied into each dict returned by :meth:`Orthanc.study_instances`.
INSTANCE_KEYS = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "InstanceNumber",
    "SeriesNumber",
)


class OrthancError(PeerError):
    """Orthanc answered a REST call with an error status."""


class Orthanc:
    """One Orthanc server on free loopback ports with its own storage in ``workdir``.

    Parameters
    ----------
    workdir
        Directory for ``orthanc.json``, the database and the log; created if missing.
    modalities
        Orthanc ``DicomModalities``, e.g.
        ``{"mednode": {"AET": "MEDNODE", "Host": "127.0.0.1", "Port": 11112}}``.
    aet
        Orthanc's own AE title (the *called* AE for senders).
    dicom_port, http_port
        Fixed ports; free ones are picked when None.
    extra_config
        Keys merged over the generated configuration.
    users
        ``{user: password}``: HTTP Basic authentication on (REST and DICOMweb); the REST
        helpers here log in as the first user.

    Notes
    -----
    Orthanc binds 0.0.0.0 (it has no bind-address setting); ``RemoteAccessAllowed`` is false so
    REST answers only loopback. SIGTERM takes 3-4 s to end it, and :meth:`stop` waits for the PID.
    """

    def __init__(
        self,
        workdir: Path,
        modalities: Mapping[str, Mapping[str, Any]] | None = None,
        aet: str = "ORTHANC",
        dicom_port: int | None = None,
        http_port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.users = dict(users or {})
        self.aet = aet
        self.host = LOOPBACK
        self.dicom_port = dicom_port or free_port()
        self.http_port = http_port or free_port()
        self.base_url = f"http://{LOOPBACK}:{self.http_port}"
        #: the DICOMweb plugin's service root (QIDO-RS, WADO-RS, STOW-RS under it)
        self.dicomweb_url = f"{self.base_url}/dicom-web"
        self.config: dict[str, Any] = {
            "Name": f"TEST-{aet}",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "DicomModalities": {k: dict(v) for k, v in (modalities or {}).items()},
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "StableAge": 1,
            "SaveJobs": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        if extra_config:
            self.config.update(extra_config)
        self.config_path = self.workdir / "orthanc.json"
        self.process: ManagedProcess | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> Self:
        """Write the config, start Orthanc and wait until DICOM and REST ``/system`` answer."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.process = ManagedProcess(
            [find_tool("Orthanc"), str(self.config_path)], log_dir=self.workdir, name="orthanc"
        )
        self.process.start(port=self.dicom_port, timeout_s=timeout_s)
        self.process.wait_for_port(self.http_port, timeout_s=timeout_s)
        self.wait_for(self._system_answers, timeout_s=timeout_s, what="REST /system")
        return self

    def stop(self) -> int | None:
        """Stop Orthanc by PID (SIGTERM, then SIGKILL) and return its exit status."""
        return None if self.process is None else self.process.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _system_answers(self) -> bool:
        try:
            return "Version" in self.get("/system")
        except (OSError, OrthancError):
            return False

    def log_tail(self, n_chars: int = 4000) -> str:
        """Return the end of Orthanc's log."""
        return "" if self.process is None else self.process.log_tail(n_chars)

    # -- REST ------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout_s: float = 60.0,
    ) -> bytes:
        """Send one REST request and return the raw body.

        Raises
        ------
        OrthancError
            On an HTTP error status; the message carries Orthanc's answer.
        """
        req = urllib.request.Request(self.base_url + path, data=body, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {exc.code}: {detail}") from exc

    def get(self, path: str) -> Any:
        """GET ``path`` and decode the JSON answer."""
        return json.loads(self.request("GET", path))

    def post(self, path: str, payload: Any) -> Any:
        """POST ``payload`` as JSON to ``path`` and decode the JSON answer."""
        answer = self.request("POST", path, json.dumps(payload).encode())
        return json.loads(answer) if answer.strip() else None

    def put(self, path: str, payload: Any) -> Any:
        """PUT ``payload`` as JSON to ``path`` and decode the JSON answer, if any."""
        answer = self.request("PUT", path, json.dumps(payload).encode())
        return json.loads(answer) if answer.strip() else None

    # -- DICOM content ---------------------------------------------------------------------
    def upload(self, path: Path) -> dict[str, Any]:
        """Store one DICOM file through REST (``POST /instances``) and return Orthanc's answer."""
        answer = self.request("POST", "/instances", Path(path).read_bytes(), "application/dicom")
        result: dict[str, Any] = json.loads(answer)
        return result

    def studies(self) -> list[dict[str, Any]]:
        """Return every study, expanded (``ID``, ``MainDicomTags``, ``Series``, ...)."""
        result: list[dict[str, Any]] = self.get("/studies?expand")
        return result

    def study_id(self, study_uid: str) -> str | None:
        """Return Orthanc's identifier of the study with this StudyInstanceUID, or None."""
        found = self.post(
            "/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
        )
        return str(found[0]) if found else None

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        """Return one dict per instance of the study; empty if Orthanc has no such study.

        Each dict has ``ID`` (Orthanc's instance id), the keys of :data:`INSTANCE_KEYS`
        present in the instance, ``TransferSyntaxUID`` as stored, and ``Tags`` (all simplified
        tags).
        """
        orthanc_id = self.study_id(study_uid)
        if orthanc_id is None:
            return []
        out: list[dict[str, Any]] = []
        for instance in self.get(f"/studies/{orthanc_id}/instances"):
            tags = self.get(f"/instances/{instance['ID']}/simplified-tags")
            row: dict[str, Any] = {"ID": instance["ID"], "Tags": tags}
            row.update({key: tags[key] for key in INSTANCE_KEYS if key in tags})
            row["TransferSyntaxUID"] = self.request(
                "GET", f"/instances/{instance['ID']}/metadata/TransferSyntax"
            ).decode()
            out.append(row)
        return out

    def find_instances(
        self, study_uid: str, sop_class_uid: str | None = None
    ) -> list[dict[str, Any]]:
        """Return :meth:`study_instances` rows, only those of ``sop_class_uid`` when given."""
        rows = self.study_instances(study_uid)
        if sop_class_uid is None:
            return rows
        return [row for row in rows if row.get("SOPClassUID") == sop_class_uid]

    def instance_file(self, orthanc_id: str) -> bytes:
        """Return the stored DICOM file of one instance, byte for byte."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    # -- DICOM network ---------------------------------------------------------------------
    def add_modality(self, name: str, aet: str, port: int, host: str = LOOPBACK) -> None:
        """Register (or replace) a DICOM modality at run time (``PUT /modalities/<name>``)."""
        self.put(f"/modalities/{name}", {"AET": aet, "Host": host, "Port": port})

    def echo(self, modality: str) -> None:
        """C-ECHO the modality; raise :class:`OrthancError` if it does not answer."""
        self.post(f"/modalities/{modality}/echo", {})

    def store_to_modality(
        self, modality: str, resource_id: str | list[str], synchronous: bool = True
    ) -> dict[str, Any]:
        """C-STORE a study, series or instance (Orthanc ids) to a configured modality."""
        resources = [resource_id] if isinstance(resource_id, str) else list(resource_id)
        answer: dict[str, Any] = self.post(
            f"/modalities/{modality}/store",
            {"Resources": resources, "Synchronous": synchronous},
        )
        return answer

    # -- polling ---------------------------------------------------------------------------
    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout_s: float = 30.0,
        interval_s: float = 0.1,
        what: str = "condition",
    ) -> T:
        """Call ``predicate`` until it returns a truthy value and return that value.

        Raises
        ------
        TimeoutError
            If it stays falsy for ``timeout_s``; the message carries Orthanc's log tail.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            value = predicate()
            if value:
                return value
            if self.process is not None and not self.process.is_running:
                raise PeerError(
                    f"Orthanc exited ({self.process.returncode}) while waiting for {what}:\n"
                    f"{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Orthanc: {what} not reached within {timeout_s:.1f} s; log tail:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(interval_s)
