"""A private RabbitMQ server for tests: its own node name, data, config, ports and log, beside the
machine's RabbitMQ (127.0.0.1:5672), stopped by PID.

The machine's server runs as ``rabbitmq-server -detached`` with ``/etc/rabbitmq/rabbitmq-env.conf``
(``NODENAME=rabbit@localhost``, epmd on 127.0.0.1:4369). This one reads none of /etc/rabbitmq
(``RABBITMQ_CONF_ENV_FILE`` points at an empty file, ``RABBITMQ_CONFIG_FILE`` at its own), has a
node name of its own so it registers beside the machine's node in the same epmd, and listens on
its own AMQP and distribution ports. Inside a network namespace (``host``) epmd is per namespace:
the server starts its own there, and it dies with the namespace's processes.

Server settings that tests need and the machine's server does not have, such as a short
``consumer_timeout`` and the channel tick that checks it (``channel_tick_interval``, 60 s by
default in RabbitMQ 3.10), are passed as ``conf`` lines and ``advanced`` Erlang terms.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Self

from tests.peers.ports import LOOPBACK, free_port, port_accepts
from tests.peers.processes import PeerError, ToolMissingError

if TYPE_CHECKING:
    from tests.peers.netns import Host

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


class PrivateRabbitMQ:
    """One RabbitMQ node with its own directory, started by the test.

    Parameters
    ----------
    workdir
        Config, Mnesia data and logs go here.
    conf
        Extra ``rabbitmq.conf`` lines (``key = value``).
    advanced
        Erlang terms for the ``rabbit`` application in ``advanced.config``, e.g.
        ``{"channel_tick_interval": "1000"}``.
    host
        A network namespace host to run in (listening on every address there, port 5672);
        the root namespace on loopback and free ports when None.
    """

    def __init__(self, workdir: Path, conf: Mapping[str, str] | None = None,
                 advanced: Mapping[str, str] | None = None, host: Host | None = None) -> None:
        server = RABBITMQ_BIN / "rabbitmq-server"
        if not server.exists():
            raise ToolMissingError(f"RabbitMQ is not installed ({server} is missing); apt-get install rabbitmq-server")
        self.workdir = Path(workdir)
        self.host = host
        self.address = host.address if host is not None else LOOPBACK
        self.port = 5672 if host is not None else free_port()
        self.dist_port = 25672 if host is not None else free_port()
        self.nodename = f"mntest{uuid.uuid4().hex[:8]}@localhost"
        listener = str(self.port) if host is not None else f"{LOOPBACK}:{self.port}"
        self.conf = {"listeners.tcp.default": listener, "loopback_users": "none", **(conf or {})}
        self.advanced = dict(advanced or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "rabbitmq.out"

    @property
    def url(self) -> str:
        """The AMQP URL of the default vhost as guest."""
        return f"amqp://guest:guest@{self.address}:{self.port}//"

    def _env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin",
            "HOME": str(self.workdir),  # its own .erlang.cookie
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_CONF_ENV_FILE": str(self.workdir / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.workdir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.workdir / "advanced.config"),
            "RABBITMQ_MNESIA_BASE": str(self.workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.workdir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.workdir / "rabbitmq.pid"),
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
        }

    def start(self, timeout_s: float = 90.0) -> Self:
        """Write the configuration, start the node and wait until it accepts AMQP connections."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq.conf").write_text("".join(f"{k} = {v}\n" for k, v in self.conf.items()))
        terms = ", ".join(f"{{{k}, {v}}}" for k, v in self.advanced.items())
        (self.workdir / "advanced.config").write_text(f"[{{rabbit, [{terms}]}}].\n")
        argv = [str(RABBITMQ_BIN / "rabbitmq-server")]
        if self.host is not None:
            self.process = self.host.start(argv, self.log_path, env=self._env(), cwd=self.workdir)
            self.host.wait_port(self.port, timeout_s=timeout_s, process=self.process, log=self.log_path)
            return self
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=self._env(), cwd=self.workdir, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not port_accepts(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise PeerError(f"private RabbitMQ did not open {LOOPBACK}:{self.port}:\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def log_tail(self, n_chars: int = 4000) -> str:
        """The end of the node's own log (and of its console output)."""
        texts = [self.log_path.read_text(errors="replace")] if self.log_path.exists() else []
        texts += [p.read_text(errors="replace") for p in sorted((self.workdir / "log").glob("*.log"))]
        return "\n".join(texts)[-n_chars:]

    def stop(self) -> None:
        """Kill the node's process group (the server and its port helpers) by the PID started here.
        In a namespace the host's :meth:`~tests.peers.netns.Host.kill` does it."""
        if self.process is None or self.host is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
