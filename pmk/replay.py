"""``pmk replay FILE``: a capture file through the real decision path, for testing deciders.

The file's packets go through the same server as ``pmk serve`` (caches,
decision core, protocol, endpoint) with the replay backend in place of a
kernel one, so a decider cannot tell the difference; nothing touches the
network and no privileges are needed. The command waits for deciders,
feeds the file, waits until every packet has its outcome, and prints the
verdict summary and the server's counters.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pmk import config as defaults
from pmk import config_layers, logs
from pmk.config import OPTIONS, Integer, Seconds, ServeConfig
from pmk.errors import PmkError
from pmk.verdicts import Verdict

if TYPE_CHECKING:
    from pmk.server.app import Server

# Deciders usually start together with the replay (a CI job, a shell `&`):
# this is long enough for an interpreter to start and connect, short enough
# that a broken decider fails the job quickly.
DEFAULT_WAIT_TIMEOUT = 10.0
REPLAY_SOCKET = "pmk-replay.sock"
_BASIC_VERDICTS = (Verdict.ACCEPT, Verdict.BLOCK, Verdict.DROP)
#: The ``pmk serve`` options that shape decisions, offered by replay under the same names.
DECISION_OPTIONS = ("policy", "default-verdict", "verdict-timeout", "packet-cache", "verdict-cache")
WINDOWS_REPLAY_PIPE = r"\\.\pipe\pmk-replay"


def replay_endpoint() -> str:
    """Where replay listens unless told: ``PMK_PIPE``, else a path this user may own.

    A non-root user cannot create ``/run/pmk``, and the endpoint's directory
    must be its own (``pmk.server.endpoint``): ``$XDG_RUNTIME_DIR`` is (mode
    0700), and otherwise a per-user directory in the temporary directory,
    which pmk creates with mode 0750 (and refuses if another user made it).
    Root gets a socket next to, never on, ``pmk serve``'s own.
    """
    configured = os.environ.get(defaults.ENDPOINT_ENV)
    if configured:
        return configured
    if sys.platform == "win32":
        return WINDOWS_REPLAY_PIPE
    if os.geteuid() == 0:
        return os.path.join(os.path.dirname(defaults.POSIX_ENDPOINT), REPLAY_SOCKET)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, REPLAY_SOCKET)
    return os.path.join(tempfile.gettempdir(), f"pmk-replay-{os.geteuid()}", REPLAY_SOCKET)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an address or CIDR network: {text!r}") from None


def _flag(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a ``pmk.config`` kind's parser: its message, one usage line, exit 2."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = "value"
    return convert


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    replay = commands.add_parser(
        "replay",
        help="feed a pcap/pcapng file to connected deciders (no privileges, no network)",
        description="Feed a capture file's packets through pmk's decision path to connected deciders, "
        "then print the verdicts and counters. Needs no privileges and sends nothing.",
    )
    replay.add_argument("file", help="pcap or pcapng capture")
    replay.add_argument(
        "--local",
        type=_network,
        action="append",
        default=[],
        metavar="CIDR",
        help="this host's addresses (repeatable); packets with neither side local are skipped. "
        "Default: the side that opened each conversation is local",
    )
    replay.add_argument(
        "--wait-deciders",
        type=_flag(Integer(0).from_text),
        default=1,
        metavar="N",
        help="deciders to wait for before feeding (default 1)",
    )
    replay.add_argument(
        "--wait-timeout",
        type=_flag(Seconds().from_text),
        default=DEFAULT_WAIT_TIMEOUT,
        metavar="S",
        help=f"give up waiting for deciders after S seconds (default {DEFAULT_WAIT_TIMEOUT:g})",
    )
    replay.add_argument("--write-accepted", default=None, metavar="OUT", help="write accepted packets to this pcap")
    replay.add_argument(
        "--pipe",
        default=None,
        metavar="PATH",
        help="endpoint (default: $PMK_PIPE, else $XDG_RUNTIME_DIR/pmk-replay.sock or similar)",
    )
    # The decision options of `pmk serve`, same names, kinds and defaults (from flags only: see run()).
    for option in OPTIONS:
        if option.name in DECISION_OPTIONS:
            shown = "" if option.default in (None, "") else f" (default {option.default})"
            replay.add_argument(
                option.flag,
                dest=option.dest,
                type=_flag(option.kind.from_text),
                default=None,
                metavar=option.kind.metavar(),
                help=f"as for serve: {option.help}{shown}",
            )
    replay.add_argument("--json", action="store_true", help="print JSON instead of tables")
    replay.add_argument("--log-level", choices=logs.LEVELS, default="warning", help="the server's log on stderr")


def run(args: argparse.Namespace) -> int:
    from pmk.loop import run as run_loop

    logs.configure_logging(args.log_level, logs.FORMATS[0])
    # Flags only, no PMK_* variables or config file: a replay is a test, and its command line
    # should say everything its outcome depends on (PMK_PIPE only says where to meet deciders).
    flags = {name.replace("-", "_"): getattr(args, name.replace("-", "_")) for name in DECISION_OPTIONS}
    config = config_layers.resolve(argparse.Namespace(config=None, **flags), environ={}).config
    config.endpoint = args.pipe or replay_endpoint()
    report = run_loop(replay(config, args), need_pipes=True)
    print_report(report, args.json)
    damaged = report["summary"].get("damaged")
    if damaged:
        raise PmkError(damaged)
    return 0


async def replay(config: ServeConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Serve, wait for deciders, feed the file, and return the summary and the stats."""
    from pmk.capture.replay import ReplayBackend
    from pmk.core.attribution import no_owner
    from pmk.server.app import Server
    from pmk.server.endpoint import EndpointError

    # The window is the packet cache: the file is never read faster than it can hold.
    backend = ReplayBackend(args.file, local=args.local, window=config.packet_cache, write_accepted=args.write_accepted)
    # Packets from a file belong to no socket of this host: no process attribution.
    server = Server(config, backend, owner_of=no_owner)
    try:
        await server.start()
    except (EndpointError, OSError) as error:
        backend.close()
        raise PmkError(f"cannot serve on {config.endpoint}: {error}") from None
    interrupted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    _on_signals(lambda: None if interrupted.done() else interrupted.set_result(None))
    try:
        if args.wait_deciders:
            plural = "s" if args.wait_deciders > 1 else ""
            print(f"pmk replay: waiting for {args.wait_deciders} decider{plural} on {config.endpoint}", file=sys.stderr)
            await _wait_for_deciders(server, args.wait_deciders, args.wait_timeout, interrupted)
        finished = backend.play()
        await asyncio.wait([finished, interrupted], return_when=asyncio.FIRST_COMPLETED)
        if not finished.done():
            raise PmkError(f"interrupted after {backend.fed} packets")
        stats = server.stats()
    finally:
        await server.stop()
    summary: dict[str, Any] = {
        "file": args.file,
        "frames": backend.frames,
        "not_ip": backend.not_ip,
        "not_local": backend.not_local,
        "packets": backend.fed,
        # Reroutes only where they happened: replay configures no reroute targets.
        **{v: n for v, n in backend.verdicts.items() if n or v in _BASIC_VERDICTS},
    }
    if args.write_accepted is not None:
        summary["written"] = backend.written
    if backend.damaged:
        summary["damaged"] = backend.damaged
    return {"summary": summary, "stats": stats}


async def _wait_for_deciders(server: Server, count: int, timeout: float, interrupted: asyncio.Future[None]) -> None:
    """Return once ``count`` deciders said hello; PmkError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (connected := _deciders(server)) < count:
        if interrupted.done():
            raise PmkError("interrupted while waiting for deciders")
        if loop.time() >= deadline:
            raise PmkError(
                f"{connected} of {count} deciders connected to {server.config.endpoint} within {timeout:g} s"
            )
        await asyncio.sleep(0.05)


def _deciders(server: Server) -> int:
    """Connected deciders, as ``get_stats`` tells them."""
    count = server.stats()["deciders"]
    return count if isinstance(count, int) else 0


def _on_signals(callback: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, callback)
        except (NotImplementedError, AttributeError):  # Windows
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(callback))


def print_report(report: dict[str, Any], as_json: bool) -> None:
    """The summary and the stats: JSON, or tables a person reads (the stats as ``pmk stats`` shows them)."""
    if as_json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from pmk.ui.stats_view import render

    summary = Table(title="pmk replay", title_justify="left", show_edge=False, pad_edge=False)
    summary.add_column("")
    summary.add_column("", justify="right")
    for name, value in report["summary"].items():
        summary.add_row(name, Text(str(value)))
    console = Console()
    console.print(summary)
    console.print(render(report["stats"]))
