"""Write protocol/vectors.json, the test vectors of protocol/SPEC.md.

Run from the repository root: ``python protocol/make_vectors.py``. The JSON is
committed; tests/test_protocol_vectors.py checks it against pmk's codec and
server, so regenerate it only when the contract changes on purpose.

Frames are built here with plain ``msgpack.packb`` (not with pmk's encoder)
and a few are also spelled out byte by byte, so the vectors do not merely
mirror pmk's own code.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from typing import Any

import msgpack

OUT = Path(__file__).with_name("vectors.json")
U32_MAX = 2**32 - 1
MAX_FRAME_BYTES = 1024 * 1024
MAX_DEPTH = 32

# A tiny IPv4/UDP packet (198.18.0.1:40000 -> 198.18.0.2:53, payload "hi"):
# what get_payload returns, IP header first.
_UDP_PACKET = bytes.fromhex("4500001e0000400040110000c6120001c6120002") + bytes.fromhex("9c400035000a0000") + b"hi"


class Bin(bytes):
    """Marks a value that goes on the wire as msgpack bin."""


def to_json(value: Any) -> Any:
    """A wire value in the vectors' JSON convention (see "convention" in the file)."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if -(2**53) <= value <= 2**53 else {"$int": str(value)}
    if isinstance(value, float):
        if math.isfinite(value):
            return {"$float": value}
        return {"$float": str(value)}
    if isinstance(value, list):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        assert all(isinstance(k, str) and not k.startswith("$") for k in value)
        return {k: to_json(v) for k, v in value.items()}
    raise TypeError(value)


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def request(msgid: int, method: str, params: list[Any]) -> tuple[bytes, dict[str, Any]]:
    return pack([0, msgid, method, params]), {
        "type": "request",
        "msgid": msgid,
        "method": method,
        "params": to_json(params),
    }


def response(msgid: int, error: Any, result: Any) -> tuple[bytes, dict[str, Any]]:
    return pack([1, msgid, error, result]), {
        "type": "response",
        "msgid": msgid,
        "error": to_json(error),
        "result": to_json(result),
    }


def notification(method: str, params: list[Any]) -> tuple[bytes, dict[str, Any]]:
    return pack([2, method, params]), {"type": "notification", "method": method, "params": to_json(params)}


def err(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}


def nested(depth: int) -> list[Any]:
    """A request whose outermost array counts as level 1 and whose innermost array is at ``depth``."""
    inner: list[Any] = []
    for _ in range(depth - 2):  # the message array (1) and params (2) wrap the rest
        inner = [inner]
    return inner


DECIDE_TCP4 = {
    "id": 17,
    "direction": "outbound",
    "ip_version": 4,
    "protocol": 6,
    "local_ip": "198.18.0.1",
    "local_port": 40000,
    "remote_ip": "198.18.0.2",
    "remote_port": 443,
    "interface": 2,
    "sub_interface": 0,
    "size": 60,
    "pid": None,
    "process": None,
    "uid": None,
    "timeout_ms": 2000,
}
DECIDE_UDP6 = {
    "id": 4294967296,
    "direction": "inbound",
    "ip_version": 6,
    "protocol": 17,
    "local_ip": "fd00:18::2",
    "local_port": 53,
    "remote_ip": "fd00:18::1",
    "remote_port": 51000,
    "interface": 3,
    "sub_interface": 0,
    "size": 1280,
    "pid": 4242,
    "process": "/usr/sbin/unbound",
    "uid": 107,
    "timeout_ms": 1998,
}
DECIDE_ICMP = {
    "id": 18,
    "direction": "outbound",
    "ip_version": 4,
    "protocol": 1,
    "local_ip": "198.18.0.1",
    "local_port": 0,
    "remote_ip": "198.18.0.2",
    "remote_port": 0,
    "interface": 2,
    "sub_interface": 0,
    "size": 84,
    "pid": 3170,
    "process": "/usr/bin/ping",
    "uid": 1000,
    "icmp_type": 8,
    "icmp_code": 0,
    "timeout_ms": 2000,
}
# The held packet of _UDP_PACKET, inline for a decider whose hello asked for payload.
DECIDE_PAYLOAD = {
    "id": 19,
    "direction": "outbound",
    "ip_version": 4,
    "protocol": 17,
    "local_ip": "198.18.0.1",
    "local_port": 40000,
    "remote_ip": "198.18.0.2",
    "remote_port": 53,
    "interface": 2,
    "sub_interface": 0,
    "size": len(_UDP_PACKET),
    "pid": 812,
    "process": "/usr/bin/dig",
    "uid": 0,
    "timeout_ms": 2000,
    "payload": Bin(_UDP_PACKET),
}
CONNECTION_NEW = {
    **{k: v for k, v in DECIDE_UDP6.items() if k != "payload"},
    "verdict": "accept",
    "permanent": True,
    "by": "decider",
    "name": "blocklist",
}
CONNECTION_NEW_POLICY = {
    **{k: v for k, v in DECIDE_TCP4.items() if k != "timeout_ms"},
    "verdict": "block",
    "permanent": False,
    "by": "policy",
    "name": "default",
}
STATS = {
    "captured": 120,
    "accepted": 90,
    "blocked": 11,
    "dropped": 4,
    "evicted": 3,
    "defaulted": 6,
    "cache_hits": 80,
    "cache_misses": 40,
    "pending": 12,
    "deciders": 1,
    "verdict_cache_entries": 9,
    "verdict_cache_evictions": 0,
    "bypassed": 0,
    "late_verdicts": 1,
    "requests": 37,
    "timeouts": 2,
    "unparsed": 0,
    "withdrawn": 3,
    "clients": 2,
    "in_flight": 5,
    "waiting_for_decider": 0,
    "withdrawn_in_flight": 0,
    "protocol_errors": 0,
    "refused_clients": 0,
    "slow_clients": 0,
    "default_no_decider": 4,
    "default_timeout": 2,
    "default_error": 0,
    "default_invalid": 0,
    "rerouted": 0,
    "preaccepted": 0,
    "connections_new": 30,
    "attribution_errors": 0,
    "client_list": [
        {
            "id": 1,
            "name": "blocklist",
            "role": "decider",
            "in_flight": 5,
            "answered": 30,
            "timeouts": 2,
            "latency_p50_ms": 0.41,
            "latency_p99_ms": 3.2,
            "pid": 2051,
            "uid": 0,
        },
        {
            "id": 2,
            "name": "pmk top",
            "role": "observer",
            "in_flight": 0,
            "answered": 0,
            "timeouts": 0,
            "latency_p50_ms": None,
            "latency_p99_ms": None,
            "pid": 2077,
            "uid": 1000,
        },
    ],
    "policy_hits": {"default": 6},
    "backend": "divert",
    "uptime": 12.5,
}
assert STATS["captured"] == sum(STATS[k] for k in ("accepted", "blocked", "dropped", "evicted", "pending"))
CONN4 = {"protocol": 6, "local_ip": "198.18.0.1", "local_port": 40000, "remote_ip": "198.18.0.2", "remote_port": 443}
CONN6 = {"protocol": 17, "local_ip": "fd00:18::2", "local_port": 53, "remote_ip": "fd00:18::1", "remote_port": 51000}


def valid_vectors() -> list[dict[str, Any]]:
    vectors: list[tuple[str, str, str, tuple[bytes, dict[str, Any]]]] = [
        # name, sender, description, (frame, message)
        (
            "hello_decider",
            "client",
            "hello as a decider",
            request(0, "hello", [{"protocol": 1, "name": "blocklist", "role": "decider"}]),
        ),
        (
            "hello_observer",
            "client",
            "hello as an observer",
            request(1, "hello", [{"protocol": 1, "name": "pmk stats", "role": "observer"}]),
        ),
        (
            "hello_payload",
            "client",
            "hello as a decider that wants each held packet inline in decide",
            request(2, "hello", [{"protocol": 1, "name": "dns-inspect", "role": "decider", "payload": True}]),
        ),
        (
            "hello_result",
            "server",
            "answer to hello: the deadline, the verdicts a decide answer may give, the outstanding limit",
            response(
                0,
                None,
                {
                    "protocol": 1,
                    "version": "0.1.0",
                    "backend": "divert",
                    "verdict_timeout": 2.0,
                    "verdicts": ["accept", "block", "drop"],
                    "max_in_flight": 256,
                },
            ),
        ),
        (
            "hello_unsupported",
            "server",
            "answer to hello with protocol 2: the message lists the versions spoken",
            response(
                1,
                err("unsupported_protocol", "protocol 2 is not spoken here; this server speaks 1"),
                None,
            ),
        ),
        ("get_payload", "client", "ask for a held packet's bytes", request(2, "get_payload", [17])),
        ("get_payload_result", "server", "the packet, IP header first, as bin", response(2, None, Bin(_UDP_PACKET))),
        (
            "get_payload_gone",
            "server",
            "the packet is no longer held",
            response(3, err("unknown_packet", "packet 99 is not held"), None),
        ),
        ("get_stats_max_msgid", "client", "get_stats with the largest msgid", request(U32_MAX, "get_stats", [])),
        ("get_stats_result", "server", "the counters", response(U32_MAX, None, STATS)),
        ("get_version_msgid_zero", "client", "get_version with msgid 0", request(0, "get_version", [])),
        (
            "get_version_result",
            "server",
            "answer to get_version",
            response(0, None, {"protocol": 1, "version": "0.1.0", "protocols": [1]}),
        ),
        ("clear_cache", "client", "forget every cached verdict", request(65536, "clear_cache", [])),
        ("clear_cache_result", "server", "how many verdicts were removed", response(65536, None, 3)),
        (
            "update_verdict_v4",
            "client",
            "set a TCP/IPv4 connection's verdict",
            request(5, "update_verdict", [CONN4, "block"]),
        ),
        (
            "update_verdict_v6",
            "client",
            "set a UDP/IPv6 connection's verdict",
            request(6, "update_verdict", [CONN6, "accept"]),
        ),
        ("update_verdict_result", "server", "answer to update_verdict", response(5, None, True)),
        ("decide_tcp4", "server", "decide about an outbound TCP/IPv4 packet", request(0, "decide", [DECIDE_TCP4])),
        (
            "decide_udp6",
            "server",
            "decide about an inbound UDP/IPv6 packet, pid known",
            request(1, "decide", [DECIDE_UDP6]),
        ),
        (
            "decide_icmp",
            "server",
            "decide about an ICMP echo request: ports are 0, type and code given",
            request(2, "decide", [DECIDE_ICMP]),
        ),
        (
            "decide_payload",
            "server",
            "decide for a decider whose hello asked for payload: the packet inline as bin",
            request(4, "decide", [DECIDE_PAYLOAD]),
        ),
        (
            "decide_future_key",
            "server",
            "a later server may add info keys; clients ignore them",
            request(3, "decide", [{**DECIDE_TCP4, "program": "/usr/bin/curl"}]),
        ),
        (
            "decide_accept_permanent",
            "client",
            "accept the whole connection",
            response(0, None, {"verdict": "accept", "permanent": True}),
        ),
        (
            "decide_block_temporary",
            "client",
            "block this packet only",
            response(1, None, {"verdict": "block", "permanent": False}),
        ),
        ("decide_drop", "client", "drop; permanent left out means false", response(2, None, {"verdict": "drop"})),
        (
            "decide_error",
            "client",
            "the decider failed: the default verdict applies",
            response(3, err("internal_error", "rule file unreadable"), None),
        ),
        (
            "protocol_error",
            "server",
            "what was wrong with a message that had no msgid to answer",
            notification("protocol_error", [err("invalid_message", "message type must be 0, 1 or 2")]),
        ),
        ("withdrawn", "server", "the decide about packet 17 is no longer wanted", notification("withdrawn", [17])),
        (
            "connection_new",
            "server",
            "to observers: a decider accepted a connection for good",
            notification("connection_new", [CONNECTION_NEW]),
        ),
        (
            "connection_new_policy",
            "server",
            "to observers: the fallback policy blocked one packet (no decider was asked: no timeout_ms)",
            notification("connection_new", [CONNECTION_NEW_POLICY]),
        ),
        (
            "refused",
            "server",
            "the peer may not use pmk; the server closes the connection",
            notification("refused", [err("not_permitted", "uid 1000 (pid 321) is not allowed to use pmk")]),
        ),
        (
            "unknown_method_answer",
            "server",
            "answer to a request for a method the server does not have",
            response(7, err("unknown_method", "no method 'watch_packets'"), None),
        ),
        (
            "unknown_notification",
            "client",
            "a notification nobody knows: valid, and ignored",
            notification("connection_end", [{"id": 3}]),
        ),
        ("empty_params_notification", "client", "a notification with no params", notification("ping", [])),
        (
            "bin16_payload",
            "server",
            "a payload over 255 bytes uses bin 16",
            response(9, None, Bin(bytes(range(256)) * 2)),
        ),
        (
            "negative_and_large_ints",
            "server",
            "ints of every width",
            notification("numbers", [-1, -33, -129, -32769, -(2**31) - 1, 255, 65535, U32_MAX, 2**64 - 1]),
        ),
        ("max_depth", "client", f"nesting of exactly {MAX_DEPTH} levels is allowed", request(10, "deep", nested(32))),
        ("str8_method", "client", "a 40-byte method name uses str 8", request(11, "m" * 40, [])),
    ]
    out = []
    for name, sender, description, (frame, message) in vectors:
        out.append({"name": name, "sender": sender, "description": description, "hex": frame.hex(), "message": message})
    return out


def invalid_vectors() -> list[dict[str, Any]]:
    def problem(code: str, fatal: bool, msgid: int | None = None) -> dict[str, Any]:
        answer = "close" if fatal else ("response" if msgid is not None else "notification")
        return {"code": code, "fatal": fatal, "msgid": msgid, "answer": answer}

    def invalid(msgid: int | None = None) -> dict[str, Any]:
        return problem("invalid_message", False, msgid)

    big = MAX_FRAME_BYTES + 1
    cases: list[tuple[str, str, bytes, dict[str, Any], dict[str, Any] | None]] = [
        # name, description, bytes, expected problem, optional fill
        ("not_an_array", "a bare integer", pack(1), invalid(), None),
        ("empty_array", "an empty array", bytes.fromhex("90"), invalid(), None),
        ("bad_type", "message type 3", pack([3, 1, "x", []]), invalid(), None),
        ("bool_type", "message type true is not 0, 1 or 2", pack([True, 1, "x", []]), invalid(), None),
        ("notification_4", "a notification with 4 elements", pack([2, "x", [], None]), invalid(), None),
        ("notification_method_int", "notification method not a string", pack([2, 7, []]), invalid(), None),
        ("notification_params_map", "notification params not an array", pack([2, "x", {}]), invalid(), None),
        ("request_3", "a request with 3 elements", pack([0, 1, "x"]), invalid(), None),
        ("msgid_negative", "msgid -1: no msgid to answer", pack([0, -1, "get_stats", []]), invalid(), None),
        ("msgid_too_big", "msgid 2**32", pack([0, 2**32, "get_stats", []]), invalid(), None),
        ("msgid_float", "msgid 1.0", pack([0, 1.0, "get_stats", []]), invalid(), None),
        ("msgid_str", "msgid as a string", pack([0, "1", "get_stats", []]), invalid(), None),
        ("request_method_int", "request method not a string", pack([0, 12, 5, []]), invalid(12), None),
        (
            "request_params_nil",
            "request params nil instead of an array",
            pack([0, 13, "get_stats", None]),
            invalid(13),
            None,
        ),
        (
            "request_params_map",
            "request params a map instead of an array",
            pack([0, 14, "hello", {"protocol": 1}]),
            invalid(14),
            None,
        ),
        (
            "bad_utf8_method",
            "a str that is not UTF-8",
            bytes.fromhex("94000f") + bytes.fromhex("a2c328") + bytes.fromhex("90"),
            invalid(15),
            None,
        ),
        (
            "bad_utf8_in_params",
            "a non-UTF-8 str inside params",
            bytes.fromhex("940010a568656c6c6f91") + bytes.fromhex("81a4") + b"name" + bytes.fromhex("a1ff"),
            invalid(16),
            None,
        ),
        (
            "ext_in_params",
            "ext types are not part of the protocol",
            pack([0, 17, "x", [msgpack.ExtType(5, b"\x01")]]),
            invalid(17),
            None,
        ),
        ("int_map_key", "map keys must be strings", pack([0, 18, "hello", [{1: 1}]]), invalid(18), None),
        (
            "array_map_key",
            "an array as a map key",
            bytes.fromhex("940013a568656c6c6f91") + bytes.fromhex("81910101"),
            invalid(19),
            None,
        ),
        (
            "duplicate_map_key",
            "a map repeating a key",
            bytes.fromhex("940014a568656c6c6f91") + bytes.fromhex("82a17801a17802"),
            invalid(20),
            None,
        ),
        (
            "too_deep",
            f"nesting of {MAX_DEPTH + 1} levels",
            pack([0, 21, "deep", nested(MAX_DEPTH + 1)]),
            invalid(21),
            None,
        ),
        (
            "response_bad_utf8",
            "a response with a non-UTF-8 str: no msgid can be answered",
            bytes.fromhex("9401") + bytes.fromhex("00c0a1ff"),
            invalid(),
            None,
        ),
        (
            "unknown_msgid",
            "a response to a request never sent (the receiver has none outstanding)",
            pack([1, 77, None, {"verdict": "accept", "permanent": True}]),
            problem("unknown_msgid", False),
            None,
        ),
        ("reserved_byte", "0xc1 is never used by msgpack", bytes.fromhex("c1"), problem("malformed", True), None),
        (
            "reserved_byte_inside",
            "0xc1 inside a request",
            bytes.fromhex("940001a178c1"),
            problem("malformed", True),
            None,
        ),
        (
            "oversized_bin",
            f"a bin of {big} bytes: the frame is over {MAX_FRAME_BYTES} bytes",
            bytes.fromhex("93") + bytes.fromhex("02a178") + bytes.fromhex("91c6") + struct.pack(">I", big),
            problem("frame_too_large", True),
            {"byte": "00", "count": big},
        ),
        (
            "oversized_array",
            f"an array of {big} nils",
            bytes.fromhex("9302a178dd") + struct.pack(">I", big),
            problem("frame_too_large", True),
            {"byte": "c0", "count": big},
        ),
    ]
    out = []
    for name, description, data, expected, fill in cases:
        vector: dict[str, Any] = {"name": name, "description": description, "hex": data.hex(), "error": expected}
        if fill is not None:
            vector["fill"] = fill
        out.append(vector)
    return out


def incomplete_vectors() -> list[dict[str, Any]]:
    whole = pack([0, 3, "get_stats", []])
    cases = [
        ("truncated_request", "a request missing its last byte", whole[:-1]),
        ("header_only", "a bin 32 header announcing 16 bytes, none sent", bytes.fromhex("c600000010")),
        ("empty", "no bytes at all", b""),
    ]
    return [{"name": n, "description": d, "hex": b.hex()} for n, d, b in cases]


def call_vectors() -> list[dict[str, Any]]:
    """What pmk answers to each method, on a server holding no packets and no cached verdicts."""

    def call(name: str, method: str, params: list[Any], outcome: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "method": method, "params": to_json(params), **outcome}

    def error(code: str) -> dict[str, Any]:
        return {"error": code}

    return [
        call("hello", "hello", [{"protocol": 1, "name": "t", "role": "decider"}], {"result_has": {"protocol": 1}}),
        call("hello_defaults", "hello", [{"protocol": 1}], {"result_has": {"protocol": 1}}),
        call(
            "hello_protocol_2",
            "hello",
            [{"protocol": 2, "name": "t", "role": "decider"}],
            error("unsupported_protocol"),
        ),
        call("hello_no_map", "hello", [], error("invalid_params")),
        call("hello_protocol_str", "hello", [{"protocol": "1"}], error("invalid_params")),
        call("hello_bad_role", "hello", [{"protocol": 1, "role": "boss"}], error("invalid_params")),
        call("hello_long_name", "hello", [{"protocol": 1, "name": "n" * 257}], error("invalid_params")),
        call(
            "hello_name_256_characters",
            "hello",
            [{"protocol": 1, "name": "\u00e9" * 256}],
            {"result_has": {"protocol": 1}},
        ),
        call(
            "hello_payload",
            "hello",
            [{"protocol": 1, "role": "decider", "payload": True}],
            {"result_has": {"protocol": 1, "verdicts": ["accept", "block", "drop"], "max_in_flight": 256}},
        ),
        call("hello_payload_not_bool", "hello", [{"protocol": 1, "payload": 1}], error("invalid_params")),
        call("get_payload_gone", "get_payload", [99], error("unknown_packet")),
        call("get_payload_str", "get_payload", ["99"], error("invalid_params")),
        call("get_payload_negative", "get_payload", [-1], error("invalid_params")),
        call("get_stats", "get_stats", [], {"result_has": {"captured": 0, "pending": 0, "deciders": 0}}),
        call("get_stats_params", "get_stats", [1], error("invalid_params")),
        call("get_version", "get_version", [], {"result_has": {"protocol": 1, "protocols": [1]}}),
        call("clear_cache_empty", "clear_cache", [], {"result": 0}),
        call("clear_cache_params", "clear_cache", [True], error("invalid_params")),
        call("update_verdict", "update_verdict", [CONN4, "drop"], {"result": True}),
        call("update_verdict_v6", "update_verdict", [CONN6, "accept"], {"result": True}),
        call("update_verdict_unknown_verdict", "update_verdict", [CONN4, "reroute_to_tunnel"], error("invalid_params")),
        call("update_verdict_one_param", "update_verdict", [CONN4], error("invalid_params")),
        call(
            "update_verdict_mixed_versions",
            "update_verdict",
            [{**CONN4, "remote_ip": "fd00:18::1"}, "block"],
            error("invalid_params"),
        ),
        call(
            "update_verdict_bad_port",
            "update_verdict",
            [{**CONN4, "local_port": 65536}, "block"],
            error("invalid_params"),
        ),
        call(
            "update_verdict_not_ip",
            "update_verdict",
            [{**CONN4, "local_ip": "localhost"}, "block"],
            error("invalid_params"),
        ),
        call("update_verdict_no_conn", "update_verdict", ["tcp", "block"], error("invalid_params")),
        call("list_connections", "list_connections", [], {"result": {"total": 0, "connections": []}}),
        call("list_connections_page", "list_connections", [{"offset": 5, "limit": 10}], {"result_has": {"total": 0}}),
        call("list_connections_limit", "list_connections", [{"limit": 1001}], error("invalid_params")),
        call("subscribe_bandwidth", "subscribe", ["bandwidth", 1.5], {"result": True}),
        call("subscribe_stop", "subscribe", ["bandwidth", 0], {"result": True}),
        call("subscribe_too_often", "subscribe", ["bandwidth", 0.01], error("invalid_params")),
        call("subscribe_unknown_topic", "subscribe", ["latency", 1], error("invalid_params")),
        call("unknown_method", "watch_packets", [], error("unknown_method")),
    ]


def build() -> dict[str, Any]:
    # Two frames spelled out by hand: the generator must agree with them.
    assert pack([0, U32_MAX, "get_stats", []]).hex() == "9400ceffffffffa9" + b"get_stats".hex() + "90"
    assert pack([2, "withdrawn", [17]]).hex() == "9302a9" + b"withdrawn".hex() + "9111"
    return {
        "format": 1,
        "protocol": 1,
        "max_frame_bytes": MAX_FRAME_BYTES,
        "max_depth": MAX_DEPTH,
        "convention": {
            "hex": "the frame's bytes, lowercase hex; 'fill' (if present) appends count copies of byte",
            "values": (
                "msgpack nil/bool/str/array/map are JSON null/bool/string/array/object (map keys are strings, in "
                "wire order). Integers are JSON numbers, or {'$int': decimal string} beyond 2**53. bin is "
                "{'$bin': hex}. float is {'$float': number} (always float 64 on the wire). No real map key starts "
                "with '$'."
            ),
            "encoding": (
                "every frame uses the shortest msgpack form for each int, str, bin, array and map, as the "
                "msgpack spec recommends; strings are always str, payloads always bin"
            ),
            "valid": "hex decodes to message, and message encodes to exactly hex",
            "invalid": (
                "feeding hex (+fill) to a fresh receiver yields exactly one error: code, fatal, and how it is "
                "answered: 'response' (error response with msgid), 'notification' (protocol_error) or 'close' "
                "(protocol_error notification, then the connection is closed)"
            ),
            "incomplete": "feeding hex yields nothing yet: the receiver waits for more bytes",
            "calls": (
                "each request sent to a fresh pmk server (no held packets, no cached verdicts) gets either an "
                "error response with that code, a result equal to 'result', or a map result containing 'result_has'"
            ),
        },
        "valid": valid_vectors(),
        "invalid": invalid_vectors(),
        "incomplete": incomplete_vectors(),
        "calls": call_vectors(),
    }


def main() -> int:
    OUT.write_text(json.dumps(build(), indent=1) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
