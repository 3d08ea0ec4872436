"""The Prometheus exporter: names, types, labels, and a real scrape over loopback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pmk.errors import UsageError
from pmk.metrics import exposition, parse_listen, start_metrics

SNAPSHOT: dict[str, Any] = {
    "captured": 10,
    "accepted": 6,
    "blocked": 2,
    "dropped": 1,
    "evicted": 0,
    "pending": 1,
    "cache_hits": 7,
    "default_no_decider": 3,
    "divert_ringbuf_full": 0,
    "deciders": 1,
    "clients": 2,
    "uptime": 12.5,
    "backend": "nfqueue",
    "policy_hits": {"dns": 4, "default": 1},
    "brand_new_key": 9,
    "client_list": [
        {"id": 3, "name": "blocklist", "role": "decider", "in_flight": 2, "latency_p50_ms": 1.5, "latency_p99_ms": 8},
        {"id": 4, "name": "top", "role": "observer", "in_flight": 0},
    ],
}


def parsed(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], family: str, metric: str, **labels: str) -> float:
    for s in families[family].samples:
        if s.name == metric and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    raise AssertionError(f"no sample {metric} {labels} in {families[family].samples}")


def test_counters_end_in_total_and_gauges_do_not() -> None:
    families = parsed(exposition(SNAPSHOT))
    assert families["pmk_captured"].type == "counter"
    assert sample(families, "pmk_captured", "pmk_captured_total") == 10
    assert sample(families, "pmk_default_no_decider", "pmk_default_no_decider_total") == 3
    assert families["pmk_pending"].type == "gauge"
    assert sample(families, "pmk_pending", "pmk_pending") == 1
    assert families["pmk_clients"].type == "gauge"
    assert sample(families, "pmk_uptime_seconds", "pmk_uptime_seconds") == 12.5
    assert all(name.startswith("pmk_") for name in families)


def test_unknown_keys_are_untyped_and_maps_become_labels() -> None:
    families = parsed(exposition(SNAPSHOT))
    assert families["pmk_brand_new_key"].type == "unknown"  # the parser's name for untyped
    assert sample(families, "pmk_policy_hits", "pmk_policy_hits_total", rule="dns") == 4
    assert sample(families, "pmk_server_info", "pmk_server_info", backend="nfqueue") == 1


def test_clients_are_labelled_and_latency_is_in_seconds() -> None:
    families = parsed(exposition(SNAPSHOT))
    assert sample(families, "pmk_client_in_flight", "pmk_client_in_flight", name="blocklist", role="decider") == 2
    assert sample(families, "pmk_client_in_flight", "pmk_client_in_flight", name="top", client="4") == 0
    p99 = sample(families, "pmk_client_latency_p99_seconds", "pmk_client_latency_p99_seconds", name="blocklist")
    assert p99 == pytest.approx(0.008)
    # the observer has no latency: no sample rather than a made-up zero
    assert [s.labels["name"] for s in families["pmk_client_latency_p50_seconds"].samples] == ["blocklist"]


def test_listen_address_is_loopback_unless_public() -> None:
    assert parse_listen("127.0.0.1:9477") == ("127.0.0.1", 9477)
    assert parse_listen("[::1]:9477") == ("::1", 9477)
    assert parse_listen("localhost:1") == ("127.0.0.1", 1)
    with pytest.raises(UsageError, match="--metrics-public"):
        parse_listen("0.0.0.0:9477")
    assert parse_listen("0.0.0.0:9477", public=True) == ("0.0.0.0", 9477)
    for bad in ("9477", "127.0.0.1:http", "127.0.0.1:70000", "example.org:9477"):
        with pytest.raises(UsageError):
            parse_listen(bad)


async def _get(port: int, request: bytes) -> tuple[str, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode().split("\r\n")[0], body


async def test_scrape_over_loopback_reads_the_stats_at_scrape_time() -> None:
    stats = dict(SNAPSHOT)
    server = await start_metrics("127.0.0.1:0", lambda: stats)
    port = server.sockets[0].getsockname()[1]
    try:
        status, body = await _get(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert sample(parsed(body.decode()), "pmk_captured", "pmk_captured_total") == 10
        stats["captured"] = 11
        _, body = await _get(port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert sample(parsed(body.decode()), "pmk_captured", "pmk_captured_total") == 11
        assert (await _get(port, b"GET / HTTP/1.1\r\n\r\n"))[0].startswith("HTTP/1.1 404")
        assert (await _get(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].startswith("HTTP/1.1 405")
        assert (await _get(port, b"nonsense\r\n\r\n"))[0].startswith("HTTP/1.1 400")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_failing_stats_function_answers_500_and_the_server_keeps_serving() -> None:
    calls = []

    def stats() -> dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return SNAPSHOT

    server = await start_metrics("127.0.0.1:0", stats)
    port = server.sockets[0].getsockname()[1]
    try:
        assert (await _get(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0].startswith("HTTP/1.1 500")
        assert (await _get(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 200 OK"
    finally:
        server.close()
        await server.wait_closed()


async def test_idle_connections_are_bounded_and_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    import pmk.metrics

    monkeypatch.setattr(pmk.metrics, "_REQUEST_SECONDS", 0.5)
    server = await start_metrics("127.0.0.1:0", lambda: SNAPSHOT)
    port = server.sockets[0].getsockname()[1]
    try:
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(pmk.metrics._MAX_CONNECTIONS)]
        await asyncio.sleep(0.1)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 0.4) == b""  # turned away at once
        writer.close()
        # the idle ones are cut off after the request timeout, and scrapes work again
        for idle_reader, idle_writer in idle:
            assert await asyncio.wait_for(idle_reader.read(), 2) == b""
            idle_writer.close()
        assert (await _get(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == "HTTP/1.1 200 OK"
    finally:
        server.close()
        await server.wait_closed()
