"""Issue 11 items 4-5 against a live pmk: metrics scrape, stats formats, JSON logs, and
``pmk top`` read off a real terminal (tmux capture-pane) while connections are made."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import BACKENDS, PYTHON, REPO, WAIT, Decision, Testbed, eventually, needs_root, netns

pytestmark = [netns, needs_root, pytest.mark.parametrize("backend", BACKENDS)]

METRICS = "127.0.0.1:9477"  # inside pmk's own namespace: free by construction

_SCRAPE = """
import sys, urllib.request
sys.stdout.write(urllib.request.urlopen("http://%s/metrics", timeout=10).read().decode())
"""


def pmk_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "pmk", *args], cwd=REPO, capture_output=True, text=True, timeout=WAIT, check=False
    )


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


async def test_metrics_stats_formats_and_json_logs(backend: str) -> None:
    args = ["--metrics", METRICS, "--log-format", "json"]
    async with Testbed(backend, ["tcp:7311"], args) as bed:
        await bed.decider(lambda info: Decision("accept", permanent=True))
        for n in range(3):
            assert (await bed.client.tcp_connect(bed.hosts.server_ip, 7311, id=f"t{n}"))["ok"]
        before = await bed.server.check_identity()
        scraped = bed.hosts.sh(bed.hosts.server, PYTHON, "-c", _SCRAPE % METRICS).stdout
        after = await bed.server.stats()
        metrics = samples(scraped)
        assert before["captured"] <= metrics["pmk_captured_total"] <= after["captured"]
        assert before["captured"] > 0
        assert metrics["pmk_deciders"] == 1
        assert "# TYPE pmk_pending gauge" in scraped and "# TYPE pmk_captured_total counter" in scraped

        textfile = pmk_cli("stats", "--pipe", bed.server.path, "--format", "prometheus")
        assert textfile.returncode == 0, textfile.stderr
        assert samples(textfile.stdout)["pmk_captured_total"] >= before["captured"]
        as_json = pmk_cli("stats", "--pipe", bed.server.path, "--json")
        assert json.loads(as_json.stdout)["backend"] == backend
        table = pmk_cli("stats", "--pipe", bed.server.path)
        assert re.search(r"^Packets", table.stdout, re.M) and re.search(r"^captured\s+│\s+[\d,]+", table.stdout, re.M)

        once = pmk_cli("top", "--pipe", bed.server.path, "--once", "--interval", "0.3")
        assert once.returncode == 0, once.stderr
        assert f"pmk top · {backend} backend" in once.stdout
        assert re.search(r"packets/s\s+[\d,.]+", once.stdout)

        log_lines = [line for line in bed.server.log().splitlines() if line.startswith("{")]
        records = [json.loads(line) for line in log_lines]
        assert records and all({"ts", "level", "logger", "message"} <= record.keys() for record in records)
        assert any("metrics on http://127.0.0.1:9477/metrics" in record["message"] for record in records)


async def test_metrics_refuses_a_public_address_before_capturing(backend: str) -> None:
    refused = pmk_cli("serve", "--capture", backend, "--metrics", "0.0.0.0:9477", "--pipe", "/nonexistent/x.sock")
    assert refused.returncode == 2
    assert "--metrics-public" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.skipif(shutil.which("tmux") is None and not os.environ.get("CI"), reason="tmux is not installed")
async def test_pmk_top_in_a_terminal(backend: str, tmp_path: Path) -> None:
    """What a person sees: run ``pmk top`` in tmux and read the screen while connections come."""
    async with Testbed(backend, ["tcp:7312"]) as bed:
        await bed.decider(lambda info: Decision("accept", permanent=True))
        watcher = await bed.server.connect("test-observer")  # to learn whether this pmk sends events
        events: list[Any] = []
        watcher.on_notification = lambda n: events.append(n) if n.method == "connection_new" else None
        tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]  # a private tmux server, gone with tmp_path
        # pytest exports COLUMNS and LINES; rich would believe them over the terminal
        command = f"env -u COLUMNS -u LINES {PYTHON} -m pmk top --pipe {bed.server.path} --interval 0.5"
        subprocess.run([*tmux, "new-session", "-d", "-x", "130", "-y", "50", "-c", str(REPO), command], check=True)
        screens: list[str] = []

        def screen() -> str:
            shot = subprocess.run([*tmux, "capture-pane", "-p"], capture_output=True, text=True, check=False).stdout
            screens.append(shot)
            return shot

        def per_second(label: str, text: str) -> float:
            found = re.search(label + r"/s\s+([\d,.]+)", text)
            return float(found.group(1).replace(",", "")) if found else 0.0

        try:
            await eventually(lambda: "latest connections" in screen(), "pmk top to draw")
            made = 0

            async def connections() -> None:
                nonlocal made
                while True:
                    assert (await bed.client.tcp_connect(bed.hosts.server_ip, 7312, id=f"c{made}"))["ok"]
                    await bed.client.close_socket(f"c{made}")
                    made += 1
                    await asyncio.sleep(0.05)

            traffic = asyncio.create_task(connections())
            try:
                await eventually(lambda: per_second("packets", screen()) > 0, "a packet rate on pmk top's screen")
                await eventually(lambda: per_second("new connections", screen()) > 0, "a connection rate on it")
                if events:
                    await eventually(lambda: "decider: e2e" in screen(), "the decider's name in latest connections")
            finally:
                traffic.cancel()
            text = screens[-1]
            assert made > 0
            assert f"pmk top · {backend} backend" in text
            for label in ("verdict mix", "cache hit rate", "pending", "evicted/s", "bypassed/s", "requests in flight"):
                assert label in text, f"{label!r} missing from:\n{text}"
            assert re.search(r"accepted \d+\.\d%", text) or "accepted -" in text
        finally:
            subprocess.run([*tmux, "kill-server"], check=False)
            watcher.close()
        print("\n" + screens[-1])
