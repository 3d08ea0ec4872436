"""``pmk serve``, ``pmk stats``, ``pmk top``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

import pmk
from pmk import config_layers, logs
from pmk.config import ServeConfig
from pmk.core.policy import load_policy
from pmk.errors import EXIT_RUNTIME, EXIT_USAGE, PmkError, UsageError
from pmk.server.decision_log import SUPPRESSED_REPORT_INTERVAL, DecisionLog
from pmk.verdicts import ConnKey

if TYPE_CHECKING:
    from pmk.server.app import Server

log = logging.getLogger("pmk")


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line like every other pmk error (status 2 as before)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pmk", description="Verdict-request server for application firewalls.")
    parser.add_argument("--version", action="version", version=f"pmk {pmk.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="intercept packets and ask deciders for verdicts",
        description="Each option can also come from $PMK_<OPTION> or a --config file; a flag wins over the"
        " environment, the environment over the file.",
    )
    serve.add_argument(
        "--check", action="store_true", help="validate flags, environment, config file and policy, then exit"
    )
    config_layers.add_options(serve)

    from pmk import bench, replay
    from pmk.ui import stats_view, top

    stats_view.add_parser(commands)
    top.add_parser(commands)
    bench.add_parser(commands)
    replay.add_parser(commands)
    return parser


async def serve(config: ServeConfig) -> int:
    """Run until SIGINT or SIGTERM (SIGHUP re-reads the policy); return the exit status."""
    from pmk.capture.netfilter_rules import RulesError
    from pmk.capture.select import build_backend
    from pmk.server.app import Server
    from pmk.server.endpoint import EndpointError
    from pmk.server.sdnotify import Notifier

    try:
        backend = build_backend(config)
    except (OSError, ImportError, RulesError) as error:
        raise PmkError(f"cannot set up the {config.capture} capture backend: {_why(error)}") from None
    if backend.name == "divert":
        from pmk.capture.cleanup import clean_stale_divert

        clean_stale_divert()  # programs a killed pmk left attached (nfqueue cleans up in install)
    server = Server(config, backend)
    decision_log = DecisionLog(logging.getLogger("pmk.decisions"))
    server.on_decided = lambda decided: decision_log.record(decided, time.monotonic())
    # Before start: a signal that arrives while pmk installs its rules must not skip their removal.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, AttributeError):  # Windows
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    if hasattr(signal, "SIGHUP"):  # closing the terminal must not kill pmk without its cleanup
        loop.add_signal_handler(signal.SIGHUP, reload_policy, server, config)
    try:
        await server.start(existing=None if config.decide_existing else existing_at_start)
    except (EndpointError, OSError, ImportError, PmkError) as error:  # ImportError: no NFQUEUE bindings
        backend.close()
        raise PmkError(f"cannot start: {_why(error)}") from None
    flusher = loop.create_task(flush_every_interval(decision_log))
    if config.decide_existing:
        log.info("connections open at start are asked about like new ones (--decide-existing)")
    else:
        log.info(
            "%d connection(s) open at start are accepted without asking (--decide-existing asks)",
            server.stats()["preaccepted"],
        )
    metrics = None
    if config.metrics:
        from pmk.metrics import start_metrics

        try:
            metrics = await start_metrics(config.metrics, server.stats, public=config.metrics_public)
        except OSError as error:
            await server.stop()
            raise PmkError(f"cannot serve metrics on {config.metrics}: {_why(error)}") from None
    log.info("%s", config.policy.summary())
    serving = f"serving on {config.endpoint} ({backend.name} backend)"
    print(f"pmk {pmk.__version__}: {serving}", flush=True)
    systemd = Notifier.from_environment()
    systemd.ready(serving, loop)
    await stop.wait()
    log.info("stopping")
    systemd.stopping()
    if metrics is not None:
        metrics.close()
    await server.stop()
    flusher.cancel()
    decision_log.flush(time.monotonic(), final=True)
    return 0


def existing_at_start(handshake_done: bool) -> list[ConnKey]:
    """The connections in the socket table now, to be accepted without asking (one-line error if unreadable)."""
    from pmk.host.sockets import existing_connections

    try:
        keys = existing_connections(handshake_done)
    except OSError as error:
        raise PmkError(
            f"cannot read the socket table to keep open connections open: {_why(error)}"
            " (--decide-existing asks about them instead)"
        ) from None
    return keys


async def flush_every_interval(decision_log: DecisionLog) -> None:
    """Report held-back decision lines of a flood that has ended, without waiting for the next decision."""
    while True:
        await asyncio.sleep(SUPPRESSED_REPORT_INTERVAL)
        decision_log.flush(time.monotonic())


def _why(error: BaseException) -> str:
    """The error's message, with the remedy when it is about privileges."""
    message = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if (isinstance(error, PermissionError) or "root" in message.lower()) and "needs root" not in message:
        return f"{message} (pmk serve needs root)"
    return message


def reload_policy(server: Server, config: ServeConfig) -> None:
    """SIGHUP: re-read the policy file; a bad file keeps the policy in force and says why."""
    if not config.policy_file:
        log.warning("SIGHUP: nothing to reload, the policy is not from a file (%s)", config.policy.source)
        return
    try:
        policy = load_policy(config.policy_file)
    except UsageError as error:
        lines = str(error).splitlines()
        log.error("SIGHUP: keeping the current policy; the new one has %d error(s):", len(lines))
        for line in lines:
            log.error("  %s", line)
        return
    server.replace_policy(policy)
    config.policy = policy
    log.info("SIGHUP: reloaded %s", policy.summary())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a PmkError ends it with one line per message line on stderr and its status."""
    try:
        args = build_parser().parse_args(argv)
        return _run(args)
    except PmkError as error:
        for line in str(error).splitlines() or [type(error).__name__]:
            print(f"pmk: {line}", file=sys.stderr)
        return error.exit_status
    except ModuleNotFoundError as error:
        # A client-only install (msgpack alone) has the command but not the server's packages.
        print(f"pmk: no module {error.name!r}: this command needs pip install 'pmk-verdict[server]'", file=sys.stderr)
        return EXIT_RUNTIME


def _run(args: argparse.Namespace) -> int:
    from pmk.loop import run

    if args.command == "serve":
        layered = config_layers.resolve(args, os.environ)
        if args.check:
            print(f"pmk: {layered.summary()}")
            return 0
        config = layered.config
        logs.configure_logging(config.log_level, config.log_format)
        from pmk.server.collector import tune_for_serving

        tune_for_serving()
        return run(serve(config), need_pipes=True)
    if args.command == "bench":
        from pmk import bench

        return bench.run(args)
    if args.command == "replay":
        from pmk import replay

        return replay.run(args)
    if args.command in ("stats", "top"):
        from pmk.ui import stats_view, top

        return {"stats": stats_view.run, "top": top.run}[args.command](args)
    return 2
