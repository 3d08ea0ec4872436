"""``pmk serve`` as a process in a namespace: runtime errors in one line, SIGHUP reloads the policy."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness import (
    BACKENDS,
    PYTHON,
    REPO,
    PmkProcess,
    Testbed,
    backend_skip_reason,
    eventually,
    needs_root,
    netns,
    pmk_rules,
)
from tests.netns import TwoHosts, two_hosts

pytestmark = [netns, needs_root]


def serve_in(hosts: TwoHosts, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pmk serve ARGS`` to its end in the server namespace (it is expected to fail)."""
    drop = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups"] if user else []
    argv = hosts.exec_argv(hosts.server, *drop, PYTHON, "-m", "pmk", "serve", *args)
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)


def assert_one_line(result: subprocess.CompletedProcess[str], status: int, fragment: str) -> None:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith("pmk: ") and fragment in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--log-level", "verbose"],
        ["--verdict-timeout", "-1"],
        ["--scope", "tcp:abc"],
        ["--policy", "/nonexistent/policy.toml"],
    ],
)
def test_serve_itself_refuses_a_bad_setting_in_one_line_before_touching_anything(args: list[str]) -> None:
    # Run in a namespace all the same: were the setting accepted, pmk would start serving.
    with two_hosts() as hosts:
        result = serve_in(hosts, "--pipe", "/nonexistent/pmk.sock", *args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


async def test_a_busy_endpoint_and_the_chains_of_a_live_pmk_are_one_line_and_status_1() -> None:
    reason = backend_skip_reason("nfqueue")
    if reason is not None:
        pytest.skip(f"nfqueue backend unavailable: {reason}")
    with two_hosts() as hosts:
        first = PmkProcess(hosts, "nfqueue", ["tcp:7301"])
        try:
            await first.start()
            rules = pmk_rules(hosts)
            busy = serve_in(hosts, "--pipe", first.path, "--capture", "nfqueue", "--scope", "tcp:7302")
            assert_one_line(busy, 1, f"cannot start: another server is listening on {first.path}")
            other = os.path.join(first.dir, "other.sock")
            chains = serve_in(hosts, "--pipe", other, "--capture", "nfqueue", "--scope", "tcp:7302", "--queue-num", "1")
            assert_one_line(chains, 1, f"cannot start: another pmk (pid {first.pid}) runs the kernel fast path")
            # The failed starts left the first pmk and its rules alone.
            assert first.proc is not None and first.proc.poll() is None
            assert pmk_rules(hosts) == rules
            assert await first.stop() == 0
        finally:
            first.cleanup()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_missing_privileges_end_in_one_pmk_line_and_status_1(backend: str) -> None:
    reason = backend_skip_reason(backend)
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    directory = tempfile.mkdtemp(prefix="pmk-cli-")
    shutil.chown(directory, "nobody")
    try:
        with two_hosts() as hosts:
            scope = ["--scope", "tcp:7303"] if backend == "nfqueue" else ["--filter", "tcp.DstPort == 7303"]
            result = serve_in(hosts, "--pipe", f"{directory}/pmk.sock", "--capture", backend, *scope, user="nobody")
            assert result.returncode == 1, result
            assert "Traceback" not in result.stderr
            # libbpf (divert on Linux) writes its own complaints to stderr first; pmk's line is the last.
            last = result.stderr.splitlines()[-1]
            assert last.startswith("pmk: cannot start: ") and "needs root" in last, result.stderr
            assert pmk_rules(hosts) == []
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_policy(path: Path, port: int, verdict: str) -> None:
    path.write_text(
        f'[[rule]]\nname = "port-{port}-{verdict}"\nprotocol = "tcp"\nlocal_port = {port}\n'
        f'verdict = "{verdict}"\n\n[default]\nverdict = "block"\n'
    )


@pytest.mark.parametrize("backend", BACKENDS)
async def test_sighup_with_a_bad_policy_keeps_the_old_one_and_pmk_running(backend: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    write_policy(policy, 7311, "accept")
    os.chmod(tmp_path, 0o755)
    async with Testbed(backend, ["tcp:7311"], ["--policy", str(policy)]) as bed:
        policy.write_text('[[rule]]\nname = "broken"\nverdict = "perhaps"\n')
        assert bed.server.proc is not None
        bed.server.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "keeping the current policy" in bed.server.log(), "pmk to refuse the new policy")
        assert f"{policy}: rule 1 (broken): verdict: 'perhaps' is not accept, block or drop" in bed.server.log()
        await asyncio.sleep(0.2)
        assert bed.server.proc.poll() is None, bed.server.log()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_sighup_with_a_changed_policy_changes_the_next_decision(backend: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    write_policy(policy, 7312, "accept")
    os.chmod(tmp_path, 0o755)
    async with Testbed(backend, ["tcp:7312"], ["--policy", str(policy)]) as bed:
        ip = bed.hosts.server_ip
        # No decider: the policy decides. Its rule accepts (without caching) port 7312.
        assert (await bed.client.tcp_connect(ip, 7312, id="before"))["ok"]
        assert await bed.client.ping("policy says yes", id="before") == {"data": "policy says yes"}
        await bed.client.close_socket("before")
        write_policy(policy, 7312, "block")
        assert bed.server.proc is not None
        bed.server.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: "SIGHUP: reloaded" in bed.server.log(), "pmk to reload the policy")
        assert await bed.client.tcp_connect(ip, 7312, id="after") == {"error": "ECONNREFUSED"}
        stats = await bed.server.check_identity()
        assert stats["policy_hits"]["port-7312-block"] >= 1
