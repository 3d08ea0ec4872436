"""``pmk serve``, ``pmk stats``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

import pmk
from pmk import config as defaults
from pmk import logs
from pmk.config import ServeConfig
from pmk.errors import PmkError
from pmk.verdicts import Verdict

log = logging.getLogger("pmk")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pmk", description="Verdict-request server for application firewalls.")
    parser.add_argument("--version", action="version", version=f"pmk {pmk.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="intercept packets and ask deciders for verdicts")
    serve.add_argument("--pipe", default=None, help="endpoint path (default: $PMK_PIPE or the platform default)")
    serve.add_argument("--filter", default=defaults.DEFAULT_FILTER, help="WinDivert filter (divert backend)")
    serve.add_argument("--capture", choices=("auto", "divert", "nfqueue"), default="auto")
    serve.add_argument("--packet-cache", type=_positive_int, default=defaults.DEFAULT_PACKET_CACHE)
    serve.add_argument("--verdict-cache", type=_positive_int, default=defaults.DEFAULT_VERDICT_CACHE)
    serve.add_argument("--default-verdict", choices=[v.value for v in Verdict], default=defaults.DEFAULT_VERDICT.value)
    serve.add_argument("--verdict-timeout", type=_positive_float, default=defaults.DEFAULT_VERDICT_TIMEOUT)
    serve.add_argument("--allow-uid", type=int, action="append", default=[], help="also admit this uid")
    serve.add_argument("--allow-group", type=int, action="append", default=[], help="also admit this gid")
    serve.add_argument("--fail-open", action="store_true", help="nfqueue: pass packets when pmk is not reading")
    serve.add_argument("--queue-num", type=int, default=0, help="nfqueue: the queue number")
    serve.add_argument(
        "--scope", default="", help="nfqueue: what to intercept, e.g. 'tcp:443,udp:5000-5010,icmp' (default: all)"
    )
    serve.add_argument("--queue-maxlen", type=_positive_int, default=1024, help="nfqueue: kernel queue length")
    serve.add_argument(
        "--divert-batch", type=_positive_int, default=defaults.DEFAULT_DIVERT_BATCH, help="divert: packets per receive"
    )
    serve.add_argument("--divert-wakeup-batches", type=_positive_int, default=1, help="divert: receives per wake-up")
    serve.add_argument(
        "--ring-bytes",
        type=int,
        default=defaults.DEFAULT_RING_BYTES,
        help="divert (Linux): eBPF ring, 0 = library default",
    )
    serve.add_argument("--divert-queue-len", type=int, default=0, help="divert: driver queue length, 0 = default")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", choices=logs.FORMATS, default=logs.FORMATS[0], help="json: one object per line")
    serve.add_argument("--metrics", metavar="ADDR:PORT", default="", help="serve Prometheus metrics (loopback)")
    serve.add_argument("--metrics-public", action="store_true", help="allow --metrics on a non-loopback address")

    from pmk import bench
    from pmk.ui import stats_view, top

    stats_view.add_parser(commands)
    top.add_parser(commands)

    bench.add_parser(commands)
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    config = ServeConfig(
        filter=args.filter,
        capture=args.capture,
        packet_cache=args.packet_cache,
        verdict_cache=args.verdict_cache,
        default_verdict=Verdict(args.default_verdict),
        verdict_timeout=args.verdict_timeout,
        allow_uids=tuple(args.allow_uid),
        allow_gids=tuple(args.allow_group),
        fail_open=args.fail_open,
        queue_num=args.queue_num,
        scope=args.scope,
        queue_maxlen=args.queue_maxlen,
        divert_batch=args.divert_batch,
        divert_batches_per_wakeup=args.divert_wakeup_batches,
        divert_ring_bytes=args.ring_bytes,
        divert_queue_len=args.divert_queue_len,
    )
    if args.pipe:
        config.endpoint = args.pipe
    if args.metrics:
        from pmk.metrics import parse_listen

        parse_listen(args.metrics, args.metrics_public)  # a bad address fails before capture starts
    config.metrics, config.metrics_public = args.metrics, args.metrics_public
    return config


async def serve(config: ServeConfig) -> int:
    """Run until SIGINT or SIGTERM; return the exit status."""
    from pmk.capture.select import build_backend
    from pmk.server.app import Server
    from pmk.server.endpoint import EndpointError

    backend = build_backend(config)
    if backend.name == "divert":
        from pmk.capture.cleanup import clean_stale_divert

        clean_stale_divert()  # programs a killed pmk left attached (nfqueue cleans up in install)
    server = Server(config, backend)
    try:
        await server.start()
    except (EndpointError, OSError) as error:
        log.error("cannot start: %s", error)
        backend.close()
        return 1
    metrics = None
    if config.metrics:
        from pmk.metrics import start_metrics

        try:
            metrics = await start_metrics(config.metrics, server.stats, public=config.metrics_public)
        except OSError as error:
            log.error("cannot serve metrics on %s: %s", config.metrics, error)
            await server.stop()
            return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, AttributeError):  # Windows
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(stop.set))
    print(f"pmk {pmk.__version__}: serving on {config.endpoint} ({backend.name} backend)", flush=True)
    await stop.wait()
    log.info("stopping")
    if metrics is not None:
        metrics.close()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except PmkError as error:  # one line a person can act on, never a traceback
        print(f"pmk: {error}", file=sys.stderr)
        return error.exit_status


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    from pmk.loop import run

    if args.command == "serve":
        logs.configure_logging(args.log_level, args.log_format)
        return run(serve(config_from_args(args)), need_pipes=True)
    if args.command == "bench":
        from pmk import bench

        return bench.run(args)
    if args.command in ("stats", "top"):
        from pmk.ui import stats_view, top

        return {"stats": stats_view.run, "top": top.run}[args.command](args)
    return 2
