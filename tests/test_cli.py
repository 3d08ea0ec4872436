"""The command line without root: one-line errors, ``serve --check``, and configuration layers.

Every ``serve`` run here has ``--check`` (or fails before serving), so no test
can start an unscoped pmk in the machine's own namespace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pmk import config as defaults
from pmk.cli import build_parser
from pmk.config import OPTIONS, ServeConfig, platform_endpoint
from pmk.config_layers import CONFIG_ENV, resolve
from pmk.errors import UsageError
from pmk.verdicts import Target, Verdict

REPO = Path(__file__).resolve().parent.parent
GOOD_POLICY = """
[[rule]]
name = "web"
protocol = "tcp"
local_port = "8000-8099"
verdict = "accept"
cache = true

[default]
verdict = "drop"
"""


def pmk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m pmk ARGS`` with no PMK_* variables but those given."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PMK_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pmk", *args], capture_output=True, text=True, env=environ, cwd=REPO, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], status: int, *fragments: str) -> None:
    assert result.returncode == status, result
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--log-level", "verbose"], "--log-level: 'verbose' is not one of debug, info, warning, error"),
        (["--verdict-timeout", "-1"], "--verdict-timeout: -1.0 is not a positive number of seconds"),
        (["--verdict-timeout", "soon"], "--verdict-timeout: 'soon' is not a number"),
        (["--scope", "tcp:abc"], "--scope: scope item 'tcp:abc': 'abc' is not a port"),
        (["--scope", "gre"], "--scope: scope item 'gre': unknown protocol 'gre'"),
        (["--packet-cache", "0"], "--packet-cache: 0 is less than 1"),
        (["--divert-batch", "256"], "--divert-batch: 256 is more than 255"),
        (["--default-verdict", "reject"], "--default-verdict: 'reject' is not one of accept, block, drop"),
        (["--capture", "pcap"], "--capture: 'pcap' is not one of auto, divert, nfqueue"),
        (["--allow-uid", "root"], "--allow-uid: 'root' is not a numeric id"),
        (["--nameserver", "::1:53"], "--nameserver: target '::1:53': write an IPv6 address as [ADDR]:PORT"),
        (["--log-format", "xml"], "--log-format: 'xml' is not one of human, json"),
        (["--metrics", "9477"], "--metrics: '9477': expected ADDR:PORT"),
        (["--metrics", "example.org:9477"], "--metrics: 'example.org:9477': 'example.org' is not an IP address"),
        (["--metrics-public", "yes"], "unrecognized arguments: yes"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_flag_is_one_line_and_status_2(args: list[str], fragment: str) -> None:
    assert_one_line_error(pmk("serve", "--check", *args), 2, fragment, "see pmk")


def test_check_accepts_the_defaults_and_says_so_in_one_line() -> None:
    result = pmk("serve", "--check")
    assert result.returncode == 0, result
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "pmk: configuration valid (all defaults); policy shipped default.toml: 1 rules, default block (not cached);"
        f" endpoint {platform_endpoint()}"
    ]


def test_check_accepts_a_good_policy(tmp_path: Path) -> None:
    (tmp_path / "policy.toml").write_text(GOOD_POLICY)
    result = pmk("serve", "--check", "--policy", str(tmp_path / "policy.toml"))
    assert result.returncode == 0, result
    assert f"policy {tmp_path / 'policy.toml'}: 1 rules, default drop (not cached)" in result.stdout


def test_check_lists_every_policy_error_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[[rule]]\nname = "x"\nverdict = "maybe"\nlocal_port = 70000\n[default]\nverdict = "nope"\n')
    result = pmk("serve", "--check", "--policy", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"pmk: {path}: rule 1 (x): verdict: 'maybe' is not accept, block or drop",
        f'pmk: {path}: rule 1 (x): local_port: 70000 is not a port 1-65535 or a range like "1000-2000"',
        f"pmk: {path}: rule 1 (x): protocol: a rule with ports needs protocol tcp or udp (or a list of such)",
        f"pmk: {path}: [default]: verdict: 'nope' is not accept, block or drop",
    ]


def test_check_reports_environment_and_file_mistakes_together(tmp_path: Path) -> None:
    config = tmp_path / "pmk.toml"
    config.write_text('verdict-timeout = "soon"\nverdict-cach = 5\nfail-open = 1\n')
    result = pmk("serve", "--check", "--config", str(config), env={"PMK_PACKET_CACHE": "many", "PMK_LOG_LEVEL": "loud"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"pmk: config {config}: verdict-timeout: 'soon' is not a number",
        f"pmk: config {config}: verdict-cach: unknown option (did you mean 'verdict-cache'?)",
        f"pmk: config {config}: fail-open: 1 is not true or false",
        "pmk: PMK_PACKET_CACHE=many: 'many' is not a whole number",
        "pmk: PMK_LOG_LEVEL=loud: 'loud' is not one of debug, info, warning, error",
    ]


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        (["--policy", "/nonexistent/policy.toml"], {}, "cannot read policy /nonexistent/policy.toml"),
        (["--tunnel", "10.0.0.1:1", "--tunnel", "10.0.0.2:1"], {}, "--tunnel: at most one target per IP version"),
        ([], {"PMK_NAMESERVER": "10.0.0.1:53,10.0.0.2:53"}, "PMK_NAMESERVER=10.0.0.1:53,10.0.0.2:53: at most one"),
        (["--config", "/nonexistent/pmk.toml"], {}, "cannot read config /nonexistent/pmk.toml (--config)"),
        ([], {CONFIG_ENV: "/nonexistent/pmk.toml"}, "cannot read config /nonexistent/pmk.toml (PMK_CONFIG)"),
        (
            ["--policy", "/etc/hostname", "--default-verdict", "accept"],
            {},
            "--default-verdict and --policy exclude each other",
        ),
        (
            ["--policy", "/etc/hostname"],
            {"PMK_DEFAULT_VERDICT": "accept"},
            "--default-verdict (from PMK_DEFAULT_VERDICT) and --policy exclude each other",
        ),
        (["--metrics", "10.0.0.1:9477"], {}, "--metrics 10.0.0.1:9477: not a loopback address; add --metrics-public"),
        ([], {"PMK_METRICS": "10.0.0.1:9477"}, "add --metrics-public to serve it to the network (from PMK_METRICS)"),
        ([], {"PMK_METRICS": "nowhere"}, "PMK_METRICS=nowhere: 'nowhere': expected ADDR:PORT"),
        (
            ["--metrics", "10.0.0.1:9477", "--metrics-public"],
            {"PMK_METRICS_PUBLIC": "maybe"},
            "PMK_METRICS_PUBLIC=maybe",
        ),
    ],
)
def test_a_bad_setting_outside_the_flags_is_one_line_and_status_2(
    args: list[str], env: dict[str, str], fragment: str
) -> None:
    assert_one_line_error(pmk("serve", "--check", *args, env=env), 2, "pmk: ", fragment)


def test_stats_without_a_server_is_one_line_and_status_1(tmp_path: Path) -> None:
    assert_one_line_error(
        pmk("stats", "--pipe", str(tmp_path / "none.sock")), 1, f"pmk: cannot reach pmk at {tmp_path}/none.sock"
    )


async def test_stats_with_a_server_error_is_one_line_and_status_1() -> None:
    directory = tempfile.mkdtemp(prefix="pmk-test-")
    path = os.path.join(directory, "pmk.sock")

    async def answer_with_an_error(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        unpacker = msgpack.Unpacker()
        unpacker.feed(await reader.read(65536))
        _type, msgid, method, _params = next(unpacker)
        assert method == "get_stats"
        writer.write(msgpack.packb([1, msgid, {"code": "internal_error", "message": "out of sorts"}, None]))
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer_with_an_error, path)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pmk", "stats", "--pipe", path, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=REPO,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        server.close()
    result = subprocess.CompletedProcess([], process.returncode or 0, stdout.decode(), stderr.decode())
    assert_one_line_error(result, 1, "pmk: get_stats failed: ", "out of sorts")


# -- layering: flag > environment > config file > default ------------------------------------


def layered(
    args: list[str], env: dict[str, str] | None = None, file: str | None = None, tmp: Path | None = None
) -> Any:
    if file is not None:
        assert tmp is not None
        (tmp / "pmk.toml").write_text(file)
        args = ["--config", str(tmp / "pmk.toml"), *args]
    return resolve(build_parser().parse_args(["serve", *args]), env or {})


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected", "source"),
    [
        (None, None, None, defaults.DEFAULT_VERDICT_TIMEOUT, None),
        (None, None, "3", 3.0, "config"),
        (None, "4", "3", 4.0, "PMK_VERDICT_TIMEOUT"),
        ("5", "4", "3", 5.0, "--verdict-timeout"),
        ("5", None, "3", 5.0, "--verdict-timeout"),
        ("5", None, None, 5.0, "--verdict-timeout"),
        (None, "4", None, 4.0, "PMK_VERDICT_TIMEOUT"),
    ],
)
def test_flag_beats_environment_beats_file_beats_default(
    tmp_path: Path, flag: str | None, env: str | None, file: str | None, expected: float, source: str | None
) -> None:
    result = layered(
        ["--verdict-timeout", flag] if flag else [],
        {"PMK_VERDICT_TIMEOUT": env} if env else {},
        f"verdict-timeout = {file}\n" if file else "",
        tmp_path,
    )
    assert result.config.verdict_timeout == expected
    if source is None:
        assert "verdict-timeout" not in result.sources
    else:
        assert result.sources["verdict-timeout"].startswith(source)


T4, T6 = Target.parse("127.0.0.1:5353"), Target.parse("[::1]:5353")
# For every option: a config file value, the same as text, and the ServeConfig value it gives.
SAMPLES: dict[str, tuple[Any, str, Any]] = {
    "pipe": ("/tmp/x/pmk.sock", "/tmp/x/pmk.sock", "/tmp/x/pmk.sock"),
    "policy": ("", "", ""),  # tested with real files below
    "default-verdict": ("accept", "accept", None),  # sets the policy, tested below
    "decide-existing": (True, "1", True),
    "capture": ("nfqueue", "nfqueue", "nfqueue"),
    "filter": ("tcp", "tcp", "tcp"),
    "scope": ("tcp:443,udp:53", "tcp:443,udp:53", "tcp:443,udp:53"),
    "packet-cache": (7, "7", 7),
    "verdict-cache": (9, "9", 9),
    "verdict-timeout": (0.5, "0.5", 0.5),
    "idle-timeout": (30, "30", 30.0),
    "allow-uid": ([1000, 1001], "1000,1001", (1000, 1001)),
    "allow-group": ([27], "27", (27,)),
    "fail-open": (True, "yes", True),
    "queue-num": (3, "3", 3),
    "queue-maxlen": (64, "64", 64),
    "divert-batch": (16, "16", 16),
    "divert-wakeup-batches": (2, "2", 2),
    "ring-bytes": (0, "0", 0),
    "divert-queue-len": (100, "100", 100),
    "nameserver": (["127.0.0.1:5353", "[::1]:5353"], "127.0.0.1:5353,[::1]:5353", (T4, T6)),
    "tunnel": ("127.0.0.1:5353", "127.0.0.1:5353", (T4,)),
    "log-level": ("debug", "DEBUG", "debug"),
    "log-format": ("json", "JSON", "json"),
    "metrics": ("[::1]:9477", "[::1]:9477", "[::1]:9477"),
    "metrics-public": (True, "on", True),
}


def test_every_option_has_a_sample_here() -> None:
    assert set(SAMPLES) == {option.name for option in OPTIONS}


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.attribute and SAMPLES[o.name][2] not in (None, "")])
def test_every_option_is_read_from_file_environment_and_flag(tmp_path: Path, option: Any) -> None:
    toml_value, text, expected = SAMPLES[option.name]
    assert expected != option.default
    quoted = repr(toml_value).replace("'", '"') if not isinstance(toml_value, bool) else str(toml_value).lower()
    from_file = layered([], {}, f"{option.name} = {quoted}\n", tmp_path)
    from_env = layered([], {option.env: text})
    flag_args = [option.flag] if toml_value is True else [option.flag, text]
    if isinstance(expected, tuple):
        flag_args = [arg for value in expected for arg in (option.flag, str(value))]
    from_flag = layered(flag_args)
    for result in (from_file, from_env, from_flag):
        assert getattr(result.config, option.attribute) == expected


def test_the_endpoint_keeps_its_old_variable_name() -> None:
    assert layered([], {"PMK_PIPE": "/tmp/p.sock"}).config.endpoint == "/tmp/p.sock"


def test_metrics_public_admits_a_non_loopback_address_from_any_layer(tmp_path: Path) -> None:
    file = 'metrics = "0.0.0.0:9477"\n'
    assert layered(["--metrics-public"], {}, file, tmp_path).config.metrics == "0.0.0.0:9477"
    assert layered([], {"PMK_METRICS_PUBLIC": "1"}, file, tmp_path).config.metrics_public is True
    with pytest.raises(UsageError, match="not a loopback address"):
        layered(["--no-metrics-public"], {"PMK_METRICS_PUBLIC": "1"}, file, tmp_path)


def test_a_switch_set_in_the_file_can_be_turned_off_by_a_flag(tmp_path: Path) -> None:
    assert layered(["--no-fail-open"], {}, "fail-open = true\n", tmp_path).config.fail_open is False


def test_each_default_is_the_table_default() -> None:
    config = ServeConfig(endpoint=platform_endpoint())
    for option in OPTIONS:
        if option.attribute:
            assert getattr(config, option.attribute) == option.default, option.name


def test_policy_comes_from_the_shipped_file_a_policy_file_or_the_default_verdict(tmp_path: Path) -> None:
    assert layered([]).config.policy.source == "shipped default.toml"
    (tmp_path / "p.toml").write_text(GOOD_POLICY)
    from_flag = layered(["--policy", str(tmp_path / "p.toml")]).config
    assert from_flag.policy.rule_names == ("web", "default")
    assert from_flag.policy_file == str(tmp_path / "p.toml")
    assert from_flag.default_verdict is Verdict.DROP
    only = layered([], {"PMK_DEFAULT_VERDICT": "accept"}).config
    assert only.policy.rule_names == ("default",)
    assert only.default_verdict is Verdict.ACCEPT
    assert only.policy_file == ""


def test_a_relative_policy_in_a_config_file_is_next_to_that_file(tmp_path: Path) -> None:
    (tmp_path / "p.toml").write_text(GOOD_POLICY)
    result = layered([], {}, 'policy = "p.toml"\n', tmp_path)
    assert result.config.policy_file == str(tmp_path / "p.toml")
    assert result.config.policy.rule_names == ("web", "default")


def test_every_mistake_is_collected_before_raising(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        layered(["--policy", str(tmp_path / "missing.toml")], {"PMK_QUEUE_NUM": "-1"}, "queue-maxlen = 0\n", tmp_path)
    assert len(str(caught.value).splitlines()) == 3


# -- SIGHUP: the reload itself, with a stand-in for the server ------------------------------


class PolicyHolder:
    """Stands in for the server: records the policies it is handed."""

    def __init__(self) -> None:
        self.policies: list[Any] = []

    def replace_policy(self, policy: Any) -> None:
        self.policies.append(policy)


def test_sighup_swaps_in_a_good_policy_and_keeps_the_old_one_when_the_new_is_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pmk.cli import reload_policy

    caplog.set_level(logging.INFO, logger="pmk")
    path = tmp_path / "p.toml"
    path.write_text(GOOD_POLICY)
    config = layered(["--policy", str(path)]).config
    holder = PolicyHolder()
    path.write_text(GOOD_POLICY.replace('verdict = "drop"', 'verdict = "accept"'))
    reload_policy(holder, config)  # type: ignore[arg-type]
    assert [p.default.verdict for p in holder.policies] == [Verdict.ACCEPT]
    assert config.policy is holder.policies[0]
    assert "SIGHUP: reloaded policy" in caplog.text
    path.write_text('[default]\nverdict = "sometimes"\n')
    reload_policy(holder, config)  # type: ignore[arg-type]
    assert len(holder.policies) == 1
    assert config.policy.default.verdict is Verdict.ACCEPT
    assert "keeping the current policy; the new one has 1 error(s)" in caplog.text
    assert "[default]: verdict: 'sometimes' is not accept, block or drop" in caplog.text


def test_sighup_without_a_policy_file_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from pmk.cli import reload_policy

    holder = PolicyHolder()
    reload_policy(holder, layered([]).config)  # type: ignore[arg-type]
    assert holder.policies == []
    assert "nothing to reload, the policy is not from a file (shipped default.toml)" in caplog.text


def test_an_unreadable_socket_table_is_one_line_that_names_decide_existing(monkeypatch: pytest.MonkeyPatch) -> None:
    import pmk.host.sockets
    from pmk.cli import existing_at_start
    from pmk.errors import PmkError

    def no_sock_diag(handshake_done: bool = False) -> list[Any]:
        raise FileNotFoundError(2, "sock_diag: No such file or directory")

    monkeypatch.setattr(pmk.host.sockets, "existing_connections", no_sock_diag)
    with pytest.raises(PmkError) as raised:
        existing_at_start(False)
    message = str(raised.value)
    assert raised.value.exit_status == 1 and "\n" not in message
    assert message.startswith("cannot read the socket table")
    assert "No such file or directory" in message and "--decide-existing" in message
