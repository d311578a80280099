"""The real OHIF viewer (v3, prebuilt from the npm registry) served against a test Orthanc.

``npm pack @ohif/app@<version>`` gives a tarball whose ``package/dist/`` is the whole static
viewer: no build step. :func:`ohif_dist` downloads it once into a cache directory outside the
repository and unpacks it; :class:`OhifServer` serves that ``dist/`` and proxies ``/dicom-web/…`` to
Orthanc's DICOMweb plugin from **one origin** (Orthanc 1.10 does not answer CORS), with an
``app-config.js`` generated on the fly that points OHIF's only data source at ``/dicom-web``. The
cached ``dist/`` is never modified.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

from tests.peers.ports import LOOPBACK

logger = logging.getLogger(__name__)

OHIF_VERSION = "3.13.2"
OHIF_PACKAGE = "@ohif/app"
CACHE_ENV = "MEDNODE_OHIF_CACHE"

#: Request headers forwarded to Orthanc; everything else (cookies, origin...) stays here.
_FORWARDED_HEADERS = ("Accept", "Range", "Content-Type")
_CONTENT_TYPES = {".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript",
                  ".css": "text/css", ".html": "text/html; charset=utf-8", ".json": "application/json",
                  ".svg": "image/svg+xml", ".woff2": "font/woff2", ".ico": "image/x-icon"}


class OhifUnavailableError(RuntimeError):
    """The OHIF package cannot be fetched or unpacked (no npm, no registry, broken tarball)."""


def default_cache_dir() -> Path:
    """``$MEDNODE_OHIF_CACHE`` if set, else ``~/.cache/mednode-ohif``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mednode-ohif"


def ohif_dist(cache_dir: Path | None = None, version: str = OHIF_VERSION) -> Path:
    """Return the ``dist/`` directory of OHIF ``version``, downloading it with npm on first use.

    The tarball (``ohif-app-<version>.tgz``, about 50 MB) and its unpacked ``package/`` live in
    ``cache_dir/<version>/``; a later call reuses them without touching the network. Unpacking
    goes to a temporary directory renamed into place, so an interrupted run leaves no half tree.

    Raises
    ------
    OhifUnavailableError
        If ``npm`` is not on PATH, ``npm pack`` fails, or the tarball has no ``package/dist/index.html``.
    """
    root = (cache_dir or default_cache_dir()) / version
    dist = root / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / f"ohif-app-{version}.tgz"
    if not tarball.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise OhifUnavailableError("npm not found: install Node.js/npm (apt-get install -y npm) to fetch OHIF.")
        done = subprocess.run(
            [npm, "pack", f"{OHIF_PACKAGE}@{version}", "--pack-destination", str(root), "--silent"],
            check=False, capture_output=True, text=True, timeout=600, cwd=root,
        )
        if done.returncode != 0 or not tarball.is_file():
            raise OhifUnavailableError(
                f"npm pack {OHIF_PACKAGE}@{version} failed (exit {done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-800:]}; check that the npm registry is reachable."
            )
    staging = root / f"unpack-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tarfile.open(tarball) as archive:
            archive.extractall(staging, filter="data")
    except (tarfile.TarError, OSError) as exc:
        tarball.unlink(missing_ok=True)
        raise OhifUnavailableError(f"{tarball} is not a readable tarball ({exc}); deleted it, run again.") from exc
    if not (staging / "package" / "dist" / "index.html").is_file():
        raise OhifUnavailableError(f"{tarball} has no package/dist/index.html: not a prebuilt OHIF app.")
    if not (dist / "index.html").is_file():
        shutil.rmtree(root / "package", ignore_errors=True)
        (staging / "package").rename(root / "package")
    shutil.rmtree(staging, ignore_errors=True)
    return dist


def app_config_js(dicomweb_root: str = "/dicom-web") -> str:
    """OHIF's ``app-config.js`` with one DICOMweb data source at ``dicomweb_root`` (same origin).

    ``enableStudyLazyLoad: false`` makes OHIF fetch every series' metadata at once, so SEG and SR
    series are known (and their thumbnails shown) as soon as the study opens. The study list and
    the investigational-use dialog stay on: the tests look at both.
    """
    return f"""window.config = {{
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {{}},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  investigationalUseDialog: {{ option: 'never' }},
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {{
      friendlyName: 'test Orthanc',
      name: 'orthanc',
      wadoUriRoot: '{dicomweb_root}',
      qidoRoot: '{dicomweb_root}',
      wadoRoot: '{dicomweb_root}',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: false,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      staticWado: false,
      singlepart: 'bulkdata,video',
      bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
      omitQuotationForMultipartRequest: true,
    }},
  }}],
}};
"""


def _handler_class(dist: Path, upstream: Callable[[], str], config_js: bytes) -> type[BaseHTTPRequestHandler]:
    dist = dist.resolve()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            logger.debug("ohif %s", format % args)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/dicom-web/") or path == "/dicom-web":
                self._proxy()
            elif path == "/app-config.js":
                self._send(200, config_js, "text/javascript")
            else:
                self._static(path)

        def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _static(self, path: str) -> None:
            target = (dist / urllib.request.url2pathname(path.lstrip("/"))).resolve()
            if dist not in target.parents or not target.is_file():
                # SPA routes (/viewer, /segmentation...) and unknown files: the app shell
                target = dist / "index.html"
            suffix = target.suffix.lower()
            content_type = _CONTENT_TYPES.get(suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            cache = {"Cache-Control": "no-cache"} if suffix == ".html" else {"Cache-Control": "max-age=3600"}
            self._send(200, target.read_bytes(), content_type, cache)

        def _proxy(self) -> None:
            base = upstream()
            if not base:
                self._send(503, b"OhifServer has no DICOMweb upstream yet: call point_at()", "text/plain")
                return
            request = urllib.request.Request(base + self.path, method="GET")
            for key in _FORWARDED_HEADERS:
                if key in self.headers:
                    request.add_header(key, self.headers[key])
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    body = answer.read()
                    status = answer.status
                    content_type = answer.headers.get("Content-Type", "application/octet-stream")
            except urllib.error.HTTPError as exc:
                body, status = exc.read(), exc.code
                content_type = exc.headers.get("Content-Type", "text/plain")
            except OSError as exc:
                self._send(502, f"Orthanc did not answer: {exc}".encode(), "text/plain")
                return
            self._send(status, body, content_type)

    return Handler


class OhifServer:
    """OHIF's static ``dist/`` plus a same-origin proxy of ``/dicom-web/`` to a DICOMweb server.

    Parameters
    ----------
    dist
        The ``dist/`` directory from :func:`ohif_dist`.
    dicomweb_base
        Base URL that ``/dicom-web/…`` paths are appended to, e.g. Orthanc's ``http://127.0.0.1:8042``.
        It can be changed later with :meth:`point_at` (one viewer server for several Orthancs).

    Notes
    -----
    Runs a :class:`ThreadingHTTPServer` on a free loopback port in a daemon thread of the test
    process; :meth:`stop` shuts it down.
    """

    def __init__(self, dist: Path, dicomweb_base: str = "") -> None:
        self.dist = Path(dist)
        self._upstream = dicomweb_base.rstrip("/")
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("OhifServer is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def point_at(self, dicomweb_base: str) -> None:
        """Proxy ``/dicom-web/`` to another server from now on."""
        self._upstream = dicomweb_base.rstrip("/")

    def viewer_url(self, study_uid: str) -> str:
        """URL of the basic viewer mode opened on one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def start(self) -> Self:
        handler = _handler_class(self.dist, lambda: self._upstream, app_config_js().encode())
        self._server = ThreadingHTTPServer((LOOPBACK, 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
