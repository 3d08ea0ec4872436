"""pmk against the committed protocol vectors (protocol/vectors.json).

Every vector is checked both ways: the bytes decode to the message and the
message encodes to exactly the bytes. Each frame is also fed whole, one byte
at a time and followed by another frame, the way a stream delivers it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

import pmk
from pmk.config import ServeConfig
from pmk.core.commands import Forget, Reply, ReplyError, SendDecide
from pmk.core.events import ClientJoined, ClientRequest, PacketsCaptured
from pmk.core.service import Service
from pmk.packet.captured import CapturedPacket
from pmk.rpc.codec import MAX_DEPTH, MAX_FRAME_BYTES, Decoder, encode
from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import ErrorCode, Event, Message, Notification, ProtocolViolation, Request, Response
from pmk.testing.fakes import FakeBackend
from tests.packets import udp

VECTORS = json.loads((Path(__file__).parent.parent / "protocol" / "vectors.json").read_text())
TRAILER = bytes.fromhex("9302a5747261696c90")  # [2, "trail", []]
TRAILER_MESSAGE = Notification("trail", [])


def from_json(value: Any) -> Any:
    """Undo the vectors' JSON convention."""
    if isinstance(value, dict):
        if len(value) == 1:
            (tag, inner), *_ = value.items()
            if tag == "$bin":
                return bytes.fromhex(inner)
            if tag == "$int":
                return int(inner)
            if tag == "$float":
                return float(inner)
        return {key: from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [from_json(item) for item in value]
    return value


def message_from_json(spec: dict[str, Any]) -> Message:
    if spec["type"] == "request":
        return Request(spec["msgid"], spec["method"], from_json(spec["params"]))
    if spec["type"] == "response":
        return Response(spec["msgid"], from_json(spec["error"]), from_json(spec["result"]))
    assert spec["type"] == "notification"
    return Notification(spec["method"], from_json(spec["params"]))


def vector_bytes(vector: dict[str, Any]) -> bytes:
    data = bytes.fromhex(vector["hex"])
    fill = vector.get("fill")
    if fill:
        data += bytes.fromhex(fill["byte"]) * fill["count"]
    return data


def chunkings(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    if len(data) <= 4096:
        yield "bytewise", [data[i : i + 1] for i in range(len(data))]
    else:
        yield "4k", [data[i : i + 4096] for i in range(0, len(data), 4096)]


def feed(decoder: Decoder, chunks: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    return events


def by_name(section: str) -> list[Any]:
    return [pytest.param(vector, id=vector["name"]) for vector in VECTORS[section]]


def test_vector_file_matches_the_code() -> None:
    assert VECTORS["protocol"] == pmk.PROTOCOL_VERSION
    assert VECTORS["max_frame_bytes"] == MAX_FRAME_BYTES
    assert VECTORS["max_depth"] == MAX_DEPTH
    assert msgpack.packb([2, "trail", []]) == TRAILER
    codes = {v["error"]["code"] for v in VECTORS["invalid"]} | {c["error"] for c in VECTORS["calls"] if "error" in c}
    assert codes <= {code.value for code in ErrorCode}


@pytest.mark.parametrize("vector", by_name("valid"))
def test_valid_vector_decodes(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    expected = message_from_json(vector["message"])
    for how, chunks in chunkings(data):
        assert feed(Decoder(), chunks) == [expected], how
        assert feed(Decoder(), [*chunks, TRAILER]) == [expected, TRAILER_MESSAGE], how


@pytest.mark.parametrize("vector", by_name("valid"))
def test_valid_vector_encodes(vector: dict[str, Any]) -> None:
    assert encode(message_from_json(vector["message"])).hex() == vector["hex"]


def test_many_vectors_in_one_read() -> None:
    stream = b"".join(bytes.fromhex(v["hex"]) for v in VECTORS["valid"])
    expected = [message_from_json(v["message"]) for v in VECTORS["valid"]]
    assert Decoder().feed(stream) == expected


@pytest.mark.parametrize("vector", by_name("invalid"))
def test_invalid_vector(vector: dict[str, Any]) -> None:
    data = vector_bytes(vector)
    error = vector["error"]
    for how, chunks in chunkings(data):
        connection = RpcConnection()
        events = [e for chunk in [*chunks, TRAILER] for e in connection.receive(chunk)]
        violation = events[0]
        assert isinstance(violation, ProtocolViolation), how
        assert (violation.code.value, violation.fatal, violation.msgid) == (
            error["code"],
            error["fatal"],
            error["msgid"],
        )
        if error["fatal"]:
            # Nothing after an unframeable input counts, not even a valid frame.
            assert connection.decoder.broken == violation
            assert all(e == violation for e in events)
        else:
            assert events[1:] == [TRAILER_MESSAGE], how
        connection.report(violation)
        (answer,) = Decoder().feed(connection.data_to_send())
        if error["answer"] == "response":
            assert answer == Response(error["msgid"], {"code": error["code"], "message": violation.message}, None)
        else:
            assert error["answer"] in ("notification", "close")
            assert answer == Notification("protocol_error", [{"code": error["code"], "message": violation.message}])


@pytest.mark.parametrize("vector", by_name("incomplete"))
def test_incomplete_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    for how, chunks in chunkings(data):
        decoder = Decoder()
        assert feed(decoder, chunks) == [], how
        assert decoder.broken is None
        assert decoder.buffered() == len(data)


def _service() -> Service:
    config = ServeConfig(endpoint="/nonexistent/pmk.sock")
    return Service(
        backend=FakeBackend(),
        policy=config.policy,
        packet_cache=config.packet_cache,
        verdict_cache=config.verdict_cache,
        verdict_timeout=config.verdict_timeout,
        max_in_flight=config.max_in_flight,
        started=0.0,
    )


@pytest.mark.parametrize("vector", by_name("calls"))
def test_call_vector(vector: dict[str, Any]) -> None:
    service = _service()
    service.handle(ClientJoined(1), now=1.0)
    request = Request(41, vector["method"], from_json(vector["params"]))
    # Through the wire format both ways, so what the test sends and reads is what a client would.
    (decoded,) = Decoder().feed(encode(request))
    assert isinstance(decoded, Request)
    out = service.handle(ClientRequest(1, decoded.msgid, decoded.method, decoded.params), now=1.0)
    (reply,) = [c for c in out if isinstance(c, Reply | ReplyError)]
    wire = RpcConnection()
    if isinstance(reply, ReplyError):
        wire.send_error(reply.msgid, reply.code, reply.message)
    else:
        assert isinstance(reply, Reply)
        wire.send_response(reply.msgid, None, reply.result)
    (answer,) = Decoder().feed(wire.data_to_send())
    assert isinstance(answer, Response) and answer.msgid == 41
    if "error" in vector:
        assert answer.result is None
        assert answer.error["code"] == vector["error"]
        assert isinstance(answer.error["message"], str) and answer.error["message"]
    else:
        assert answer.error is None
        if "result" in vector:
            assert answer.result == from_json(vector["result"])
        else:
            expected = from_json(vector["result_has"])
            assert {k: answer.result.get(k) for k in expected} == expected


def test_stats_vector_names_every_counter_the_server_reports() -> None:
    """The documented get_stats example lists what a real server returns, and obeys the identity."""
    (example,) = [v for v in VECTORS["valid"] if v["name"] == "get_stats_result"]
    documented = from_json(example["message"]["result"])
    assert set(_service().stats(now=1.0)) == set(documented)
    settled = sum(documented[k] for k in ("accepted", "blocked", "dropped", "rerouted", "evicted", "pending"))
    assert documented["captured"] == settled
    assert not math.isnan(documented["uptime"])


def test_a_decider_turning_observer_hands_its_requests_on() -> None:
    """SPEC 5.4: outstanding decides move to another decider, as on a disconnect."""
    service = _service()
    hello = [{"protocol": 1, "role": "decider"}]
    service.handle_all([ClientJoined(1), ClientJoined(2), ClientRequest(1, 0, "hello", hello)], now=1.0)
    packet = CapturedPacket(udp("198.18.0.1", "198.18.0.2", 4000, 53, b"q"), outbound=True)
    (asked,) = [c for c in service.handle(PacketsCaptured([packet]), now=1.0) if isinstance(c, SendDecide)]
    assert asked.client == 1
    service.handle(ClientRequest(2, 0, "hello", hello), now=1.0)
    out = service.handle(ClientRequest(1, 1, "hello", [{"protocol": 1, "role": "observer"}]), now=1.0)
    (moved,) = [c for c in out if isinstance(c, SendDecide)]
    assert moved.client == 2 and moved.info["id"] == asked.info["id"]
    assert Forget(1, asked.msgid) in out  # a late answer from the first is dropped quietly
