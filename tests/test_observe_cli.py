"""``pmk top`` and ``pmk stats`` as commands, against a fake pmk speaking the protocol.

No root and no capture: the fake answers ``hello`` and ``get_stats`` over a
Unix socket with pmk's own codec, its counters growing at a known rate, and
sends ``connection_new`` events to observers, as SPEC section 8 says a server
does. This covers what the snapshot tests cannot: that the commands ask for
what they show and collect the events they list.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import Request

REPO = Path(__file__).resolve().parent.parent
EVENT = {
    "id": 5,
    "direction": "outbound",
    "ip_version": 4,
    "protocol": 17,
    "local_ip": "198.18.0.1",
    "local_port": 40000,
    "remote_ip": "198.18.0.53",
    "remote_port": 53,
    "pid": 777,
    "process": "/usr/lib/firefox/firefox",
    "uid": 1000,
    "verdict": "reroute_to_nameserver",
    "permanent": True,
    "by": "decider",
    "name": "dns-guard",
    "to": "127.0.0.1:5353",
}


class FakePmk:
    """Answers hello and get_stats; its counters grow by 100 captured packets per get_stats."""

    def __init__(self) -> None:
        self.calls = 0
        self.hellos: list[dict[str, Any]] = []

    def stats(self) -> dict[str, Any]:
        self.calls += 1
        n = self.calls
        return {
            "captured": 100 * n,
            "accepted": 90 * n,
            "blocked": 10 * n,
            "dropped": 0,
            "evicted": 0,
            "pending": 0,
            "cache_hits": 50 * n,
            "cache_misses": 50 * n,
            "requests": 5 * n,
            "deciders": 1,
            "clients": 2,
            "backend": "fake",
            "uptime": float(n),
            "client_list": [
                {"id": 1, "name": "dns-guard", "role": "decider", "in_flight": 3, "latency_p50_ms": 2.5},
                {"id": 2, "name": "pmk top", "role": "observer", "in_flight": 0},
            ],
        }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rpc = RpcConnection()
        while data := await reader.read(65536):
            for event in rpc.receive(data):
                if not isinstance(event, Request):
                    continue
                if event.method == "hello":
                    self.hellos.append(event.params[0])
                    rpc.send_response(event.msgid, None, {"protocol": 1, "version": "0", "backend": "fake"})
                    if event.params[0].get("role") == "observer":
                        rpc.send_notification("connection_new", [EVENT])
                        rpc.send_notification("connection_end", [{"reason": "closed"}])  # not listed by top
                elif event.method == "get_stats":
                    rpc.send_response(event.msgid, None, self.stats())
            writer.write(rpc.data_to_send())
        writer.close()


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[tuple[FakePmk, str]]:
    pmk = FakePmk()
    path = str(tmp_path / "pmk.sock")
    server = await asyncio.start_unix_server(pmk.serve, path)
    yield pmk, path
    server.close()


async def pmk_command(*args: str, seconds: float | None = None) -> tuple[int | None, str, str]:
    """Run ``pmk ARGS`` beside the fake; stop it with SIGINT after ``seconds`` if given."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"COLUMNS": "120"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pmk",
        *args,
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if seconds is not None:
        await asyncio.sleep(seconds)
        proc.send_signal(2)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, out.decode(), err.decode()


async def test_top_once_hellos_as_observer_and_lists_the_events(fake: tuple[FakePmk, str]) -> None:
    pmk, path = fake
    status, out, err = await pmk_command("top", "--pipe", path, "--once", "--interval", "0.5")
    assert status == 0, err
    assert pmk.hellos and pmk.hellos[0]["role"] == "observer" and pmk.hellos[0]["name"].startswith("pmk top")
    assert out.startswith("pmk top · fake backend")
    rate = float(re.search(r"packets/s\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert 100 / 1.5 < rate <= 100 / 0.5  # 100 packets over the interval (0.5 s plus the calls), rounded
    assert re.search(r"cache hit rate\s+50\.0%", out)
    assert "verdict mix (last interval): accepted 90.0%  blocked 10.0%" in out
    connection = next(line for line in out.splitlines() if "firefox" in line)
    for shown in (
        "reroute_to_nameserver",
        "decider: dns-guard",
        "firefox (777)",
        "udp",
        "198.18.0.53:53 ⇒ 127.0.0.1:5353",
    ):
        assert shown in connection, f"{shown!r} not in {connection!r}"
    assert re.search(r"dns-guard\s+decider\s+3\s+-\s+2\.5\s+-", out)


async def test_stats_watch_repeats_with_rates(fake: tuple[FakePmk, str]) -> None:
    _, path = fake
    status, out, err = await pmk_command("stats", "--pipe", path, "--watch", "0.4", seconds=2.0)
    assert status == 0, err  # SIGINT ends the watch quietly
    screens = out.split("pmk · fake")
    assert len(screens) >= 3
    assert "per s" not in screens[1] and "per s" in screens[2]
    captured = re.search(r"^captured\s*│\s*([\d,]+)\s*│\s*([\d,.]+)", screens[2], re.M)
    assert captured is not None and 100 / 1.0 < float(captured.group(2)) <= 100 / 0.4
    assert re.search(r"^1\s*│\s*dns-guard\s*│\s*decider", screens[2], re.M)


async def test_stats_prometheus_to_a_file_and_json(fake: tuple[FakePmk, str], tmp_path: Path) -> None:
    _, path = fake
    target = tmp_path / "pmk.prom"
    assert (await pmk_command("stats", "--pipe", path, "--format", "prometheus", "--output", str(target)))[0] == 0
    assert "pmk_captured_total 100.0" in target.read_text()
    status, out, _ = await pmk_command("stats", "--pipe", path, "--json")
    assert status == 0 and json.loads(out)["captured"] == 200


async def test_no_server_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    for command in ("stats", "top"):
        status, _, err = await pmk_command(command, "--pipe", str(tmp_path / "none.sock"))
        assert status == 1
        assert err.startswith("pmk: cannot reach pmk at ") and err.count("\n") == 1
