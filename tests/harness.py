"""End-to-end harness: pmk serving in a namespace, a scripted decider, real traffic.

Everything here is asyncio, because the decider lives in the test's event
loop: a blocking call would stop it from answering. The usual shape::

    @netns
    @pytest.mark.parametrize("backend", BACKENDS)
    async def test_x(backend):
        async with Testbed(backend, ["tcp:7101", "udp:7102"]) as bed:
            decider = await bed.decider(lambda info: Decision("accept", permanent=True))
            result = await bed.client.tcp_connect(bed.hosts.server_ip, 7101)
            ...

``Testbed`` makes two namespaces (``tests/netns.py``), starts the echo
listeners (``bed.peer``) in the server namespace, pmk in the server
namespace scoped to the given ports, and a traffic session (``bed.client``)
in the client namespace. On exit it checks the stats identity, stops pmk
with SIGTERM (exit status 0 is asserted), checks that nfqueue left no rules,
and deletes everything. On failure pmk's log is printed, so pytest shows it.

The pieces are usable alone: ``PmkProcess`` (one ``pmk serve``),
``ScriptedDecider`` (a decider built on ``pmk.client.Client``), ``Peer``
and ``Session`` (``tests/traffic.py`` run in a namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from pmk.client import Client, Decision, RemoteError
from tests.netns import TwoHosts, need_root_reason, two_hosts

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TRAFFIC = str(Path(__file__).resolve().parent / "traffic.py")
BACKENDS = ("divert", "nfqueue")
#: How long to wait for something that must happen. Generous on purpose: the
#: machine may be loaded; nothing asserts that anything is fast.
WAIT = 30.0
#: How long a socket waits for something that must NOT happen (a dropped
#: packet): long enough for any answer that would come, short for the suite.
QUIET = 2.5

netns = pytest.mark.netns
#: Namespace tests skip without root, but never when CI is set.
needs_root = pytest.mark.skipif(
    need_root_reason() is not None and not os.environ.get("CI"),
    reason=f"{need_root_reason()}; end-to-end tests run pmk in network namespaces",
)


def backend_skip_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here (None when it can); never a reason under CI."""
    if os.environ.get("CI"):
        return None
    if backend == "nfqueue":
        from pmk.capture.select import nfqueue_unavailable_reason

        return nfqueue_unavailable_reason()
    return None


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` if it never does."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout}s")
        await asyncio.sleep(0.02)


def check_identity(stats: dict[str, Any]) -> None:
    """Every captured packet is accepted, blocked, dropped, rerouted, evicted or still pending."""
    outcomes = ("accepted", "blocked", "dropped", "rerouted", "evicted", "pending")
    settled = sum(stats[name] for name in outcomes)
    assert stats["captured"] == settled, f"stats identity broken: {stats}"


def scope_args(backend: str, ports: Sequence[str]) -> list[str]:
    """pmk serve flags that capture only ``ports`` (``["tcp:7101", "udp:7102"]``)."""
    if backend == "nfqueue":
        return ["--capture", "nfqueue", "--scope", ",".join(ports)]
    clauses = []
    for spec in ports:
        proto, port = spec.split(":")
        clauses += [f"{proto}.DstPort == {port}", f"{proto}.SrcPort == {port}"]
    return ["--capture", backend, "--filter", " or ".join(clauses)]


def pmk_rules(hosts: TwoHosts) -> list[str]:
    """Every pmk chain or jump in the server namespace (empty when clean)."""
    lines = []
    for tool in ("iptables", "ip6tables"):
        out = hosts.sh(hosts.server, tool, "-w", "-S").stdout
        lines += [f"{tool} {line}" for line in out.splitlines() if "PMK" in line]
    return lines


# ----------------------------------------------------------------------------
# pmk serve


class PmkProcess:
    """One ``python -m pmk serve`` inside the server namespace, on a private socket."""

    def __init__(self, hosts: TwoHosts, backend: str, ports: Sequence[str], args: Sequence[str] = ()) -> None:
        self.hosts = hosts
        self.backend = backend
        self.dir = tempfile.mkdtemp(prefix="pmk-e2e-")
        os.chmod(self.dir, 0o700)
        self.path = os.path.join(self.dir, "pmk.sock")
        self.log_path = os.path.join(self.dir, "pmk.log")
        self.argv = [
            *hosts.exec_argv(hosts.server, PYTHON, "-m", "pmk", "serve"),
            "--pipe",
            self.path,
            "--log-level",
            "debug",
            *scope_args(backend, ports),
            *args,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    async def start(self) -> PmkProcess:
        """Start and wait until pmk captures and its socket accepts."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
            )
        # "serving on" is printed after the backend is capturing, so no test
        # packet can slip past a half-started pmk.
        await eventually(self._ready, f"pmk to serve ({' '.join(self.argv)})")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"pmk exited with {self.proc.returncode} while starting:\n{self.log()}")
        if "serving on" not in self.log():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.path)
            except OSError:
                return False
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    async def connect(self, name: str = "e2e-observer") -> Client:
        """An observer connection (for get_stats, get_payload, update_verdict...)."""
        client = await Client.connect(self.path)
        await client.hello(name, "observer")
        return client

    async def call(self, method: str, *params: Any) -> Any:
        """One call over a fresh connection."""
        client = await Client.connect(self.path)
        try:
            return await client.call(method, *params)
        finally:
            client.close()

    async def stats(self) -> dict[str, Any]:
        return await self.call("get_stats")

    async def check_identity(self) -> dict[str, Any]:
        """Fetch the stats, assert the identity, return them."""
        stats = await self.stats()
        check_identity(stats)
        return stats

    async def wait_stats(self, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Poll get_stats until ``predicate(stats)``; return those stats."""
        deadline = time.monotonic() + WAIT
        while True:
            stats = await self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting for {what}; last stats: {stats}")
            await asyncio.sleep(0.05)

    async def stop(self) -> int:
        """SIGTERM, wait, return the exit status (also kept in ``returncode``)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.returncode = await asyncio.to_thread(self.proc.wait, WAIT)
        return self.returncode

    async def kill(self) -> None:
        """SIGKILL (a crash) and reap, so its pid is really gone."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.returncode = await asyncio.to_thread(self.proc.wait, WAIT)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(WAIT)
        shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------
# the decider


class _Mode:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: A policy result: keep the request open until ``ScriptedDecider.release``.
HOLD = _Mode("HOLD")
#: A policy result: never answer (pmk's verdict timeout applies).
NEVER = _Mode("NEVER")

Policy = Callable[[dict[str, Any]], "Decision | _Mode"]


def accept_permanently(info: dict[str, Any]) -> Decision:
    return Decision("accept", permanent=True)


class ScriptedDecider:
    """A decider in the test's loop whose answers the test programs.

    ``policy(info)`` returns a ``Decision`` (answered at once), ``HOLD``
    (answered when released) or ``NEVER``. Every ``decide`` info and every
    ``withdrawn`` id is recorded, in arrival order. ``policy`` may be
    replaced at any time.
    """

    def __init__(self, policy: Policy = accept_permanently) -> None:
        self.policy = policy
        self.infos: list[dict[str, Any]] = []
        self.withdrawn: list[int] = []
        #: messages of the protocol_error notifications received
        self.protocol_errors: list[str] = []
        self.held: dict[int, asyncio.Future[Decision]] = {}
        self.client: Client | None = None

    @classmethod
    async def connect(
        cls, path: str, policy: Policy = accept_permanently, name: str = "e2e-decider"
    ) -> ScriptedDecider:
        decider = cls(policy)
        decider.client = await Client.connect(path, decider._decide)
        decider.client.on_notification = decider._on_notification
        await decider.client.hello(name, "decider")
        return decider

    def _decide(self, info: dict[str, Any]) -> Decision | Awaitable[Decision] | None:
        self.infos.append(info)
        outcome = self.policy(info)
        if outcome is HOLD:
            future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
            self.held[info["id"]] = future
            return future
        if outcome is NEVER:
            return None
        assert isinstance(outcome, Decision), f"policy returned {outcome!r}"
        return outcome

    def _on_notification(self, notification: Any) -> None:
        if notification.method == "withdrawn":
            self.withdrawn.append(notification.params[0])
        elif notification.method == "protocol_error":
            self.protocol_errors.append(notification.params[0]["message"])

    def release(self, decision: Decision, ids: Sequence[int] | None = None) -> list[int]:
        """Answer held requests (all, or ``ids``) with ``decision``; return the ids answered."""
        answered = []
        for packet_id in list(self.held if ids is None else ids):
            future = self.held.pop(packet_id)
            if not future.done():
                future.set_result(decision)
                answered.append(packet_id)
        return answered

    def ids(self) -> list[int]:
        return [info["id"] for info in self.infos]

    def infos_for(self, **fields: Any) -> list[dict[str, Any]]:
        """The recorded infos whose fields equal ``fields`` (e.g. ``remote_port=...``)."""
        return [info for info in self.infos if all(info.get(k) == v for k, v in fields.items())]

    async def wait_decides(self, count: int, **fields: Any) -> list[dict[str, Any]]:
        """Wait until at least ``count`` infos matching ``fields`` arrived; return them."""
        await eventually(lambda: len(self.infos_for(**fields)) >= count, f"{count} decide request(s) {fields}")
        return self.infos_for(**fields)

    async def close(self) -> None:
        """Disconnect (held requests stay unanswered, as with a crashed decider)."""
        for future in self.held.values():
            future.cancel()
        self.held.clear()
        if self.client is not None:
            self.client.close()
            await self.client.wait_closed()


# ----------------------------------------------------------------------------
# traffic


async def _spawn(argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=1 << 20,
    )


async def _read_json(proc: asyncio.subprocess.Process, what: str) -> dict[str, Any]:
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT * 4)
    except TimeoutError:
        raise AssertionError(f"{what}: no answer") from None
    if not line:
        err = (await proc.stderr.read()).decode(errors="replace")
        raise AssertionError(f"{what} ended: {err}")
    return json.loads(line)


async def _end(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


class Peer:
    """Echo listeners in a namespace; ``events`` says what arrived there."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self._task = asyncio.ensure_future(self._collect())

    @classmethod
    async def start(cls, hosts: TwoHosts, ns: str, specs: Sequence[str]) -> Peer:
        proc = await _spawn(hosts.exec_argv(ns, PYTHON, TRAFFIC, "peer", *specs))
        ready = await _read_json(proc, "peer")
        assert ready == {"ready": True}, ready
        return cls(proc)

    async def _collect(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.events.append(json.loads(line))

    def udp(self, port: int) -> list[str]:
        """Datagrams that arrived on ``port``, in order."""
        return [e["data"] for e in self.events if e["ev"] == "udp" and e["port"] == port]

    def accepts(self, port: int) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == "tcp_accept" and e["port"] == port]

    async def settle(self, done: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        """Wait until ``done()`` holds: the peer reports what arrived a moment after it answered."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not done():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"the peer never reported {what}: {self.events}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await _end(self.proc)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class Session:
    """Sockets in a namespace, driven one command at a time (``tests/traffic.py session``).

    Every method returns the script's JSON answer: ``{"ok": True, ...}`` or
    ``{"data": ...}`` on success, ``{"error": "ECONNREFUSED" | "timeout" | ...}``
    on failure. Commands are serialised; run two at once with two sessions.
    """

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        self.proc = proc
        self.name = name
        self._lock = asyncio.Lock()

    @classmethod
    async def start(cls, hosts: TwoHosts, ns: str) -> Session:
        proc = await _spawn(hosts.exec_argv(ns, PYTHON, TRAFFIC, "session"))
        ready = await _read_json(proc, f"session in {ns}")
        assert ready == {"ready": True}, ready
        return cls(proc, ns)

    async def command(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        async with self._lock:
            self.proc.stdin.write((json.dumps({"op": op, **args}) + "\n").encode())
            await self.proc.stdin.drain()
            return await _read_json(self.proc, f"session {op} in {self.name}")

    async def tcp_connect(
        self, host: str, port: int, id: str = "tcp", timeout: float = WAIT, bind_port: int = 0
    ) -> dict[str, Any]:
        """Connect (from ``bind_port`` if given)."""
        return await self.command("tcp_connect", id=id, host=host, port=port, timeout=timeout, bind_port=bind_port)

    async def udp_query(self, host: str, port: int, data: str, timeout: float = WAIT) -> dict[str, Any]:
        """Send one datagram from a fresh unconnected socket; the answer and its source (``from``)."""
        return await self.command("udp_query", host=host, port=port, data=data, timeout=timeout)

    async def udp_open(self, host: str, port: int, id: str = "udp") -> dict[str, Any]:
        return await self.command("udp_open", id=id, host=host, port=port)

    async def send(self, data: str, id: str) -> dict[str, Any]:
        return await self.command("send", id=id, data=data)

    async def recv(self, id: str, size: int = 65535, timeout: float = WAIT) -> dict[str, Any]:
        return await self.command("recv", id=id, size=size, timeout=timeout)

    async def ping(self, data: str, id: str, timeout: float = WAIT) -> dict[str, Any]:
        """Send ``data`` and read the echo back (TCP: ``len(data)`` bytes; UDP: one datagram)."""
        return await self.command("ping", id=id, data=data, timeout=timeout)

    async def udp_burst(self, host: str, port: int, count: int, data: str = "x") -> dict[str, Any]:
        """``count`` datagrams, each from a new socket (a new source port, so a new connection)."""
        return await self.command("udp_burst", host=host, port=port, count=count, data=data)

    async def close_socket(self, id: str, reset: bool = False) -> dict[str, Any]:
        """Close; with ``reset`` by a TCP RST (SO_LINGER 0) instead of a FIN."""
        return await self.command("close", id=id, reset=reset)

    async def transfer(
        self, host: str, port: int, size: int, seed: str = "pmk", timeout: float = WAIT
    ) -> dict[str, Any]:
        """A new TCP connection carrying ``size`` bytes each way (see ``payload_digest``)."""
        return await self.command("transfer", host=host, port=port, size=size, seed=seed, timeout=timeout)

    async def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        await _end(self.proc)


def payload_digest(size: int, seed: str = "pmk") -> str:
    """The SHA-256 a successful ``Session.transfer`` of ``size`` bytes reports."""
    import hashlib

    from tests.traffic import payload

    return hashlib.sha256(payload(seed, size)).hexdigest()


# ----------------------------------------------------------------------------
# the whole testbed


class Testbed:
    """Two hosts, echo listeners, pmk scoped to ``ports``, a client session.

    ``ports`` are ``"tcp:P"`` / ``"udp:P"`` specs: the listeners' ports and
    pmk's capture scope. ``args`` are extra ``pmk serve`` flags.
    ``start_pmk=False`` leaves pmk to the test (``await bed.start_pmk()``).
    """

    __test__ = False  # not a test class, whatever its name says

    def __init__(
        self,
        backend: str,
        ports: Sequence[str],
        args: Sequence[str] = (),
        *,
        start_pmk: bool = True,
    ) -> None:
        reason = backend_skip_reason(backend)
        if reason is not None:
            pytest.skip(f"{backend} backend unavailable: {reason}")
        self.backend = backend
        self.ports = list(ports)
        self.args = list(args)
        self._start_pmk = start_pmk
        self._stack = contextlib.ExitStack()
        self.hosts: TwoHosts
        self.pmk: PmkProcess | None = None
        self.peer: Peer
        self.client: Session
        self.deciders: list[ScriptedDecider] = []
        self.sessions: list[Session] = []
        self.peers: list[Peer] = []
        self.processes: list[PmkProcess] = []

    async def __aenter__(self) -> Testbed:
        self.hosts = self._stack.enter_context(two_hosts())
        try:
            self.peer = await Peer.start(self.hosts, self.hosts.server, self.ports)
            self.client = await self.session(self.hosts.client)
            if self._start_pmk:
                await self.start_pmk()
        except BaseException:
            await self._teardown(failed=True)
            raise
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        await self._teardown(failed=exc is not None)

    @property
    def server(self) -> PmkProcess:
        """The running pmk (the last one started)."""
        assert self.pmk is not None, "pmk was not started"
        return self.pmk

    async def start_pmk(self, args: Sequence[str] | None = None) -> PmkProcess:
        """Start (another) pmk with the testbed's ports; ``args`` replaces the extra flags."""
        process = PmkProcess(self.hosts, self.backend, self.ports, self.args if args is None else args)
        self.processes.append(process)
        self.pmk = await process.start()
        return process

    async def decider(self, policy: Policy = accept_permanently, name: str = "e2e-decider") -> ScriptedDecider:
        """Connect a scripted decider and wait until pmk counts it."""
        decider = await ScriptedDecider.connect(self.server.path, policy, name)
        self.deciders.append(decider)
        return decider

    async def session(self, ns: str) -> Session:
        """Another traffic session (e.g. in the server namespace, for outbound traffic)."""
        session = await Session.start(self.hosts, ns)
        self.sessions.append(session)
        return session

    async def listen(self, ns: str, specs: Sequence[str]) -> Peer:
        """More echo listeners (e.g. in the client namespace, for outbound traffic)."""
        peer = await Peer.start(self.hosts, ns, specs)
        self.peers.append(peer)
        return peer

    async def _teardown(self, failed: bool) -> None:
        try:
            for decider in self.deciders:
                await decider.close()
            for session in self.sessions:
                await session.close()
            if not failed:
                await self._stop_pmk_cleanly()
        finally:
            if failed:
                for process in self.processes:
                    print(f"---- log of {' '.join(process.argv)} ----\n{process.log()}")
            for process in self.processes:
                process.cleanup()
            for peer in self.peers:
                await peer.close()
            with contextlib.suppress(AttributeError):
                await self.peer.close()
            self._stack.close()

    async def _stop_pmk_cleanly(self) -> None:
        """The end-of-test checks: identity, exit status 0, no rules left."""
        pmk = self.pmk
        if pmk is None or pmk.returncode is not None:
            return
        await pmk.check_identity()
        status = await pmk.stop()
        assert status == 0, f"pmk exited with {status}:\n{pmk.log()}"
        if self.backend == "nfqueue":
            assert pmk_rules(self.hosts) == [], "pmk left netfilter rules behind"


async def run_example(bed: Testbed, script: str, *args: str) -> asyncio.subprocess.Process:
    """Start ``examples/<script>`` against the testbed's pmk (in the host namespace)."""
    return await asyncio.create_subprocess_exec(
        PYTHON,
        str(REPO / "examples" / script),
        *args,
        "--pipe",
        bed.server.path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


__all__ = [
    "BACKENDS",
    "HOLD",
    "NEVER",
    "QUIET",
    "WAIT",
    "Decision",
    "Peer",
    "PmkProcess",
    "RemoteError",
    "ScriptedDecider",
    "Session",
    "Testbed",
    "accept_permanently",
    "check_identity",
    "eventually",
    "needs_root",
    "netns",
    "payload_digest",
    "pmk_rules",
    "run_example",
    "scope_args",
]
