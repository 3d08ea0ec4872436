"""What a person reads in ``pmk stats`` and ``pmk top``, from plain snapshots (rich's recording console)."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console, RenderableType

from pmk.ui import stats_view
from pmk.ui.catalog import Kind, StatGroup, describe, rates
from pmk.ui.top import Seen, Snapshot, render

BASE: dict[str, Any] = {
    "captured": 1000,
    "accepted": 900,
    "blocked": 50,
    "dropped": 40,
    "rerouted": 0,
    "evicted": 5,
    "pending": 5,
    "cache_hits": 800,
    "cache_misses": 200,
    "requests": 150,
    "timeouts": 2,
    "defaulted": 3,
    "bypassed": 0,
    "in_flight": 4,
    "waiting_for_decider": 0,
    "deciders": 1,
    "clients": 2,
    "default_timeout": 2,
    "policy_hits": {"ssh": 1, "default": 2},
    "backend": "nfqueue",
    "uptime": 75.0,
    "brand_new_key": 7,
}


def later(**changes: Any) -> dict[str, Any]:
    stats = dict(BASE)
    stats.update(changes)
    return stats


def text_of(renderable: RenderableType, width: int = 140) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(renderable)
    return console.export_text()


def row(text: str, name: str) -> list[str]:
    """The cells of the table row that starts with ``name``."""
    for line in text.splitlines():
        cells = [cell for cell in re.split(r"\s*│\s*|\s{2,}", line.strip()) if cell]
        if cells and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{text}")


# -- the table of keys --------------------------------------------------------------


def test_catalog_kinds_and_groups() -> None:
    assert describe("captured").kind is Kind.COUNTER
    assert describe("pending").kind is Kind.GAUGE
    assert describe("default_no_decider").group is StatGroup.POLICY
    assert describe("divert_ringbuf_full").kind is Kind.COUNTER
    assert describe("brand_new_key").kind is Kind.UNTYPED


def test_rates_are_for_counters_only_and_skip_a_restart() -> None:
    now = later(captured=1500, pending=50, brand_new_key=100, accepted=10)
    per_second = rates(now, BASE, 2.0)
    assert per_second["captured"] == 250
    assert "pending" not in per_second  # a gauge has no rate
    assert "brand_new_key" not in per_second  # nor a number nobody described
    assert "accepted" not in per_second  # went down: the server restarted


# -- pmk stats ----------------------------------------------------------------------


def test_stats_groups_rows_under_their_heading() -> None:
    text = text_of(stats_view.render(BASE))
    lines = [line.strip() for line in text.splitlines()]
    headings = ["Packets", "Cache", "Requests", "Clients", "Policy", "Server", "Other"]
    positions = [next(i for i, line in enumerate(lines) if line.split(" ")[0] == h) for h in headings]
    assert positions == sorted(positions)
    assert positions[0] < next(i for i, line in enumerate(lines) if line.startswith("captured"))
    assert row(text, "captured")[1:3] == ["1,000", "total"]
    assert row(text, "pending")[1:3] == ["5", "now"]
    assert row(text, "policy_hits[ssh]")[1] == "1"
    assert "nfqueue backend" in text.splitlines()[0] or "nfqueue" in text.splitlines()[0]
    assert "per s" not in text  # no rates without a previous snapshot


def test_stats_watch_shows_per_second_rates() -> None:
    now = later(captured=1600, cache_hits=1100, pending=9, policy_hits={"ssh": 5, "default": 2})
    text = text_of(stats_view.render(now, BASE, 2.0))
    assert "per s" in text
    assert row(text, "captured")[1:3] == ["1,600", "300"]
    assert row(text, "cache_hits")[1:3] == ["1,100", "150"]
    assert row(text, "pending")[1:3] == ["9", "now"]  # a gauge: no rate
    assert row(text, "policy_hits[ssh]")[1:3] == ["5", "2.0"]


def test_stats_lists_connected_clients_when_the_server_reports_them() -> None:
    assert "does not list them" in text_of(stats_view.render(BASE))
    stats = later(
        client_list=[
            {"id": 7, "name": "top", "role": "observer", "in_flight": 0},
            {"id": 3, "name": "blocklist", "role": "decider", "in_flight": 2, "latency_p99_ms": 4.5},
        ]
    )
    text = text_of(stats_view.render(stats))
    blocklist = row(text, "3")
    assert blocklist[1:4] == ["blocklist", "decider", "2"]
    assert blocklist[-1] == "4.5"
    assert row(text, "7")[1:3] == ["top", "observer"]
    assert text.index("blocklist") < text.index("observer")  # deciders first


def test_stats_prometheus_and_json_formats() -> None:
    assert "pmk_captured_total 1000.0" in stats_view._format(BASE, "prometheus", None, 0)
    assert stats_view._format(BASE, "json", None, 0).startswith('{\n  "accepted": 900')
    assert stats_view._format(BASE, "json", None, 0, one_line=True).startswith('{"accepted": 900')


def test_output_file_is_replaced_whole(tmp_path: Any) -> None:
    target = tmp_path / "pmk.prom"
    target.write_text("old")
    stats_view._write_atomically(str(target), "pmk_captured_total 1\n")
    assert target.read_text() == "pmk_captured_total 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pmk.prom"]


# -- pmk top ------------------------------------------------------------------------


def event(**fields: Any) -> dict[str, Any]:
    base = {
        "id": 1,
        "direction": "outbound",
        "ip_version": 4,
        "protocol": 6,
        "local_ip": "198.18.0.1",
        "local_port": 40000,
        "remote_ip": "198.18.0.2",
        "remote_port": 443,
        "pid": 4242,
        "process": "/usr/bin/curl",
        "uid": 1000,
        "verdict": "accept",
        "permanent": True,
        "by": "decider",
        "name": "blocklist",
    }
    base.update(fields)
    return base


def test_top_first_screen_has_totals_and_no_rates_yet() -> None:
    text = text_of(render(Snapshot(BASE, 10.0), None, []))
    assert text.startswith("pmk top · nfqueue backend · up 1m15s · 2 clients (1 deciding)")
    assert re.search(r"packets/s\s+…", text)
    assert "verdict mix (since start): accepted 90.9%  blocked 5.1%  dropped 4.0%  rerouted 0.0%" in text
    assert re.search(r"cache hit rate\s+80\.0%", text)
    assert "no connection_new events yet" in text
    assert "does not report per-client latency" in text


def test_top_rates_mix_and_cache_over_the_interval() -> None:
    now = later(captured=3000, accepted=2400, blocked=50 + 400, dropped=40 + 100, cache_hits=1700, cache_misses=300)
    text = text_of(render(Snapshot(now, 12.0), Snapshot(BASE, 10.0), []))
    assert re.search(r"packets/s\s+1,000", text)
    # 1500 accepted, 400 blocked, 100 dropped in the interval
    assert "verdict mix (last interval): accepted 75.0%  blocked 20.0%  dropped 5.0%  rerouted 0.0%" in text
    assert re.search(r"cache hit rate\s+90\.0%", text)  # 900 hits of 1000 lookups
    assert re.search(r"pending\s+5", text)
    assert re.search(r"evicted/s\s+0\.0 \(total 5\)", text)


def test_top_new_connections_from_events_or_the_counter() -> None:
    seen = [Seen(event(id=i), 10.5 + i * 0.1, 0.0) for i in range(6)] + [Seen(event(), 9.0, 0.0)]
    text = text_of(render(Snapshot(later(requests=170), 12.0), Snapshot(BASE, 10.0), seen))
    assert re.search(r"new connections/s\s+3\.0", text)  # 6 events in 2 seconds; the older one not
    # a server that sends no events: its decide requests, one per connection asked about
    text = text_of(render(Snapshot(later(requests=170), 12.0), Snapshot(BASE, 10.0), []))
    assert re.search(r"new connections/s\s+10\.0", text)
    counted = render(Snapshot(later(connections_new=50), 12.0), Snapshot(later(connections_new=10), 10.0), seen)
    assert re.search(r"new connections/s\s+20\.0", text_of(counted))


def test_top_lists_latest_connections_newest_first() -> None:
    seen = [
        Seen(event(remote_port=80), 1.0, 0.0),
        Seen(event(verdict="block", permanent=False, by="policy", name="default", process=None, pid=None), 2.0, 0.0),
        Seen(
            event(
                direction="inbound",
                protocol=17,
                local_port=53,
                remote_ip="fd00::2",
                remote_port=5353,
                by="cache",
                name="",
            ),
            3.0,
            0.0,
        ),
    ]
    text = text_of(render(Snapshot(BASE, 10.0), None, seen, rows=10))
    lines = [line for line in text.splitlines() if re.search(r"\d\d:\d\d:\d\d", line)]
    assert len(lines) == 3
    assert "udp" in lines[0] and "[fd00::2]:5353 → :53" in lines[0] and "in " in lines[0]
    assert "block (once)" in lines[1] and "policy: default" in lines[1] and " - " in lines[1]
    assert "curl (4242)" in lines[2] and "decider: blocklist" in lines[2] and "198.18.0.2:80" in lines[2]
    assert (
        len(
            [
                line
                for line in text_of(render(Snapshot(BASE, 10.0), None, seen, rows=2)).splitlines()
                if re.search(r"\d\d:\d\d:\d\d", line)
            ]
        )
        == 2
    )


def test_top_shows_deciders_latency_and_outstanding() -> None:
    clients = [
        {
            "id": 1,
            "name": "blocklist",
            "role": "decider",
            "in_flight": 7,
            "answered": 100,
            "latency_p50_ms": 0.8,
            "latency_p99_ms": 12.25,
        },
        {"id": 2, "name": "pmk top", "role": "observer", "in_flight": 0},
    ]
    before = later(client_list=clients)
    now_clients = [dict(clients[0], answered=300), clients[1]]
    text = text_of(render(Snapshot(later(client_list=now_clients), 12.0), Snapshot(before, 10.0), []))
    cells = row(text, "blocklist")
    assert cells == ["blocklist", "decider", "7", "100", "0.8", "12.2"]
    assert row(text, "pmk top")[1:3] == ["observer", "0"]


def test_top_fits_an_80_column_terminal_without_wrapping_labels() -> None:
    text = text_of(render(Snapshot(BASE, 10.0), None, [Seen(event(), 1.0, 0.0)]), width=80)
    assert max(len(line) for line in text.splitlines()) <= 80
    for label in ("packets/s", "new connections/s", "requests in flight", "waiting for a decider", "cache hit rate"):
        assert label in text
    assert "curl (4242)" in text


def test_the_views_read_the_client_list_a_real_service_reports() -> None:
    """What pmk.core's get_stats says about clients is what the stats and top screens show."""
    from pmk.core import commands as cmd
    from pmk.core import events as ev
    from tests.test_service import hello, of, packet, service

    svc = service()
    svc.handle_all([ev.ClientJoined(1, pid=900, uid=0), ev.ClientJoined(2), hello(1, name="judge")], now=0.0)
    svc.handle(hello(2, role="observer", name="watch"), now=0.0)
    for n, decide in enumerate(of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1), packet(2)]), now=0.0))):
        svc.handle(ev.DecideAnswered(1, decide.msgid, None, {"verdict": "accept"}), now=0.002 * (n + 1))
    before = svc.stats(now=1.0)
    svc.handle(
        ev.DecideAnswered(
            1,
            of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(3)]), now=1.0))[0].msgid,
            None,
            {"verdict": "accept"},
        ),
        now=1.004,
    )
    after = svc.stats(now=2.0)
    assert row(text_of(stats_view.render(after)), "1")[1:4] == ["judge", "decider", "0"]
    cells = row(text_of(render(Snapshot(after, 2.0), Snapshot(before, 1.0), [])), "judge")
    assert cells == ["judge", "decider", "0", "1.0", "4.0", "4.0"]  # answered/s, p50, p99
    assert row(text_of(stats_view.render(after)), "2")[1:3] == ["watch", "observer"]
