"""Hosts as Linux network namespaces for multi-host tests: one bridge, a veth per host, a host
name per process tree, and PostgreSQL started inside a host.

Needs root (``ip netns``, ``unshare --uts``). Every name carries a per-run token, so two runs on
one machine do not meet; :meth:`NetnsLab.close` kills every process of every namespace by PID
(``ip netns pids``), then deletes the namespaces and the bridge, also after a failed test.

The bridge lives in the root namespace with the subnet's ``.254`` address, so the test process
(and peers it starts there, such as Orthanc) reach every host, and every host reaches them.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.peers.processes import PeerError, peer_env


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and done.returncode != 0:
        raise PeerError(f"ip {' '.join(args)} failed: {done.stderr.strip()}")
    return done


def netns_available() -> str | None:
    """Return why namespaces cannot be built here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns, unshare --uts)"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed"
    return None


@dataclass
class Host:
    """One host: a network namespace with one veth on the lab's bridge and its own host name."""

    lab: NetnsLab
    name: str  #: the host name its processes see (``socket.gethostname()``)
    netns: str
    address: str
    veth: str  #: the interface inside the namespace
    outside: str  #: its peer on the bridge
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: Sequence[str], log: Path, env: Mapping[str, str] | None = None,
              user: str | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in this host (its namespace, under its host name), output to ``log``.

        ``user`` runs the program as that user (``setpriv``), for servers that refuse root.
        """
        inner = list(argv)
        if user is not None:
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *inner]
        wrapper = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c",
                   'hostname "$0" && exec "$@"', self.name, *inner]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       env=peer_env(env), cwd=cwd, start_new_session=True)
        self.processes.append(process)
        return process

    def run(self, argv: Sequence[str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a short command in this host's namespace and return its result."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              timeout=timeout_s, check=False)

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill(self, timeout_s: float = 10.0) -> int:
        """SIGKILL every process in the namespace, by PID, until none is left; return how many."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)
        for process in self.processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        if self.pids():
            raise PeerError(f"host {self.name}: processes {self.pids()} survived SIGKILL")
        return len(killed)

    def link(self, up: bool) -> None:
        """Take this host's only link down (cut off from every other host) or up again."""
        _ip("-n", self.netns, "link", "set", self.veth, "up" if up else "down")

    def wait_port(self, port: int, timeout_s: float = 60, process: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> None:
        """Wait until ``address:port`` accepts, from the root namespace."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:] if log else ""
                raise PeerError(f"{self.name}: process exited ({process.returncode}) before port {port} opened:\n{tail}")
            try:
                with socket.create_connection((self.address, port), timeout=0.3):
                    return
            except OSError:
                time.sleep(0.1)
        tail = log.read_text(errors="replace")[-3000:] if log else ""
        raise PeerError(f"{self.name}: {self.address}:{port} did not open within {timeout_s:.0f} s:\n{tail}")


class NetnsLab:
    """A bridge in the root namespace and hosts attached to it, each a network namespace.

    Parameters
    ----------
    workdir
        Logs and data of the hosts' processes (world-readable, so ``setpriv`` users reach it).
    """

    def __init__(self, workdir: Path) -> None:
        self.token = uuid.uuid4().hex[:6]
        self.workdir = Path(workdir)
        self.bridge = f"mnbr{self.token}"
        self.subnet = self._free_subnet()
        self.gateway = f"{self.subnet}.254"  #: the root namespace's address on the bridge
        self.hosts: dict[str, Host] = {}
        self._made_bridge = False

    @staticmethod
    def _free_subnet() -> str:
        routes = _ip("-4", "route", "show").stdout + _ip("-4", "addr", "show").stdout
        for _ in range(50):
            subnet = f"10.{random.randint(160, 250)}.{random.randint(0, 255)}"
            if f"{subnet}." not in routes:
                return subnet
        raise PeerError("no free 10.x.y.0/24 subnet for the lab bridge")

    def __enter__(self) -> Self:
        _ip("link", "add", self.bridge, "type", "bridge")
        self._made_bridge = True
        try:
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except PeerError:
            self.close()
            raise
        return self

    def add_host(self, name: str) -> Host:
        """A new namespace named after ``name`` and the run, on the bridge, with the next address."""
        index = len(self.hosts) + 1
        netns = f"mn{self.token}{name}"
        outside, inside = f"mn{self.token}{index}o", f"mn{self.token}{index}i"
        _ip("netns", "add", netns)
        host = Host(self, f"{name}-{self.token}", netns, f"{self.subnet}.{index}", inside, outside)
        self.hosts[name] = host
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", netns)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", netns, "addr", "add", f"{host.address}/24", "dev", inside)
        _ip("-n", netns, "link", "set", inside, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        return host

    def close(self) -> None:
        """Kill every process of every host, delete the namespaces (their veths go with them) and
        the bridge. Never raises for something already gone."""
        for host in self.hosts.values():
            try:
                host.kill()
            except PeerError:
                pass
            # deleting a veth deletes its peer; the namespace alone may outlive its name a while
            _ip("link", "del", host.outside, check=False)
            _ip("netns", "del", host.netns, check=False)
        if self._made_bridge:
            _ip("link", "del", self.bridge, check=False)

    def __exit__(self, *exc: object) -> None:
        self.close()


POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")


def start_postgres(host: Host, datadir: Path, port: int = 5432, user: str = "postgres") -> subprocess.Popen[bytes]:
    """Initialise a cluster in ``datadir`` and run PostgreSQL in ``host`` on ``port``, trust auth
    for every address (the namespaces are the only network it sees). Returns the server process.
    """
    if not (POSTGRES_BIN / "postgres").exists():
        raise PeerError(f"PostgreSQL 15 is not installed at {POSTGRES_BIN}")
    datadir.mkdir(parents=True)
    shutil.chown(datadir, user, user)
    init = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
                           str(POSTGRES_BIN / "initdb"), "-D", str(datadir), "-A", "trust", "-U", "postgres",
                           "--no-sync"], capture_output=True, text=True, timeout=120, check=False)
    if init.returncode != 0:
        raise PeerError(f"initdb failed: {init.stderr[-2000:]}")
    with open(datadir / "pg_hba.conf", "a") as hba:
        hba.write("host all all 0.0.0.0/0 trust\n")
    log = datadir.parent / "postgres.log"
    server = host.start([str(POSTGRES_BIN / "postgres"), "-D", str(datadir), "-p", str(port),
                         "-c", "listen_addresses=*", "-c", f"unix_socket_directories={datadir}",
                         "-c", "fsync=off", "-c", "max_connections=200"], log, user=user)
    host.wait_port(port, timeout_s=60, process=server, log=log)
    return server
