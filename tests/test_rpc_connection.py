"""RpcConnection: request numbering, response matching and output batching, without sockets."""

from __future__ import annotations

import msgpack
import pytest

from pmk.rpc.codec import Decoder, encode
from pmk.rpc.connection import RpcConnection
from pmk.rpc.messages import MSGID_LIMIT, ErrorCode, LateResponse, Notification, ProtocolViolation, Request, Response


def sent(connection: RpcConnection) -> list[object]:
    return Decoder().feed(connection.data_to_send())


def answer(msgid: int, result: object = None, error: object = None) -> bytes:
    return encode(Response(msgid, error, result))


def test_msgids_count_up_from_zero() -> None:
    connection = RpcConnection()
    assert [connection.send_request("decide", [{"id": i}]) for i in range(3)] == [0, 1, 2]
    assert sent(connection) == [Request(i, "decide", [{"id": i}]) for i in range(3)]


def test_msgids_wrap_after_the_largest_uint32_and_skip_outstanding_ones() -> None:
    connection = RpcConnection()
    first = connection.send_request("a", [])  # 0, still outstanding at the wrap
    connection._next_msgid = MSGID_LIMIT - 1
    assert connection.send_request("b", []) == MSGID_LIMIT - 1
    assert connection.send_request("c", []) == 1  # 0 is taken
    assert first == 0
    connection.take_context(Response(0, None, None))
    connection._next_msgid = MSGID_LIMIT - 1
    connection.forget(MSGID_LIMIT - 1)
    assert connection.send_request("d", []) == MSGID_LIMIT - 1
    assert connection.send_request("e", []) == 0


def test_responses_match_in_any_order_and_return_the_context() -> None:
    connection = RpcConnection()
    ids = [connection.send_request("decide", [], context=f"packet {i}") for i in range(3)]
    events = connection.receive(answer(ids[2], "c") + answer(ids[0], "a") + answer(ids[1], "b"))
    assert [e.result for e in events] == ["c", "a", "b"]  # type: ignore[union-attr]
    assert [connection.take_context(e) for e in events] == ["packet 2", "packet 0", "packet 1"]  # type: ignore[arg-type]
    assert connection.outstanding == {}


def test_an_answer_to_a_request_never_sent_is_a_violation() -> None:
    connection = RpcConnection()
    connection.send_request("decide", [])
    (event,) = connection.receive(answer(5, {"verdict": "accept"}))
    assert event == ProtocolViolation(ErrorCode.UNKNOWN_MSGID, "no request with msgid 5 is outstanding", False)
    assert 0 in connection.outstanding
    connection.report(event)
    assert sent(connection)[-1] == Notification(
        "protocol_error", [{"code": "unknown_msgid", "message": "no request with msgid 5 is outstanding"}]
    )


def test_a_late_answer_after_forget_is_reported_as_late_once() -> None:
    connection = RpcConnection()
    msgid = connection.send_request("decide", [], context=17)
    assert connection.forget(msgid) == 17
    assert connection.receive(answer(msgid, {"verdict": "block"})) == [LateResponse(msgid)]
    # A second answer to the same request is no longer "late": it is wrong.
    (again,) = connection.receive(answer(msgid, {"verdict": "block"}))
    assert isinstance(again, ProtocolViolation) and again.code is ErrorCode.UNKNOWN_MSGID


def test_forgetting_what_was_never_sent_remembers_nothing() -> None:
    connection = RpcConnection()
    assert connection.forget(3) is None
    (event,) = connection.receive(answer(3))
    assert isinstance(event, ProtocolViolation)


def test_the_memory_of_abandoned_requests_is_bounded() -> None:
    connection = RpcConnection()
    ids = [connection.send_request("decide", []) for _ in range(5000)]
    for msgid in ids:
        connection.forget(msgid)
    events = connection.receive(answer(ids[0]) + answer(ids[-1]))
    assert isinstance(events[0], ProtocolViolation)  # the oldest is forgotten
    assert events[1:] == [LateResponse(ids[-1])]


def test_a_caller_chosen_msgid_is_used_and_must_be_free() -> None:
    connection = RpcConnection()
    assert connection.send_request("decide", [], msgid=7) == 7
    with pytest.raises(ValueError):
        connection.send_request("decide", [], msgid=7)
    with pytest.raises(ValueError):
        connection.send_request("decide", [], msgid=MSGID_LIMIT)
    (response,) = connection.receive(answer(7))
    assert isinstance(response, Response) and response.msgid == 7


def test_output_is_batched_into_one_buffer_in_order() -> None:
    connection = RpcConnection()
    connection.send_request("decide", [1])
    connection.send_response(7, None, {"protocol": 1})
    connection.send_error(8, ErrorCode.UNKNOWN_PACKET, "gone")
    connection.send_notification("withdrawn", [1])
    queued = connection.pending_output()
    data = connection.data_to_send()
    assert len(data) == queued
    assert Decoder().feed(data) == [
        Request(0, "decide", [1]),
        Response(7, None, {"protocol": 1}),
        Response(8, {"code": "unknown_packet", "message": "gone"}, None),
        Notification("withdrawn", [1]),
    ]
    assert connection.data_to_send() == b"" and connection.pending_output() == 0


def test_a_violation_with_a_msgid_is_answered_as_a_response() -> None:
    connection = RpcConnection()
    (event,) = connection.receive(msgpack.packb([0, 42, "get_stats", None]))
    assert isinstance(event, ProtocolViolation) and event.msgid == 42
    connection.report(event)
    (reply,) = sent(connection)
    assert reply == Response(42, {"code": "invalid_message", "message": event.message}, None)


def test_requests_and_notifications_from_the_peer_pass_through() -> None:
    connection = RpcConnection()
    events = connection.receive(encode(Request(3, "hello", [{}])) + encode(Notification("later", [1])))
    assert events == [Request(3, "hello", [{}]), Notification("later", [1])]


def test_a_fatal_violation_passes_through_and_ends_the_stream() -> None:
    connection = RpcConnection()
    msgid = connection.send_request("decide", [])
    events = connection.receive(b"\xc1" + answer(msgid))
    assert len(events) == 1 and isinstance(events[0], ProtocolViolation) and events[0].fatal
    assert msgid in connection.outstanding  # the answer after the bad byte was never read
