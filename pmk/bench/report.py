"""The text ``pmk bench`` prints: the table of rows A-F, the ratios, rows O and S."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pmk.bench.scale import scale_report

if TYPE_CHECKING:
    from pmk.bench.runner import Bench, Measure

_ROW_NAMES = {
    "A": "A kernel only",
    "B": "B bare pydivert, batched",
    "B1": "B1 bare pydivert, 1 at a time",
    "C": "C pmk divert, cache hits",
    "F": "F pmk nfqueue, accepted conn",
    "D": "D pmk divert, new conns",
    "Dn": "D' pmk nfqueue, new conns",
    "T": "T pmk divert, new TCP conns",
    "Tn": "T' pmk nfqueue, new TCP conns",
    "E": "E msgpack-RPC echo",
}
_ORDER = ["A", "B", "B1", "C", "F", "D", "Dn", "T", "Tn", "E"]
#: Targets of issue 12, printed next to the figures they judge.
TARGET_E_RATIO = 0.4
TARGET_CPU100K = 2.0
TARGET_ADDED_P99_US = 2000.0
TARGET_OVERLOAD_SHARE = 0.9


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.2f}%" if whole else "-"


def report(bench: Bench) -> str:
    lines = [*_table(bench), "", *_ratios(bench), *_new_connections(bench), *_overload(bench)]
    return "\n".join([*lines, *scale_report(bench)])


def _get(bench: Bench, row: str, workload: str, key: str) -> float | None:
    m = bench.results.get((row, workload))
    return m.get(key) if m else None


def _table(bench: Bench) -> list[str]:
    res = bench.results
    base = {w: res.get(("A", w)) for w in ("lat1k", "new5k")}

    def added(m: Measure, key: str) -> str:
        ref_m = base["new5k"] if m.workload == "new5k" else base["lat1k"]
        value = m.get(key)
        ref = ref_m.get(key) if ref_m and m.row not in ("A", "E") else None
        if value is None:
            return "-"
        return f"{value:.0f}" + (f" ({value - ref:+.0f})" if ref is not None else "")

    header = (
        f"{'row':32} {'workload':11} {'rate':>22} {'lat p50 us (+added)':>20} {'lat p99 us (+added)':>20} "
        f"{'CPU s/100k':>10} {'peak RSS MB':>11} {'bypassed':>9}"
    )
    lines = [header, "-" * len(header)]
    for (row, workload), m in sorted(res.items(), key=lambda kv: (_ORDER.index(kv[0][0]), kv[0][1])):
        if workload == "lat1k":
            continue
        if workload == "tcp":
            rate = f"{_fmt(m.get('gbps'), '.2f')} GB/s {_fmt((m.get('pps') or 0) / 1e3, '.1f')} kpps"
        elif workload == "new5k":
            rate = "5,000 conns/s offered"
        elif row == "E":
            rate = f"{_fmt(m.get('pps'), ',.0f')} req/s"
        elif workload in ("conns", "syns"):
            rate = f"{_fmt(m.get('pps'), ',.0f')} conns/s"
        else:
            rate = f"{_fmt(m.get('pps'), ',.0f')} pkt/s"
        lat50 = added(m, "p50") if workload != "tcp" else "-"
        lat99 = added(m, "p99") if workload != "tcp" else "-"
        rss = res.get((row, "udp")) or res.get((row, "conns"))
        rss_bytes = rss.get("rss") if rss else None
        rss_mb = rss_bytes / 2**20 if rss_bytes else None
        bypassed = rss.get("bypassed") if rss and workload in ("udp", "conns") else None
        lines.append(
            f"{_ROW_NAMES.get(row, row):32} {workload:11} {rate:>22} {lat50:>20} {lat99:>20} "
            f"{_fmt(m.get('cpu100k'), '.2f'):>10} {_fmt(rss_mb, '.1f'):>11} {_fmt(bypassed, '.0f'):>9}"
        )
    return lines


def _ratios(bench: Bench) -> list[str]:
    def get(row: str, workload: str, key: str) -> float | None:
        return _get(bench, row, workload, key)

    return [
        "ratios: "
        f"C/B tcp {_ratio(get('C', 'tcp', 'gbps'), get('B', 'tcp', 'gbps'))}, "
        f"C/B udp {_ratio(get('C', 'udp', 'pps'), get('B', 'udp', 'pps'))}, "
        f"F/A tcp {_ratio(get('F', 'tcp', 'gbps'), get('A', 'tcp', 'gbps'))}, "
        f"F/A udp {_ratio(get('F', 'udp', 'pps'), get('A', 'udp', 'pps'))}, "
        f"D/E {_ratio(get('D', 'conns', 'pps'), get('E', 'pipelined', 'pps'))} "
        f"(D'/E {_ratio(get('Dn', 'conns', 'pps'), get('E', 'pipelined', 'pps'))}, "
        f"D/E one-at-a-time {_ratio(get('D', 'conns', 'pps'), get('E', 'one', 'pps'))})"
    ]


def _new_connections(bench: Bench) -> list[str]:
    """Issue 12 goal 1 per backend: peak / pipelined echo, CPU at the peak, added first-packet p99."""
    lines = []
    echo = _get(bench, "E", "pipelined", "pps")
    base99 = _get(bench, "A", "new5k", "p99")
    for row, backend in (("D", "divert"), ("Dn", "nfqueue")):
        peak = _get(bench, row, "conns", "pps")
        if peak is None:
            continue
        knee = _get(bench, row, "conns", "knee")
        p99 = _get(bench, row, "new5k", "p99")
        added = p99 - base99 if p99 is not None and base99 is not None else None
        lines.append(
            f"new connections {backend}: peak {peak:,.0f}/s decided (followed in full up to "
            f"{_fmt(knee, ',.0f')}/s offered); peak / pipelined echo {_ratio(peak, echo)} "
            f"(target >= {TARGET_E_RATIO}); pmk CPU {_fmt(_get(bench, row, 'conns', 'cpu100k'), '.2f')} s "
            f"per 100k at the peak (target <= {TARGET_CPU100K:g}); first packet at 5,000/s: p99 "
            f"{_fmt(p99, ',.0f')} us, added {_fmt(added, '+,.0f')} us (target < {TARGET_ADDED_P99_US:,.0f})"
        )
    return lines


def _rest(o: dict[str, Any]) -> str:
    """What the counters do not explain (the generator's count against pmk's and the kernel's)."""
    rest = o["sent"] - o["captured"] - o["queue_dropped"] - o["bypassed"]
    return f"{rest:+,} ({_pct(rest, o['sent'])})"


def _conntrack(o: dict[str, Any]) -> str:
    """nfqueue: new flows the kernel dropped or early-dropped for a full conntrack table."""
    if not o.get("conntrack_dropped") and not o.get("conntrack_early_drop"):
        return ""
    return f" (conntrack table full: {o['conntrack_dropped']:,} dropped, {o['conntrack_early_drop']:,} early drops)"


def _runs(o: dict[str, Any]) -> str:
    """Every run's decided rate and bypass, when the shown one is the median of several."""
    rates = o.get("decided_runs", [])
    if len(rates) < 2:
        return ""
    return (
        f", median of {len(rates)} runs: {' / '.join(f'{r:,.0f}' for r in rates)}/s, "
        f"bypassed {' / '.join(f'{b:,}' for b in o['bypassed_runs'])}"
    )


def _overload(bench: Bench) -> list[str]:
    lines = []
    for key in sorted(k for k in bench.extra if k.startswith("O_")):
        o: dict[str, Any] = bench.extra[key]
        backend = key.split("_")[1]
        share = o["decided_pps"] / o["peak"] if o["peak"] else 0.0
        # 2x and 5x: the goal's target, and the share of the 1x run measured like them.
        beside_share = f" (target >= {100 * TARGET_OVERLOAD_SHARE:.0f}%)" if o["factor"] != 1 else ""
        sustained = bench.extra.get(f"O_{backend}_1x")
        if o["factor"] != 1 and sustained and sustained["decided_pps"]:
            beside_share += f", {100 * o['decided_pps'] / sustained['decided_pps']:.0f}% of 1x"
        loss = (
            f"kernel queue dropped {o['kernel_dropped']:,} = {_pct(o['kernel_dropped'], o['sent'])}"
            if backend == "nfqueue"
            else f"bypassed (ringbuf_full) {o['bypassed']:,} = {_pct(o['bypassed'], o['sent'])}"
        )
        lines.append(
            f"overload {backend} {o['factor']}x: offered {o['offered_pps']:,.0f}/s "
            f"({o['offered_pps'] / o['peak']:.1f}x the peak {o['peak']:,.0f}/s) for "
            f"{bench.settings.overload_seconds:g}s: decided {o['decided_pps']:,.0f}/s = {100 * share:.0f}% "
            f"of the peak{beside_share}{_runs(o)}; "
            f"RSS {o['rss_before'] / 2**20:.1f} -> "
            f"{o['rss_after'] / 2**20:.1f} MB (peak {o['peak_rss'] / 2**20:.1f}); {loss} of "
            f"{o['sent']:,} offered; offered = captured {o['captured']:,} + dropped before pmk "
            f"{o['queue_dropped']:,} + bypassed {o['bypassed']:,} {_rest(o)}{_conntrack(o)}; "
            f"evicted {o['evicted']:,}; "
            f"stats identity {'holds' if o['identity_holds'] else 'BROKEN'}"
        )
    return lines
