"""``pmk stats``: a running server's counters, grouped, with rates when watched.

The table is built by ``render`` from plain snapshots, so it is tested
without a server; ``run`` only fetches and prints.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from pmk.errors import PmkError, UsageError
from pmk.ui.catalog import (
    CLIENT_FIELDS,
    STATS,
    TEXT_KEYS,
    Kind,
    StatGroup,
    client_list,
    describe,
    numbers,
    rates,
)

FORMATS = ("table", "json", "prometheus")


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    stats = commands.add_parser("stats", help="print a running server's counters")
    stats.add_argument("--pipe", default=None, help="endpoint path (default: $PMK_PIPE or the platform default)")
    stats.add_argument("--format", choices=FORMATS, default="table", help="prometheus: for node_exporter's textfile")
    stats.add_argument("--json", action="store_true", help="same as --format json")
    stats.add_argument(
        "--watch", type=float, metavar="SECONDS", default=None, help="repeat every SECONDS, with per-second rates"
    )
    stats.add_argument("--output", metavar="FILE", default=None, help="write to FILE (replaced atomically) not stdout")


def run(args: argparse.Namespace) -> int:
    from pmk.loop import run as run_loop

    fmt = "json" if args.json else args.format
    if args.watch is not None and args.watch <= 0:
        raise UsageError("--watch: SECONDS must be positive")
    try:
        return run_loop(_stats_loop(args.pipe, fmt, args.watch, args.output))
    except KeyboardInterrupt:
        return 0


async def _stats_loop(path: str | None, fmt: str, watch: float | None, output: str | None) -> int:
    from pmk.client import Client, ConnectionClosed, RemoteError

    try:
        client = await Client.connect(path)
    except OSError as error:
        raise PmkError(f"cannot reach pmk at {path or 'the default endpoint'}: {error}") from None
    console = Console(file=sys.stdout)
    previous: dict[str, Any] | None = None
    taken = 0.0
    try:
        while True:
            try:
                stats = await client.call("get_stats")
            except (ConnectionClosed, RemoteError) as error:
                raise PmkError(f"get_stats failed: {error}") from None
            now = time.monotonic()
            text = _format(stats, fmt, previous, now - taken, one_line=watch is not None)
            if output is not None:
                _write_atomically(output, text if isinstance(text, str) else _plain(text))
            elif isinstance(text, str):
                sys.stdout.write(text)
                sys.stdout.flush()
            else:
                if watch is not None and console.is_terminal:
                    console.clear()
                console.print(text)
            if watch is None:
                return 0
            previous, taken = stats, now
            await asyncio.sleep(watch)
    finally:
        client.close()


def _format(
    stats: dict[str, Any], fmt: str, previous: dict[str, Any] | None, seconds: float, one_line: bool = False
) -> str | RenderableType:
    """The text (json, prometheus) or table of one snapshot; ``one_line``: JSON lines when watching."""
    if fmt == "json":
        return json.dumps(stats, sort_keys=True, indent=None if one_line else 2) + "\n"
    if fmt == "prometheus":
        from pmk.metrics import exposition

        return exposition(stats)
    return render(stats, previous, seconds)


def _plain(renderable: RenderableType) -> str:
    console = Console(width=120, file=io.StringIO())
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _write_atomically(path: str, text: str) -> None:
    """Replace ``path`` in one step, so a collector never reads half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".pmk-stats-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.1f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def render(stats: Mapping[str, Any], previous: Mapping[str, Any] | None = None, seconds: float = 0.0) -> RenderableType:
    """The grouped table of one snapshot; rates per second against ``previous`` when given."""
    per_second = rates(stats, previous, seconds)
    watching = previous is not None
    title = " · ".join(
        ["pmk"]
        + [f"{stats[key]} {key}" for key in TEXT_KEYS if isinstance(stats.get(key), str)]
        + ([f"rates over {seconds:.1f}s"] if watching else [])
    )
    table = Table(title=Text(title), title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("stat")
    table.add_column("value", justify="right")
    if watching:
        table.add_column("per s", justify="right")
    table.add_column("", style="dim")  # counter or gauge
    table.add_column("meaning", style="dim", overflow="fold")
    rows: dict[StatGroup, list[list[str]]] = {}
    for key, value in numbers(stats).items():
        stat = describe(key)
        kind = {Kind.COUNTER: "total", Kind.GAUGE: "now"}.get(stat.kind, "")
        row = [key, _number(value)]
        if watching:
            row.append(_rate(per_second[key]) if key in per_second else "")
        rows.setdefault(stat.group, []).append([*row, kind, stat.help])
    for key, value in stats.items():
        stat = describe(key)
        if isinstance(value, dict) and stat.label:
            for label, count in sorted(value.items()):
                row = [f"{key}[{label}]", _number(count)]
                if watching:
                    old = previous.get(key) if previous else None
                    before = old.get(label) if isinstance(old, dict) else None
                    row.append(_rate((count - before) / seconds) if isinstance(before, int) and seconds > 0 else "")
                rows.setdefault(stat.group, []).append([*row, "total", f"{stat.help}: {label}"])
    order = {stat_group: index for index, stat_group in enumerate(StatGroup)}
    for stat_group in sorted(rows, key=order.__getitem__):
        table.add_row(Text(stat_group.value.capitalize(), style="bold"), end_section=False)
        for row in _in_catalog_order(rows[stat_group]):
            table.add_row(*(Text(cell) for cell in row))  # Text: "policy_hits[ssh]" is not markup
        table.add_section()
    return Group(table, _clients_table(stats))


def _in_catalog_order(rows: list[list[str]]) -> list[list[str]]:
    """Known keys as the catalog lists them, then the rest by name."""
    position = {stat.key: index for index, stat in enumerate(STATS)}
    return sorted(rows, key=lambda row: (position.get(row[0].split("[")[0], len(position)), row[0]))


def _clients_table(stats: Mapping[str, Any]) -> RenderableType:
    clients = client_list(stats)
    if not clients:
        return Text("connected clients: this server does not list them", style="dim")
    table = Table(title="connected clients", title_justify="left", show_edge=False, pad_edge=False)
    for heading in ("id", "name", "role"):
        table.add_column(heading)
    fields = [field for field in CLIENT_FIELDS if any(field.key in entry for entry in clients)]
    for field in fields:
        table.add_column(field.key.replace("_", " "), justify="right")
    for entry in sorted(clients, key=lambda e: (e.get("role") != "decider", str(e.get("name")), str(e.get("id")))):
        cells = [str(entry.get("id", "")), str(entry.get("name", "")) or "(unnamed)", str(entry.get("role", ""))]
        for field in fields:
            value = entry.get(field.key)
            cells.append(_number(value) if isinstance(value, int | float) and not isinstance(value, bool) else "-")
        table.add_row(*(Text(cell) for cell in cells))
    return table
