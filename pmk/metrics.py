"""pmk's counters in the Prometheus text format, served from the event loop.

``pmk serve --metrics ADDR:PORT`` answers ``GET /metrics`` with whatever the
server's ``stats()`` says at the moment of the scrape. The HTTP side is a
few lines of asyncio rather than prometheus-client's threaded server, so the
server's state is only ever read on its own event loop. It binds to a
loopback address unless told ``--metrics-public``: the counters tell anyone
who can read them how busy the firewall is and which rules fire.
``pmk stats --format prometheus`` writes the same text from a client, for
node_exporter's textfile collector.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    UnknownMetricFamily,
)

from pmk.errors import UsageError
from pmk.ui.catalog import CLIENT_FIELDS, TEXT_KEYS, Kind, client_list, describe, numbers

log = logging.getLogger(__name__)

PREFIX = "pmk_"
#: A scrape request larger than this, or slower than this, is not a scraper.
_MAX_REQUEST_BYTES = 8192
_REQUEST_SECONDS = 5.0
#: Scrapes served at once; more are turned away, so that a stuck peer costs little.
_MAX_CONNECTIONS = 16

StatsFn = Callable[[], Mapping[str, Any]]


_Family = CounterMetricFamily | GaugeMetricFamily | UnknownMetricFamily


def _family(name: str, kind: Kind, help_text: str, labels: list[str]) -> _Family:
    if kind is Kind.COUNTER:
        return CounterMetricFamily(name, help_text, labels=labels)
    if kind is Kind.GAUGE:
        return GaugeMetricFamily(name, help_text, labels=labels)
    return UnknownMetricFamily(name, help_text, labels=labels)


def _metric_name(key: str, unit: str = "") -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in key)
    name = PREFIX + cleaned
    return f"{name}_{unit}" if unit and not name.endswith(unit) else name


def families(stats: Mapping[str, Any]) -> list[Metric]:
    """One metric family per stats key (counters end in ``_total`` when written)."""
    out: list[Metric] = []
    for key, value in numbers(stats).items():
        stat = describe(key)
        family = _family(_metric_name(key, stat.unit), stat.kind, stat.help, [])
        family.add_metric([], value)
        out.append(family)
    for key, value in stats.items():
        stat = describe(key)
        if isinstance(value, dict) and stat.label:
            family = _family(_metric_name(key), stat.kind, stat.help, [stat.label])
            for label, count in sorted(value.items()):
                if isinstance(count, int | float) and not isinstance(count, bool):
                    family.add_metric([str(label)], count)
            out.append(family)
    text = {key: str(stats[key]) for key in TEXT_KEYS if isinstance(stats.get(key), str)}
    if text:
        info = InfoMetricFamily(PREFIX + "server", "what the server runs on")
        info.add_metric([], text)
        out.append(info)
    out.extend(_client_families(client_list(stats)))
    return out


def _client_families(clients: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per-client gauges and counters, labelled by the client's id, name and role."""
    labels = ["client", "name", "role"]
    for field in CLIENT_FIELDS:
        name = field.key
        unit = ""
        scale = 1.0
        if name.endswith("_ms"):  # exported in seconds, the Prometheus base unit
            name, unit, scale = name[: -len("_ms")], "seconds", 0.001
        family = _family(
            _metric_name("client_" + name, unit), field.kind, field.help.replace("milliseconds", "seconds"), labels
        )
        for entry in clients:
            value = entry.get(field.key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                family.add_metric(
                    [str(entry.get("id", "")), str(entry.get("name", "")), str(entry.get("role", ""))], value * scale
                )
        if family.samples:
            yield family


class StatsCollector:
    """A prometheus-client collector that reads the stats afresh on every scrape."""

    def __init__(self, stats_fn: StatsFn) -> None:
        self.stats_fn = stats_fn

    def collect(self) -> list[Metric]:
        return families(self.stats_fn())


def registry_for(stats_fn: StatsFn) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats_fn))  # type: ignore[arg-type]
    return registry


def exposition(stats: Mapping[str, Any]) -> str:
    """The text format of one stats snapshot (``pmk stats --format prometheus``)."""
    return generate_latest(registry_for(lambda: stats)).decode()


def parse_listen(text: str, public: bool = False) -> tuple[str, int]:
    """``ADDR:PORT`` (``[v6]:PORT`` for IPv6) to a host and port; loopback only unless ``public``.

    Port 0 asks for any free port (the tests use it).
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--metrics {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9477")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--metrics {text!r}: {host!r} is not an IP address") from None
    if not address.is_loopback and not public:
        raise UsageError(f"--metrics {text}: not a loopback address; add --metrics-public to serve it to the network")
    return str(address), int(port_text)


class _MetricsHttp:
    """Answers ``GET /metrics`` with the registry's text, anything else with an error."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.active = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.active >= _MAX_CONNECTIONS:
            writer.close()
            return
        self.active += 1
        try:
            status, content_type, body = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + body)
            await asyncio.wait_for(writer.drain(), _REQUEST_SECONDS)
        except (OSError, TimeoutError):
            pass
        finally:
            self.active -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_SECONDS)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return "400 Bad Request", "text/plain", b"bad request\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3:
            return "400 Bad Request", "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        if target != b"/metrics":
            return "404 Not Found", "text/plain", b"pmk serves /metrics\n"
        try:
            body = generate_latest(self.registry)
        except Exception:  # a stats bug must not take the server down with the scrape
            log.exception("metrics: collecting the stats failed")
            return "500 Internal Server Error", "text/plain", b"collecting the stats failed\n"
        return "200 OK", CONTENT_TYPE_LATEST, body


async def start_metrics(address: str, stats_fn: StatsFn, *, public: bool = False) -> asyncio.Server:
    """Serve ``stats_fn()`` at ``http://ADDR:PORT/metrics`` on the running loop; close the result to stop."""
    host, port = parse_listen(address, public)
    http = _MetricsHttp(registry_for(stats_fn))
    server = await asyncio.start_server(http.handle, host, port, limit=_MAX_REQUEST_BYTES)
    bound = server.sockets[0].getsockname()
    log.info(
        "metrics on http://%s/metrics", f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
    )
    return server
