"""Validation of what clients send: method params and decide results.

Each function returns the checked value or raises ``InvalidParams`` with a
message fit for the wire.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pmk.rpc import names
from pmk.verdicts import ConnKey, Verdict, conn_key_from_strings

ROLES = ("decider", "observer")


class InvalidParams(ValueError):
    """The peer sent something of the wrong shape; the text goes on the wire."""


def _one_map(params: list[Any], method: str) -> dict[Any, Any]:
    if len(params) != 1 or not isinstance(params[0], dict):
        raise InvalidParams(f"{method} takes one map")
    return params[0]


def _no_params(params: list[Any], method: str) -> None:
    if params:
        raise InvalidParams(f"{method} takes no params")


#: Longest ``hello`` name, in characters (code points: ``len`` of a str), SPEC 4.
MAX_NAME = 256


class Hello(NamedTuple):
    protocol: int
    name: str
    role: str
    #: whether ``decide`` infos carry the held packet's bytes
    payload: bool


def check_hello(params: list[Any]) -> Hello:
    hello = _one_map(params, names.HELLO)
    protocol, name, role = hello.get("protocol"), hello.get("name", ""), hello.get("role", "observer")
    payload = hello.get("payload", False)
    if type(protocol) is not int:
        raise InvalidParams("hello.protocol must be an integer")
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise InvalidParams(f"hello.name must be a string of at most {MAX_NAME} characters")
    if role not in ROLES:
        raise InvalidParams("hello.role must be 'decider' or 'observer'")
    if type(payload) is not bool:
        raise InvalidParams("hello.payload must be a boolean")
    return Hello(protocol, name, role, payload)


def check_packet_id(params: list[Any], method: str) -> int:
    if len(params) != 1 or type(params[0]) is not int or params[0] < 0:
        raise InvalidParams(f"{method} takes one packet id (a non-negative integer)")
    return params[0]


def _port(value: Any, field: str) -> int:
    if type(value) is not int or not 0 <= value <= 65535:
        raise InvalidParams(f"{field} must be an integer 0..65535")
    return value


def check_conn(value: Any) -> ConnKey:
    """A connection map from the wire, as a cache key."""
    if not isinstance(value, dict):
        raise InvalidParams("conn must be a map")
    protocol = value.get("protocol")
    if type(protocol) is not int or not 0 <= protocol <= 255:
        raise InvalidParams("conn.protocol must be an integer 0..255")
    local_ip, remote_ip = value.get("local_ip"), value.get("remote_ip")
    if not isinstance(local_ip, str) or not isinstance(remote_ip, str):
        raise InvalidParams("conn.local_ip and conn.remote_ip must be strings")
    local_port = _port(value.get("local_port"), "conn.local_port")
    remote_port = _port(value.get("remote_port"), "conn.remote_port")
    try:
        return conn_key_from_strings(protocol, local_ip, local_port, remote_ip, remote_port)
    except ValueError as error:
        raise InvalidParams(f"conn: {error}") from None


def check_update_verdict(params: list[Any]) -> tuple[ConnKey, Verdict]:
    if len(params) != 2:
        raise InvalidParams("update_verdict takes [conn, verdict]")
    key = check_conn(params[0])
    try:
        verdict = Verdict.parse(params[1])
    except ValueError as error:
        raise InvalidParams(str(error)) from None
    return key, verdict


def check_no_params(params: list[Any], method: str) -> None:
    _no_params(params, method)
