"""``pmk top``: a live view of a running server, as an observer.

The screen is ``render(current, previous, events)``: a pure function of two
``get_stats`` snapshots and the ``connection_new`` events received, so every
number on it is tested with rich's recording console. ``run`` only connects
(hello as an observer), polls ``get_stats``, collects events and redraws.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pmk.errors import PmkError, UsageError
from pmk.ui.catalog import client_list, numbers, rates

#: Events kept for the "latest connections" list; more than any screen shows.
_EVENTS_KEPT = 500
_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6"}
_VERDICT_STYLE = {"accept": "green", "block": "red", "drop": "red", "reject": "red"}
#: Packet outcomes in the verdict mix, in the order shown.
_OUTCOMES = ("accepted", "blocked", "dropped", "rerouted")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One ``get_stats`` answer and when it came (``time.monotonic``)."""

    stats: Mapping[str, Any]
    at: float


@dataclass(frozen=True, slots=True)
class Seen:
    """One ``connection_new`` event and when it came (monotonic, and wall clock for display)."""

    event: Mapping[str, Any]
    at: float
    wall: float


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    top = commands.add_parser("top", help="live view of a running server (rates, deciders, latest connections)")
    top.add_argument("--pipe", default=None, help="endpoint path (default: $PMK_PIPE or the platform default)")
    top.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh every SECONDS")
    top.add_argument("--once", action="store_true", help="print one screen after one interval and exit")


def run(args: argparse.Namespace) -> int:
    from pmk.loop import run as run_loop

    if args.interval <= 0:
        raise UsageError("--interval: SECONDS must be positive")
    try:
        return run_loop(_top(args.pipe, args.interval, args.once))
    except KeyboardInterrupt:
        return 0


async def _top(path: str | None, interval: float, once: bool) -> int:
    from pmk.client import Client, ConnectionClosed, RemoteError

    try:
        client = await Client.connect(path)
    except OSError as error:
        raise PmkError(f"cannot reach pmk at {path or 'the default endpoint'}: {error}") from None
    events: deque[Seen] = deque(maxlen=_EVENTS_KEPT)

    def on_notification(notification: Any) -> None:
        params = notification.params
        if notification.method == "connection_new" and params and isinstance(params[0], dict):
            events.append(Seen(notification.params[0], time.monotonic(), time.time()))

    client.on_notification = on_notification
    console = Console()
    try:
        await client.hello(f"pmk top ({os.getpid()})", "observer")
        previous: Snapshot | None = None
        current = Snapshot(await client.call("get_stats"), time.monotonic())
        if once:
            await asyncio.sleep(interval)
            previous, current = current, Snapshot(await client.call("get_stats"), time.monotonic())
            console.print(render(current, previous, list(events), rows=_rows_for(console, current.stats)))
            return 0
        with Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                live.update(
                    render(current, previous, list(events), rows=_rows_for(console, current.stats)), refresh=True
                )
                await asyncio.sleep(interval)
                previous, current = current, Snapshot(await client.call("get_stats"), time.monotonic())
    except (ConnectionClosed, RemoteError) as error:
        raise PmkError(f"pmk closed the connection: {error}") from None
    finally:
        client.close()


def _rows_for(console: Console, stats: Mapping[str, Any]) -> int:
    """Connection rows that fit under the rest of the screen (its lines counted by hand)."""
    clients = len(client_list(stats))
    fixed = 1 + 8 + (4 + clients if clients else 1) + 6  # header, traffic, clients, connection table's frame
    return max(3, console.size.height - fixed)


# -- the screen ---------------------------------------------------------------


def render(current: Snapshot, previous: Snapshot | None, events: Sequence[Seen], rows: int = 10) -> RenderableType:
    """The whole screen for one refresh; ``previous`` None means no rates yet."""
    stats = current.stats
    seconds = current.at - previous.at if previous is not None else 0.0
    per_second = rates(stats, previous.stats if previous else None, seconds)
    return Group(
        _header(stats),
        _traffic(stats, per_second, previous is not None, _new_connections_per_second(current, previous, events)),
        _deciders(current, previous),
        _latest(events, rows),
    )


def _header(stats: Mapping[str, Any]) -> Text:
    parts = ["pmk top"]
    if isinstance(stats.get("backend"), str):
        parts.append(f"{stats['backend']} backend")
    uptime = stats.get("uptime")
    if isinstance(uptime, int | float):
        minutes, secs = divmod(int(uptime), 60)
        hours, minutes = divmod(minutes, 60)
        parts.append(f"up {hours}h{minutes:02d}m{secs:02d}s" if hours else f"up {minutes}m{secs:02d}s")
    values = numbers(stats)
    if "clients" in values or "deciders" in values:
        parts.append(f"{values.get('clients', 0):g} clients ({values.get('deciders', 0):g} deciding)")
    return Text(" · ".join(parts), style="bold")  # Text: names are never read as markup


def _new_connections_per_second(current: Snapshot, previous: Snapshot | None, events: Sequence[Seen]) -> float | None:
    """Decided connections per second, from the best source this server offers.

    Its ``connections_new`` counter if it has one; else the ``connection_new``
    events seen in the interval, once it has sent any; else its ``requests``
    (one per connection asked about, so decisions by policy or cache are missed).
    """
    if previous is None or current.at <= previous.at:
        return None
    seconds = current.at - previous.at
    now, before = numbers(current.stats), numbers(previous.stats)
    for key in ("connections_new", "requests"):
        if key in now and key in before and (key != "requests" or not events):
            return max(0.0, now[key] - before[key]) / seconds
    return sum(1 for seen in events if previous.at < seen.at <= current.at) / seconds


def _rate(value: float | None) -> str:
    """``…`` before there is an interval to measure."""
    if value is None:
        return "…"
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def _share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole > 0 else "-"


def _traffic(
    stats: Mapping[str, Any], per_second: Mapping[str, float], watching: bool, new_connections: float | None
) -> RenderableType:
    values = numbers(stats)

    def per_s(name: str) -> str:  # "-": a counter this server does not have (or it restarted)
        return _rate(per_second[name]) if name in per_second else "-" if watching else "…"

    # Over the last interval once there is one; since the start before that.
    basis = per_second if watching else values
    grid = Table(title="traffic", title_justify="left", show_header=False, box=None, pad_edge=False)
    for _ in range(2):  # labels never wrap: values give way first on a narrow terminal
        grid.add_column(no_wrap=True, style="dim")
        grid.add_column(min_width=12)
    hits, misses = basis.get("cache_hits", 0.0), basis.get("cache_misses", 0.0)
    grid.add_row(
        "packets/s",
        per_s("captured"),
        "new connections/s",
        _rate(new_connections),
    )
    grid.add_row("cache hit rate", _share(hits, hits + misses), "pending", f"{values.get('pending', 0):,g}")
    for left, right in (("evicted", "bypassed"), ("defaulted", "timeouts")):
        grid.add_row(
            f"{left}/s",
            f"{per_s(left)} (total {values.get(left, 0):,g})",
            f"{right}/s",
            f"{per_s(right)} (total {values.get(right, 0):,g})",
        )
    grid.add_row(
        "requests in flight",
        f"{values.get('in_flight', 0):,g}",
        "waiting for a decider",
        f"{values.get('waiting_for_decider', 0):,g}",
    )
    settled = sum(basis.get(name, 0.0) for name in _OUTCOMES)
    mix = "  ".join(f"{name} {_share(basis.get(name, 0.0), settled)}" for name in _OUTCOMES if name in values)
    span = "last interval" if watching else "since start"
    return Group(grid, Text(f"verdict mix ({span}): {mix or '-'}"))


def _ms(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _deciders(current: Snapshot, previous: Snapshot | None) -> RenderableType:
    clients = client_list(current.stats)
    if not clients:
        return Text("deciders: this server does not report per-client latency or outstanding requests", style="dim")
    before = {entry.get("id"): entry for entry in client_list(previous.stats)} if previous else {}
    seconds = current.at - previous.at if previous else 0.0
    table = Table(title="clients", title_justify="left", pad_edge=False, box=box.SIMPLE_HEAD)
    for heading, justify in (
        ("name", "left"),
        ("role", "left"),
        ("in flight", "right"),
        ("answered/s", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
    ):
        table.add_column(heading, justify=justify)  # type: ignore[arg-type]
    for entry in sorted(clients, key=lambda e: (e.get("role") != "decider", str(e.get("name")))):
        old = before.get(entry.get("id"), {})
        answered = entry.get("answered")
        rate = None
        if isinstance(answered, int) and isinstance(old.get("answered"), int) and seconds > 0:
            rate = max(0, answered - old["answered"]) / seconds
        table.add_row(
            Text(str(entry.get("name") or "(unnamed)")),
            Text(str(entry.get("role", ""))),
            f"{entry.get('in_flight', 0):,}",
            _rate(rate) if rate is not None else "-",
            _ms(entry.get("latency_p50_ms")),
            _ms(entry.get("latency_p99_ms")),
        )
    return table


def _endpoint(ip: Any, port: Any) -> str:
    host = f"[{ip}]" if ":" in str(ip) else str(ip)
    return f"{host}:{port}" if port else host


def _process(event: Mapping[str, Any]) -> str:
    path, pid = event.get("process"), event.get("pid")
    name = os.path.basename(path) if isinstance(path, str) and path else ""
    if name and pid is not None:
        return f"{name} ({pid})"
    return name or (f"pid {pid}" if pid is not None else "-")


def _latest(events: Sequence[Seen], rows: int) -> Table:
    table = Table(title="latest connections", title_justify="left", pad_edge=False, box=box.SIMPLE_HEAD)
    for heading in ("time", "verdict", "by", "process", "dir", "proto", "peer"):
        # Long values (an IPv6 peer, a decider's name) fold; the short ones never break.
        table.add_column(heading, no_wrap=heading in ("time", "dir", "proto"), overflow="fold")
    for seen in list(events)[-rows:][::-1]:
        event = seen.event
        verdict = str(event.get("verdict", "?"))
        by = str(event.get("by", ""))
        if event.get("name"):
            by += f": {event['name']}"
        outbound = event.get("direction") == "outbound"
        peer = _endpoint(event.get("remote_ip"), event.get("remote_port"))
        if not outbound and event.get("local_port"):
            peer += f" → :{event['local_port']}"
        if event.get("to"):
            peer += f" ⇒ {event['to']}"  # where a reroute or redirect sent it
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(seen.wall)),
            Text(
                verdict + ("" if event.get("permanent") else " (once)"),
                style=_VERDICT_STYLE.get(str(event.get("verdict")), "yellow"),
            ),
            Text(by),
            Text(_process(event)),
            "out" if outbound else "in",
            Text(_PROTOCOLS.get(event.get("protocol", -1), str(event.get("protocol", "?")))),
            Text(peer),
        )
    if not events:
        table.caption = "no connection_new events yet"
    return table
