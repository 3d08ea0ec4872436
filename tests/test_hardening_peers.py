"""Who may connect: unprivileged local users against a live pmk (issue 5, item 1).

pmk runs as root in the server namespace (real nfqueue backend, scoped to
one UDP port); the unprivileged clients are this file run as a script
(``peer-client``) that drops to another uid/gid before it connects. Two
layers are shown separately:

* file permissions: pmk's directory is 0750 and its socket 0660, both root's,
  so an ordinary user cannot even reach the socket (EACCES);
* SO_PEERCRED: to test the second layer on its own, the test *widens* the
  directory and socket modes by hand (as a careless operator might) so that
  the user reaches the socket; pmk must still refuse it with a ``refused``
  notification (code ``not_permitted``) and close, and it never gets a
  ``decide`` although packets are being decided meanwhile. ``--allow-uid``
  admits that user; ``--allow-group`` gives the group the directory and
  socket, so its members get in without any hand-widening.

The users are ``nobody`` and a throwaway system user made with ``useradd``
and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from pmk.client import Decision
from tests.harness import WAIT, PmkProcess, Testbed, eventually, needs_root, netns

NOBODY = 65534
PORT = 7201
PORTS = [f"udp:{PORT}"]
HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------
# script mode: a client that becomes another user first


def peer_client_main(uid: int, gid: int, path: str, seconds: float) -> None:
    """Drop to uid/gid, connect, try to be a decider for ``seconds``; print what happened."""
    from pmk.client import Client, Decision
    from pmk.loop import run

    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    report: dict[str, object] = {"uid": os.getuid(), "decides": 0, "notifications": []}

    def decide(info: dict[str, object]) -> Decision:
        report["decides"] = int(report["decides"]) + 1  # type: ignore[call-overload]
        return Decision("accept")

    async def main() -> None:
        try:
            client = await Client.connect(path, decide)
        except OSError as error:
            report["connect_error"] = type(error).__name__
            return
        try:
            report["hello"] = await asyncio.wait_for(client.hello("unprivileged", "decider"), seconds)
        except Exception as error:
            report["hello_error"] = type(error).__name__
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.wait_closed(), seconds)
        report["closed_by_server"] = client.closed.done()
        report["notifications"] = [[n.method, n.params] for n in client.notifications]
        client.close()

    run(main())
    print(json.dumps(report), flush=True)


async def run_as(uid: int, gid: int, path: str, seconds: float = 3.0) -> dict[str, object]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE),
        "peer-client",
        str(uid),
        str(gid),
        path,
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Run as a script, this file still imports its helpers as tests.<module>.
        env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


# ----------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def throwaway_user() -> Iterator[tuple[int, int]]:
    """A system user with its own group; (uid, gid). Deleted on exit."""
    name = f"pmkt{uuid.uuid4().hex[:8]}"
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
        timeout=30,
    )
    try:
        import pwd

        entry = pwd.getpwnam(name)
        yield entry.pw_uid, entry.pw_gid
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)
        subprocess.run(["groupdel", name], check=False, capture_output=True, timeout=30)


async def start_pmk(bed: Testbed, args: list[str]) -> PmkProcess:
    """pmk with its socket in a directory it creates itself (under a traversable parent)."""
    process = PmkProcess(bed.hosts, bed.backend, bed.ports, args)
    os.chmod(process.dir, 0o755)  # the parent: anyone may traverse; pmk's own dir decides
    path = os.path.join(process.dir, "run", "pmk.sock")
    process.argv[process.argv.index(process.path)] = path
    process.path = path
    bed.processes.append(process)
    bed.pmk = await process.start()
    return process


def widen(path: str) -> None:
    """What a careless operator might do: open pmk's directory and socket to everyone."""
    os.chmod(os.path.dirname(path), 0o755)
    os.chmod(path, 0o666)


async def keep_pinging(bed: Testbed, stop: asyncio.Event) -> int:
    """UDP datagrams through pmk until ``stop``; returns how many came back."""
    await bed.client.udp_open(bed.hosts.server_ip, PORT, id="p")
    echoed = 0
    while not stop.is_set():
        if "data" in await bed.client.ping(f"ping {echoed}", id="p", timeout=5):
            echoed += 1
        await asyncio.sleep(0.05)
    return echoed


# ----------------------------------------------------------------------------
# tests

pytestmark = [netns, needs_root]


async def test_default_modes_keep_an_ordinary_user_away() -> None:
    async with Testbed("nfqueue", PORTS, start_pmk=False) as bed:
        pmk = await start_pmk(bed, [])
        directory = os.stat(os.path.dirname(pmk.path))
        assert (directory.st_uid, directory.st_mode & 0o777) == (0, 0o750)
        assert os.stat(pmk.path).st_mode & 0o777 == 0o660
        report = await run_as(NOBODY, NOBODY, pmk.path)
        assert report["connect_error"] == "PermissionError", report
        assert (await pmk.stats())["refused_clients"] == 0  # never got as far as pmk


async def test_refused_peer_gets_not_permitted_and_never_a_decide() -> None:
    temporary_accept = lambda info: Decision("accept")  # noqa: E731 - every datagram is asked about
    async with Testbed("nfqueue", PORTS, start_pmk=False) as bed:
        pmk = await start_pmk(bed, [])
        decider = await bed.decider(temporary_accept)
        widen(pmk.path)
        stop = asyncio.Event()
        pinger = asyncio.ensure_future(keep_pinging(bed, stop))
        try:
            await decider.wait_decides(3)
            report = await run_as(NOBODY, NOBODY, pmk.path)
            asked_before = len(decider.infos)
            await decider.wait_decides(asked_before + 3)  # deciding went on meanwhile
        finally:
            stop.set()
            echoed = await pinger
        assert report["closed_by_server"] is True, report
        assert report["notifications"] == [
            ["refused", [{"code": "not_permitted", "message": report["notifications"][0][1][0]["message"]}]]
        ], report
        assert f"uid {NOBODY}" in report["notifications"][0][1][0]["message"]
        assert report["decides"] == 0
        assert "hello" not in report
        stats = await pmk.check_identity()
        assert stats["refused_clients"] == 1
        assert stats["deciders"] == 1
        assert echoed >= 3


async def test_allow_uid_admits_that_user_as_decider() -> None:
    async with Testbed("nfqueue", PORTS, start_pmk=False) as bed:
        pmk = await start_pmk(bed, ["--allow-uid", str(NOBODY)])
        widen(pmk.path)  # --allow-uid needs a way through the file modes as well
        stop = asyncio.Event()
        client_task = asyncio.ensure_future(run_as(NOBODY, NOBODY, pmk.path, seconds=6))
        await pmk.wait_stats(lambda s: s["deciders"] == 1, "the unprivileged decider")
        pinger = asyncio.ensure_future(keep_pinging(bed, stop))
        await eventually(lambda: bed.peer.udp(PORT) != [], "a datagram decided by the unprivileged user")
        stop.set()
        await pinger
        report = await client_task
        assert report["hello"]["backend"] == "nfqueue", report
        assert report["decides"] >= 1
        assert report["notifications"] == []
        assert (await pmk.check_identity())["refused_clients"] == 0


async def test_allow_group_members_reach_the_socket_without_widening() -> None:
    with throwaway_user() as (uid, gid):
        async with Testbed("nfqueue", PORTS, start_pmk=False) as bed:
            pmk = await start_pmk(bed, ["--allow-group", str(gid)])
            assert os.stat(os.path.dirname(pmk.path)).st_gid == gid
            admitted = await run_as(uid, gid, pmk.path, seconds=1)
            assert "hello" in admitted and admitted["notifications"] == [], admitted
            # Someone outside the group is still kept out by the file modes.
            outsider = await run_as(NOBODY, NOBODY, pmk.path, seconds=1)
            assert outsider["connect_error"] == "PermissionError", outsider


if __name__ == "__main__":
    if sys.argv[1] == "peer-client":
        peer_client_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
