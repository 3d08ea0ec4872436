"""The method handlers of SPEC section 4, called through the service without sockets."""

from __future__ import annotations

from typing import Any

import pytest

import pmk
from pmk.core import commands as cmd
from pmk.core import events as ev
from pmk.core.service import Service
from tests.test_service import applied, hello, joined_decider, of, packet, service


def call(svc: Service, method: str, *params: Any, client: int = 1, now: float = 0.0) -> cmd.Reply | cmd.ReplyError:
    out = svc.handle(ev.ClientRequest(client, 99, method, list(params)), now)
    (reply,) = [c for c in out if isinstance(c, cmd.Reply | cmd.ReplyError)]
    assert reply.client == client and reply.msgid == 99
    return reply


def error_code(reply: cmd.Reply | cmd.ReplyError) -> str:
    assert isinstance(reply, cmd.ReplyError)
    return reply.code.value


def test_get_payload_serves_a_held_packet_until_it_is_settled() -> None:
    svc = service()
    joined_decider(svc)
    (decide,) = of(cmd.SendDecide, svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0))
    reply = call(svc, "get_payload", decide.info["id"])
    assert isinstance(reply, cmd.Reply) and reply.result == packet(1).raw
    svc.handle(ev.DecideAnswered(1, decide.msgid, None, {"verdict": "accept"}), now=0.1)
    assert error_code(call(svc, "get_payload", decide.info["id"])) == "unknown_packet"
    assert error_code(call(svc, "get_payload", -1)) == "invalid_params"
    assert error_code(call(svc, "get_payload")) == "invalid_params"


def test_get_stats_and_get_version_take_no_params() -> None:
    svc = service()
    stats = call(svc, "get_stats", now=5.0)
    assert isinstance(stats, cmd.Reply) and stats.result["uptime"] == 5.0 and stats.result["backend"] == "fake"
    version = call(svc, "get_version")
    assert isinstance(version, cmd.Reply) and version.result == {
        "protocol": 1,
        "version": pmk.__version__,
        "protocols": [1],
    }
    assert error_code(call(svc, "get_stats", 1)) == "invalid_params"
    assert error_code(call(svc, "get_version", {})) == "invalid_params"


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ([{"protocol": 2}], "unsupported_protocol"),
        ([{"protocol": "1"}], "invalid_params"),
        ([{"protocol": 1, "role": "boss"}], "invalid_params"),
        ([{"protocol": 1, "name": "x" * 257}], "invalid_params"),
        ([], "invalid_params"),
    ],
)
def test_hello_refuses_what_it_cannot_serve(params: list[Any], code: str) -> None:
    assert error_code(call(service(), "hello", *params)) == code


def test_hello_makes_a_decider_and_a_second_hello_an_observer() -> None:
    svc = service()
    joined_decider(svc)
    assert svc.stats(now=0.0)["deciders"] == 1
    svc.handle(hello(1, role="observer", msgid=1), now=0.0)
    assert svc.stats(now=0.0)["deciders"] == 0
    # Now nobody is asked: the policy settles.
    assert applied(svc.handle(ev.PacketsCaptured([packet(1)]), now=0.0)) == [([1], svc.policy.default.verdict, False)]


def test_an_unknown_method_is_named_in_the_error() -> None:
    reply = call(service(), "list_everything")
    assert error_code(reply) == "unknown_method" and "list_everything" in reply.message  # type: ignore[union-attr]


CONN = {"protocol": 17, "local_ip": "198.18.0.2", "local_port": 1, "remote_ip": "198.18.0.1", "remote_port": 2}


@pytest.mark.parametrize(
    "params",
    [
        [{**CONN, "local_ip": "nonsense"}, "drop"],
        [{**CONN, "remote_ip": "fd00::1"}, "drop"],
        [CONN, "reroute"],
        [{**CONN, "local_port": 70000}, "drop"],
        [CONN],
    ],
)
def test_update_verdict_checks_its_params(params: list[Any]) -> None:
    assert error_code(call(service(kernel=True), "update_verdict", *params)) == "invalid_params"
