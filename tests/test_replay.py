"""``pmk replay``: a generated capture through the real server to real deciders.

Nothing here needs root or a network: the capture files are written by the
tests (dpkt), pmk listens on a socket in the test's own directory. Addresses
are documentation ranges; they only ever exist inside the files.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmk.capture.base import CapturedPacket
from pmk.capture.replay import Directions, ReplayBackend, ip_packet
from pmk.client import Client, Decision
from pmk.packet.parse import parse_flow
from pmk.verdicts import Verdict
from tests.packets import ACK, FIN, SYN, tcp, udp

REPO = Path(__file__).resolve().parent.parent
LOCAL4, LOCAL6 = "192.0.2.10", "2001:db8::10"
LOCAL_ARGS = ["--local", "192.0.2.0/24", "--local", f"{LOCAL6}/128"]
BLOCKLIST = "port 23\n203.0.113.66\n2001:db8:bad::/48\n"
MAC_LOCAL, MAC_ROUTER = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"


@dataclass(frozen=True)
class Frame:
    """One packet of the generated capture and what the block list makes of it."""

    ip: bytes  # the IP packet, or b"" for the non-IP frame
    conn: str  # connection label
    outbound: bool
    blocked: bool  # by BLOCKLIST
    local: bool = True  # False: neither side is this host's


def tcp_conversation(conn: str, local: str, lport: int, remote: str, rport: int, *, blocked: bool) -> list[Frame]:
    """Handshake, a request and an answer, and the close, opened by this host."""
    out = [(SYN, b""), (ACK, b""), (ACK, b"GET / HTTP/1.0\r\n\r\n"), (FIN | ACK, b"")]
    back = [(SYN | ACK, b""), (ACK, b"HTTP/1.0 200 OK\r\n\r\n"), (FIN | ACK, b"")]
    frames = []
    for index, (flags, data) in enumerate([out[0], back[0], out[1], out[2], back[1], out[3], back[2]]):
        outbound = index in (0, 2, 3, 5)
        src, sport, dst, dport = (local, lport, remote, rport) if outbound else (remote, rport, local, lport)
        frames.append(Frame(tcp(src, dst, sport, dport, flags=flags, data=data), conn, outbound, blocked))
    return frames


def traffic() -> list[Frame]:
    """A few connections of each kind, interleaved, with one non-IP and one foreign frame."""
    conversations = [
        tcp_conversation("web4", LOCAL4, 40001, "203.0.113.5", 443, blocked=False),
        # A SYN and its retransmission, both refused.
        [Frame(tcp(LOCAL4, "203.0.113.9", 40002, 23), "telnet", True, True)] * 2,
        tcp_conversation("web6", LOCAL6, 40003, "2001:db8:1::5", 80, blocked=False),
        [
            Frame(udp(LOCAL4, "198.51.100.53", 5353, 53, b"query"), "dns4", True, False),
            Frame(udp("198.51.100.53", LOCAL4, 53, 5353, b"answer"), "dns4", False, False),
        ],
        [Frame(udp(LOCAL4, "203.0.113.66", 5354, 53, b"query"), "dns-bad4", True, True)],
        [
            Frame(udp(LOCAL6, "2001:db8:bad::1", 5355, 53, b"query"), "dns-bad6", True, True),
            Frame(udp("2001:db8:bad::1", LOCAL6, 53, 5355, b"answer"), "dns-bad6", False, True),
        ],
        # Inbound: a peer connects to this host's port 22.
        [
            Frame(tcp("198.51.100.7", LOCAL4, 50000, 22, flags=SYN), "ssh-in", False, False),
            Frame(tcp(LOCAL4, "198.51.100.7", 22, 50000, flags=SYN | ACK), "ssh-in", True, False),
            Frame(tcp("198.51.100.7", LOCAL4, 50000, 22, flags=ACK), "ssh-in", False, False),
        ],
        [Frame(b"", "arp", False, False)],
        [Frame(udp("198.51.100.1", "198.51.100.2", 4000, 4001), "foreign", True, False, local=False)],
    ]
    frames: list[Frame] = []
    for step in range(max(len(c) for c in conversations)):
        frames.extend(c[step] for c in conversations if step < len(c))
    return frames


ARP = bytes(dpkt.arp.ARP())


def ethernet(frame: Frame) -> bytes:
    if not frame.ip:
        return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=MAC_LOCAL, type=0x0806, data=ARP))
    ethertype = 0x0800 if frame.ip[0] >> 4 == 4 else 0x86DD
    src, dst = (MAC_LOCAL, MAC_ROUTER) if frame.outbound else (MAC_ROUTER, MAC_LOCAL)
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=ethertype, data=frame.ip))


def linux_cooked(frame: Frame) -> bytes:
    """An SLL header: packet type (0 to us, 4 outgoing), ARPHRD_ETHER, address, protocol."""
    protocol = 0x0806 if not frame.ip else 0x0800 if frame.ip[0] >> 4 == 4 else 0x86DD
    header = (4 if frame.outbound else 0).to_bytes(2, "big") + (1).to_bytes(2, "big") + (6).to_bytes(2, "big")
    header += MAC_LOCAL + b"\0\0" + protocol.to_bytes(2, "big")
    return header + (frame.ip or ARP)


def write_pcap(path: Path, frames: Sequence[Frame]) -> list[bytes]:
    """A pcap file with Ethernet frames; returns the frames as written."""
    written = [ethernet(frame) for frame in frames]
    with open(path, "wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_EN10MB)
        for index, data in enumerate(written):
            writer.writepkt(data, ts=1_700_000_000 + index / 1000)
    return written


def write_pcapng(path: Path, frames: Sequence[Frame]) -> None:
    with open(path, "wb") as f:
        writer = dpkt.pcapng.Writer(f, linktype=dpkt.pcap.DLT_LINUX_SLL)
        for index, frame in enumerate(frames):
            writer.writepkt(linux_cooked(frame), ts=1_700_000_000 + index / 1000)


def read_pcap(path: Path) -> tuple[int, list[tuple[float, bytes]]]:
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        return reader.datalink(), list(reader)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory (mode 0700, as pmk wants an endpoint's directory)."""
    directory = Path(tempfile.mkdtemp(prefix="pmk-replay-test-"))
    directory.chmod(0o700)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def identity_holds(stats: dict) -> bool:  # type: ignore[type-arg]
    settled = stats["accepted"] + stats["blocked"] + stats["dropped"] + stats.get("rerouted", 0) + stats["evicted"]
    return stats["captured"] == settled + stats["pending"]


async def start_replay(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pmk", "replay", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
    )


async def finish(proc: asyncio.subprocess.Process, timeout: float = 60) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def connect_when_listening(path: Path, decide: object, timeout: float = 20) -> Client:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            client = await Client.connect(str(path), decide)  # type: ignore[arg-type]
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
        else:
            await client.hello("test", "decider")
            return client


# -- the command, end to end -----------------------------------------------


async def test_blocklist_example_decides_a_pcap_and_accepted_packets_are_written(workdir: Path) -> None:
    frames = traffic()
    written = write_pcap(workdir / "in.pcap", frames)
    (workdir / "rules").write_text(BLOCKLIST)
    sock = workdir / "replay.sock"
    replay = await start_replay(
        str(workdir / "in.pcap"),
        *LOCAL_ARGS,
        "--pipe",
        str(sock),
        "--write-accepted",
        str(workdir / "out.pcap"),
        "--json",
    )
    example = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "examples" / "blocklist.py"), str(workdir / "rules"), "--pipe", str(sock),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        status, out, err = await finish(replay)
    finally:
        if example.returncode is None:
            example.terminate()
        _, example_err = await example.communicate()
    assert status == 0, err + example_err.decode()
    report = json.loads(out)
    summary, stats = report["summary"], report["stats"]
    decided = [f for f in frames if f.ip and f.local]
    accepted = [f for f in decided if not f.blocked]
    assert summary["frames"] == len(frames)
    assert summary["not_ip"] == 1 and summary["not_local"] == 1
    assert summary["packets"] == len(decided) == stats["captured"]
    assert summary["accept"] == len(accepted) == stats["accepted"]
    assert summary["block"] == len(decided) - len(accepted) == stats["blocked"]
    assert summary["drop"] == 0 and stats["dropped"] == 0 and stats["evicted"] == 0
    assert stats["defaulted"] == 0 and stats["pending"] == 0 and identity_holds(stats)
    # Permanent verdicts: one request per connection.
    assert stats["requests"] == len({f.conn for f in decided})
    assert stats["backend"] == "replay" and stats["deciders"] == 1
    # Exactly the accepted frames, in input order, with their link type and timestamps.
    link_type, records = read_pcap(workdir / "out.pcap")
    assert link_type == dpkt.pcap.DLT_EN10MB
    expected = [
        (1_700_000_000 + i / 1000, data)
        for i, (f, data) in enumerate(zip(frames, written, strict=True))
        if f in accepted
    ]
    assert [data for _, data in records] == [data for _, data in expected]
    assert [round(ts, 3) for ts, _ in records] == [round(ts, 3) for ts, _ in expected]
    assert summary["written"] == stats["replay_written"] == len(accepted)
    assert not sock.exists(), "the endpoint is removed at the end"


async def test_pcapng_without_local_asks_per_packet_and_takes_the_opener_as_this_host(workdir: Path) -> None:
    frames = traffic()
    write_pcapng(workdir / "in.pcapng", frames)
    sock = workdir / "replay.sock"
    replay = await start_replay(
        str(workdir / "in.pcapng"), "--pipe", str(sock), "--json", "--write-accepted", str(workdir / "out.pcap")
    )
    seen: list[dict] = []  # type: ignore[type-arg]

    def decide(info: dict) -> Decision:  # type: ignore[type-arg]
        seen.append(info)
        # Temporary verdicts: every packet is asked about.
        return Decision("drop" if info["remote_port"] == 23 else "accept")

    client = await connect_when_listening(sock, decide)
    try:
        status, out, err = await finish(replay)
    finally:
        client.close()
    assert status == 0, err
    report = json.loads(out)
    summary, stats = report["summary"], report["stats"]
    ip_frames = [f for f in frames if f.ip]
    assert summary["not_ip"] == 1 and summary["not_local"] == 0 and summary["packets"] == len(ip_frames)
    assert len(seen) == stats["requests"] == len(ip_frames)
    assert summary["drop"] == stats["dropped"] == 2 and summary["accept"] == len(ip_frames) - 2
    assert identity_holds(stats) and stats["defaulted"] == 0
    link_type, records = read_pcap(workdir / "out.pcap")
    assert link_type == dpkt.pcap.DLT_LINUX_SLL
    assert [data for _, data in records] == [linux_cooked(f) for f in ip_frames if f.conn != "telnet"]
    # The opener is local: right for outbound connections, the peer for the inbound one.
    conn_by_ports = {}
    for frame in ip_frames:
        flow = parse_flow(frame.ip)
        assert flow is not None
        conn_by_ports[frozenset((flow.src_port, flow.dst_port))] = frame.conn
    views: dict[str, set[tuple[str, str]]] = {}
    for info in seen:
        conn = conn_by_ports[frozenset((info["local_port"], info["remote_port"]))]
        views.setdefault(conn, set()).add((info["local_ip"], info["direction"]))
    assert views["web4"] == {(LOCAL4, "outbound"), (LOCAL4, "inbound")}
    assert views["web6"] == {(LOCAL6, "outbound"), (LOCAL6, "inbound")}
    assert {ip for ip, _ in views["ssh-in"]} == {"198.51.100.7"}


async def test_without_deciders_the_fallback_decides_and_nothing_is_evicted(workdir: Path) -> None:
    frames = traffic()
    write_pcap(workdir / "in.pcap", frames)
    sock = workdir / "replay.sock"
    proc = await start_replay(
        str(workdir / "in.pcap"), *LOCAL_ARGS, "--pipe", str(sock), "--wait-deciders", "0",
        "--default-verdict", "drop", "--packet-cache", "2", "--json",
    )  # fmt: skip
    status, out, err = await finish(proc)
    assert status == 0, err
    report = json.loads(out)
    stats = report["stats"]
    decided = len([f for f in frames if f.ip and f.local])
    assert report["summary"]["drop"] == stats["dropped"] == stats["defaulted"] == decided
    assert stats["evicted"] == 0 and identity_holds(stats)


async def test_a_slow_decider_and_a_small_packet_cache_evict_nothing(workdir: Path) -> None:
    frames = [Frame(udp(LOCAL4, "198.51.100.53", 20000 + n, 53, b"q"), f"u{n}", True, False) for n in range(300)]
    write_pcap(workdir / "in.pcap", frames)
    sock = workdir / "replay.sock"
    replay = await start_replay(str(workdir / "in.pcap"), "--pipe", str(sock), "--packet-cache", "16", "--json")

    async def decide(info: dict) -> Decision:  # type: ignore[type-arg]
        await asyncio.sleep(0.005)
        return Decision("accept", permanent=True)

    client = await connect_when_listening(sock, decide)
    try:
        status, out, err = await finish(replay)
    finally:
        client.close()
    assert status == 0, err
    stats = json.loads(out)["stats"]
    assert stats["accepted"] == stats["requests"] == 300
    assert stats["evicted"] == 0 and stats["defaulted"] == 0 and identity_holds(stats)


def run_pmk(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pmk", "replay", *args], capture_output=True, text=True, timeout=60, cwd=REPO, env=env
    )


def test_waiting_for_deciders_times_out_with_one_line(workdir: Path) -> None:
    write_pcap(workdir / "in.pcap", traffic())
    sock = workdir / "replay.sock"
    done = run_pmk(str(workdir / "in.pcap"), "--pipe", str(sock), "--wait-deciders", "2", "--wait-timeout", "0.3")
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"pmk: 0 of 2 deciders connected to {sock} within 0.3 s", done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not sock.exists()


def test_bad_input_is_one_line_and_exit_2(workdir: Path) -> None:
    missing = run_pmk(str(workdir / "nothing.pcap"), "--pipe", str(workdir / "s"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"pmk: cannot read {workdir / 'nothing.pcap'}: No such file or directory"
    (workdir / "text.pcap").write_text("not a capture at all\n" * 10)
    garbage = run_pmk(str(workdir / "text.pcap"), "--pipe", str(workdir / "s"))
    assert garbage.returncode == 2
    assert garbage.stderr.strip() == f"pmk: {workdir / 'text.pcap'} is not a pcap or pcapng file"
    with open(workdir / "wifi.pcap", "wb") as f:
        dpkt.pcap.Writer(f, linktype=dpkt.pcap.DLT_IEEE802_11)
    wifi = run_pmk(str(workdir / "wifi.pcap"), "--pipe", str(workdir / "s"))
    assert wifi.returncode == 2 and wifi.stderr.startswith("pmk: ") and "link type 105" in wifi.stderr
    bad_local = run_pmk(str(workdir / "wifi.pcap"), "--local", "10.0.0.300/8")
    assert bad_local.returncode == 2 and "not an address or CIDR network" in bad_local.stderr


def test_a_damaged_file_settles_what_was_read_and_fails(workdir: Path) -> None:
    frames = [f for f in traffic() if f.ip and f.local]
    write_pcap(workdir / "in.pcap", frames)
    data = (workdir / "in.pcap").read_bytes()
    # Keep the file header, the first record whole, and 5 bytes of the next record header.
    first = 24 + 16 + len(ethernet(frames[0]))
    (workdir / "cut.pcap").write_bytes(data[: first + 5])
    done = run_pmk(
        str(workdir / "cut.pcap"), "--pipe", str(workdir / "s"), "--wait-deciders", "0", "--default-verdict", "accept",
        "--json",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"pmk: {workdir / 'cut.pcap'}: unreadable after frame 1")
    stats = json.loads(done.stdout)["stats"]
    assert stats["captured"] == stats["accepted"] == 1 and identity_holds(stats)


@pytest.mark.skipif(os.geteuid() != 0, reason="already running without root: every test here is unprivileged")
def test_as_an_unprivileged_user_on_the_default_endpoint() -> None:
    """As nobody, with no PMK_PIPE and no XDG_RUNTIME_DIR: a per-user directory in TMPDIR."""
    nobody = 65534
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    drop = ["setpriv", f"--reuid={nobody}", f"--regid={nobody}", "--clear-groups"]
    probe = subprocess.run([*drop, sys.executable, "-c", "import pmk.client"], capture_output=True, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run this interpreter with pmk: {probe.stderr.decode().strip()[-200:]}")
    home = Path(tempfile.mkdtemp(prefix="pmk-replay-nobody-"))
    try:
        os.chmod(home, 0o755)
        os.chown(home, nobody, nobody)
        write_pcap(home / "in.pcap", traffic())
        (home / "rules").write_text(BLOCKLIST)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(home)}
        sock = home / f"pmk-replay-{nobody}" / "pmk-replay.sock"
        example = subprocess.Popen(
            [*drop, sys.executable, str(REPO / "examples" / "blocklist.py"), str(home / "rules"), "--pipe", str(sock)],
            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            done = subprocess.run(
                [*drop, sys.executable, "-m", "pmk", "replay", str(home / "in.pcap"), *LOCAL_ARGS, "--json"],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
        finally:
            example.terminate()
            example.wait()
        assert done.returncode == 0, done.stderr
        assert f"waiting for 1 decider on {sock}" in done.stderr
        stats = json.loads(done.stdout)["stats"]
        assert stats["deciders"] == 1 and stats["refused_clients"] == 0
        assert stats["blocked"] == len([f for f in traffic() if f.ip and f.local and f.blocked])
        assert (home / f"pmk-replay-{nobody}").stat().st_mode & 0o777 == 0o750
    finally:
        shutil.rmtree(home, ignore_errors=True)


# -- the pieces ------------------------------------------------------------


def test_link_layers_are_cut_off_and_padding_trimmed() -> None:
    ip4 = udp(LOCAL4, "198.51.100.53", 5353, 53, b"")  # 28 bytes: Ethernet pads it
    ip6 = udp(LOCAL6, "2001:db8::53", 5353, 53, b"x")
    eth = bytes(dpkt.ethernet.Ethernet(dst=MAC_ROUTER, src=MAC_LOCAL, type=0x0800, data=ip4)) + b"\0" * 18
    assert ip_packet(1, eth) == ip4
    vlan = MAC_ROUTER + MAC_LOCAL + b"\x81\x00\x00\x07\x86\xdd" + ip6
    assert ip_packet(1, vlan) == ip6
    assert ip_packet(1, MAC_ROUTER + MAC_LOCAL + b"\x08\x06" + ARP) is None
    for raw_type in (101, 12, 14, 228, 229):
        assert ip_packet(raw_type, ip6) == ip6
    assert ip_packet(113, linux_cooked(Frame(ip4, "", True, False))) == ip4
    assert ip_packet(113, linux_cooked(Frame(b"", "", True, False))) is None
    sll2 = b"\x86\xdd" + b"\0" * 18 + ip6
    assert ip_packet(276, sll2) == ip6
    assert ip_packet(0, (2).to_bytes(4, "little") + ip4) == ip4  # BSD NULL, little-endian writer
    assert ip_packet(0, (30).to_bytes(4, "big") + ip6) == ip6  # macOS AF_INET6, big-endian writer
    assert ip_packet(108, (2).to_bytes(4, "big") + ip4) == ip4
    assert ip_packet(108, (99).to_bytes(4, "big") + ip4) is None
    assert ip_packet(101, b"\x45\x00") is None and ip_packet(1, b"") is None
    with pytest.raises(ValueError):
        ip_packet(105, eth)


def test_directions_by_local_networks() -> None:
    import ipaddress

    directions = Directions([ipaddress.ip_network("192.0.2.0/24"), ipaddress.ip_network("2001:db8::10/128")])

    def outbound(packet: bytes) -> bool | None:
        flow = parse_flow(packet)
        assert flow is not None
        return directions.outbound(flow, packet)

    assert outbound(udp(LOCAL4, "198.51.100.1", 1, 2)) is True
    assert outbound(udp("198.51.100.1", LOCAL4, 2, 1)) is False
    assert outbound(udp(LOCAL6, "2001:db8::11", 1, 2)) is True
    assert outbound(udp("2001:db8::11", LOCAL6, 2, 1)) is False
    assert outbound(udp("198.51.100.1", "198.51.100.2", 1, 2)) is None
    # Both sides local: as the sender's socket sees it.
    assert outbound(udp(LOCAL4, "192.0.2.11", 1, 2)) is True


def test_directions_by_opener() -> None:
    directions = Directions([])

    def outbound(packet: bytes) -> bool | None:
        flow = parse_flow(packet)
        assert flow is not None
        return directions.outbound(flow, packet)

    # A capture that begins with the SYN-ACK: its receiver opened the connection.
    assert outbound(tcp("203.0.113.5", LOCAL4, 443, 41000, flags=SYN | ACK)) is False
    assert outbound(tcp(LOCAL4, "203.0.113.5", 41000, 443, flags=ACK)) is True
    assert outbound(udp("198.51.100.9", LOCAL4, 53, 5000)) is True  # first seen: its sender
    assert outbound(udp(LOCAL4, "198.51.100.9", 5000, 53)) is False


class HoldingSink:
    """Keeps what it is fed, like a server whose decider has not answered yet."""

    def __init__(self) -> None:
        self.held: list[CapturedPacket] = []
        self.most = 0

    def __call__(self, packets: list[CapturedPacket]) -> None:
        self.held.extend(packets)
        self.most = max(self.most, len(self.held))


async def test_backend_never_has_more_than_its_window_unsettled(workdir: Path) -> None:
    frames = [Frame(udp(LOCAL4, "198.51.100.53", 20000 + n, 53, b"q"), f"u{n}", True, False) for n in range(50)]
    write_pcap(workdir / "in.pcap", frames)
    backend = ReplayBackend(str(workdir / "in.pcap"), window=8, batch=3, write_accepted=str(workdir / "out.pcap"))
    sink = HoldingSink()
    backend.start(asyncio.get_running_loop(), sink)
    await asyncio.sleep(0.05)
    assert sink.held == [], "nothing is fed before play()"
    done = backend.play()
    for _ in range(20):
        await asyncio.sleep(0)
    assert 6 <= len(sink.held) <= 8 and backend.outstanding == len(sink.held)
    while not done.done():
        # Settle the newest first: the output must still come out in input order.
        batch, sink.held = sink.held, []
        backend.apply(batch[::-1][::2], Verdict.ACCEPT, False)
        backend.apply(batch[::-1][1::2], Verdict.BLOCK, True)
        for _ in range(5):
            await asyncio.sleep(0)
    assert sink.most <= 8 and backend.fed == 50 and backend.outstanding == 0
    backend.close()
    backend.close()
    _, records = read_pcap(workdir / "out.pcap")
    assert backend.verdicts["accept"] == len(records) == backend.written
    indexes = [frames.index(next(f for f in frames if ethernet(f) == data)) for _, data in records]
    assert indexes == sorted(indexes)


@settings(max_examples=300, deadline=None, database=None)  # nothing to keep: runs where the checkout is read-only
@given(link_type=st.sampled_from([0, 1, 12, 14, 101, 108, 113, 228, 229, 276]), frame=st.binary(max_size=80))
def test_any_frame_is_an_ip_packet_or_none(link_type: int, frame: bytes) -> None:
    raw = ip_packet(link_type, frame)
    assert raw is None or (raw[0] >> 4 in (4, 6) and len(raw) >= 20)


async def test_frames_of_garbage_are_skipped_not_fatal(workdir: Path) -> None:
    garbage = [bytes([0x45, 0, 0, 20]) + bytes(range(n)) for n in range(30)] + [b"", b"\x60", b"\x08\x00" * 40]
    with open(workdir / "in.pcap", "wb") as f:
        writer = dpkt.pcap.Writer(f, linktype=101)
        for index, data in enumerate(garbage):
            writer.writepkt(data, ts=index)
    backend = ReplayBackend(str(workdir / "in.pcap"), window=4)
    sink = HoldingSink()
    backend.start(asyncio.get_running_loop(), sink)
    done = backend.play()
    while not done.done():
        batch, sink.held = sink.held, []
        backend.apply(batch, Verdict.DROP, False)
        await asyncio.sleep(0)
    backend.close()
    assert backend.frames == len(garbage) == backend.fed + backend.not_ip + backend.not_local
    assert backend.verdicts["drop"] == backend.fed > 0 and backend.not_ip > 0


def test_tables_for_a_person(workdir: Path) -> None:
    frames = traffic()
    write_pcap(workdir / "in.pcap", frames)
    done = run_pmk(str(workdir / "in.pcap"), "--pipe", str(workdir / "s"), "--wait-deciders", "0")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    decided = len([f for f in frames if f.ip])
    assert any(line.split() == ["packets", "│", str(decided)] for line in lines), done.stdout
    assert any(line.split()[:3] == ["captured", "│", str(decided)] for line in lines), done.stdout
    assert "reroute_to_nameserver" not in done.stdout  # the summary lists only verdicts that happened


def test_the_fallback_policy_alone_decides_with_policy_file(workdir: Path) -> None:
    frames = traffic()
    write_pcap(workdir / "in.pcap", frames)
    (workdir / "policy.toml").write_text(
        '[[rule]]\nname = "dns-out"\ndirection = "outbound"\nprotocol = "udp"\nremote_port = 53\n'
        'verdict = "accept"\ncache = true\n\n[default]\nverdict = "drop"\ncache = false\n'
    )
    done = run_pmk(
        str(workdir / "in.pcap"), *LOCAL_ARGS, "--pipe", str(workdir / "s"), "--wait-deciders", "0",
        "--policy", str(workdir / "policy.toml"), "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    stats = json.loads(done.stdout)["stats"]
    decided = [f for f in frames if f.ip and f.local]
    dns = [f for f in decided if f.conn.startswith("dns")]
    # A cached rule decides a connection once, and the packets waiting behind (the answers) go with it.
    assert stats["accepted"] == len(dns) and stats["dropped"] == len(decided) - len(dns)
    assert stats["policy_hits"] == {"dns-out": len({f.conn for f in dns}), "default": len(decided) - len(dns)}
    assert stats["defaulted"] == len(decided) and stats["deciders"] == 0
    assert identity_holds(stats)


async def test_closing_stops_feeding_even_with_a_batch_scheduled(workdir: Path) -> None:
    frames = [Frame(udp(LOCAL4, "198.51.100.53", 20000 + n, 53, b"q"), f"u{n}", True, False) for n in range(20)]
    write_pcap(workdir / "in.pcap", frames)
    backend = ReplayBackend(str(workdir / "in.pcap"), window=4, batch=2)
    sink = HoldingSink()
    backend.start(asyncio.get_running_loop(), sink)
    backend.play()
    for _ in range(5):
        await asyncio.sleep(0)
    assert backend.fed == 4
    backend.apply(sink.held[:2], Verdict.ACCEPT, False)  # schedules the next batch
    backend.close()  # as the server does at shutdown, before the loop runs again
    for _ in range(5):
        await asyncio.sleep(0)
    assert backend.fed == 4 and backend.damaged is None


async def test_an_interrupted_replay_ends_with_one_line(workdir: Path) -> None:
    frames = [Frame(udp(LOCAL4, "198.51.100.53", 20000 + n, 53, b"q"), f"u{n}", True, False) for n in range(50)]
    write_pcap(workdir / "in.pcap", frames)
    sock = workdir / "replay.sock"
    replay = await start_replay(str(workdir / "in.pcap"), "--pipe", str(sock), "--verdict-timeout", "60")
    asked = asyncio.Event()

    async def decide(info: dict) -> Decision:  # type: ignore[type-arg]
        asked.set()
        await asyncio.sleep(3600)
        raise AssertionError("never answered")

    client = await connect_when_listening(sock, decide)
    try:
        await asyncio.wait_for(asked.wait(), 20)
        replay.send_signal(signal.SIGINT)
        status, out, err = await finish(replay)
    finally:
        client.close()
    assert status == 1
    assert err.strip().splitlines()[-1] == "pmk: interrupted after 50 packets", err
    assert "Traceback" not in err and out == "" and not sock.exists()
