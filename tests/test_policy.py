"""The fallback policy: parsing (every error, with its place) and first-match decisions."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pmk import config
from pmk.core.policy import (
    DEFAULT_RULE,
    PolicyDecision,
    default_only,
    load_policy,
    parse_policy,
    shipped_policy,
)
from pmk.errors import UsageError
from pmk.verdicts import ConnKey, Verdict, conn_key_from_strings

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58

EXAMPLE = """
[[rule]]
name = "ssh-in"
direction = "inbound"
protocol = "tcp"
local_port = 22
verdict = "accept"
cache = true

[[rule]]
name = "lab-dns"
direction = "outbound"
protocol = ["udp", "tcp"]
remote_net = ["198.18.0.0/15", "fd00::/8"]
remote_port = 53
verdict = "accept"

[[rule]]
name = "high-ports"
protocol = "udp"
local_port = ["5000-5010", 6000]
local_net = "198.18.1.0/24"
verdict = "drop"
cache = true

[[rule]]
name = "ping"
protocol = ["icmp", 58]
verdict = "accept"

[default]
verdict = "block"
"""


def key(protocol: int, local: str, local_port: int, remote: str, remote_port: int) -> ConnKey:
    return conn_key_from_strings(protocol, local, local_port, remote, remote_port)


@pytest.mark.parametrize(
    ("conn", "outbound", "rule", "verdict", "permanent"),
    [
        (key(TCP, "198.18.1.1", 22, "198.18.0.9", 40000), False, "ssh-in", Verdict.ACCEPT, True),
        (key(TCP, "fd00::1", 22, "fd00::2", 40000), False, "ssh-in", Verdict.ACCEPT, True),
        # direction matters: an outbound connection from local port 22 is not inbound SSH
        (key(TCP, "198.18.1.1", 22, "198.18.0.9", 40000), True, "default", Verdict.BLOCK, False),
        (key(UDP, "198.18.1.1", 40000, "198.19.255.255", 53), True, "lab-dns", Verdict.ACCEPT, False),
        (key(TCP, "fd00::1", 40000, "fd12::53", 53), True, "lab-dns", Verdict.ACCEPT, False),
        # outside the CIDRs
        (key(UDP, "198.18.1.1", 40000, "198.20.0.1", 53), True, "default", Verdict.BLOCK, False),
        (key(UDP, "fe80::1", 40000, "fe80::2", 53), True, "default", Verdict.BLOCK, False),
        # port range edges and list members
        (key(UDP, "198.18.1.7", 5000, "198.18.0.9", 1), False, "high-ports", Verdict.DROP, True),
        (key(UDP, "198.18.1.7", 5010, "198.18.0.9", 1), True, "high-ports", Verdict.DROP, True),
        (key(UDP, "198.18.1.7", 5011, "198.18.0.9", 1), True, "default", Verdict.BLOCK, False),
        (key(UDP, "198.18.1.7", 6000, "198.18.0.9", 1), True, "high-ports", Verdict.DROP, True),
        (key(UDP, "198.18.2.7", 6000, "198.18.0.9", 1), True, "default", Verdict.BLOCK, False),
        # a v4-only CIDR never matches a v6 address
        (key(UDP, "fd00::7", 5005, "fd00::9", 1), True, "default", Verdict.BLOCK, False),
        (key(ICMP, "198.18.1.1", 0, "198.18.0.9", 0), False, "ping", Verdict.ACCEPT, False),
        (key(ICMPV6, "fd00::1", 0, "fd00::2", 0), True, "ping", Verdict.ACCEPT, False),
        (key(132, "198.18.1.1", 22, "198.18.0.9", 40000), False, "default", Verdict.BLOCK, False),
    ],
)
def test_first_matching_rule_decides(
    conn: ConnKey, outbound: bool, rule: str, verdict: Verdict, permanent: bool
) -> None:
    policy = parse_policy(EXAMPLE, "example.toml")
    assert policy.decide(conn, outbound) == PolicyDecision(verdict, permanent, rule)


def test_rule_names_are_the_policy_hits_keys_in_order() -> None:
    policy = parse_policy(EXAMPLE, "example.toml")
    assert policy.rule_names == ("ssh-in", "lab-dns", "high-ports", "ping", "default")
    assert policy.summary() == "policy example.toml: 4 rules, default block (not cached)"


def test_earlier_rule_wins_over_a_later_one() -> None:
    text = """
[[rule]]
name = "first"
protocol = "tcp"
verdict = "drop"
[[rule]]
name = "second"
protocol = "tcp"
local_port = 80
verdict = "accept"
[default]
verdict = "accept"
cache = true
"""
    policy = parse_policy(text, "t")
    assert policy.decide(key(TCP, "10.0.0.1", 80, "10.0.0.2", 1), False).rule == "first"
    assert policy.default == PolicyDecision(Verdict.ACCEPT, True, DEFAULT_RULE)


def test_every_error_is_reported_with_its_place() -> None:
    text = """
colour = "red"
[[rule]]
name = "web"
verdict = "maybe"
protocol = "icmp"
local_port = ["1-2", "x", 70000, "9-3"]
remote_net = ["10.0.0.1/8", 3]
direction = "in"
cache = "yes"
bogus = 1
[[rule]]
name = "web"
verdict = "accept"
[[rule]]
verdict = "accept"
protocol = "gre"
local_net = []
[default]
verdict = "reject"
when = "never"
"""
    with pytest.raises(UsageError) as caught:
        parse_policy(text, "bad.toml")
    lines = str(caught.value).splitlines()
    assert lines == [
        "bad.toml: unknown table or key 'colour' (expected [[rule]] and [default])",
        "bad.toml: rule 1 (web): bogus: unknown field (known: cache, direction, local_net, local_port, name, "
        "protocol, remote_net, remote_port, verdict)",
        "bad.toml: rule 1 (web): verdict: 'maybe' is not accept, block or drop",
        "bad.toml: rule 1 (web): cache: 'yes' is not true or false",
        "bad.toml: rule 1 (web): direction: 'in' is not inbound, outbound or any",
        "bad.toml: rule 1 (web): remote_net: '10.0.0.1/8': 10.0.0.1/8 has host bits set",
        "bad.toml: rule 1 (web): remote_net: 3 is not a CIDR string",
        "bad.toml: rule 1 (web): local_port: 'x' is not a port 1-65535 or a range like \"1000-2000\"",
        'bad.toml: rule 1 (web): local_port: 70000 is not a port 1-65535 or a range like "1000-2000"',
        "bad.toml: rule 1 (web): local_port: '9-3' is not a port 1-65535 or a range like \"1000-2000\"",
        "bad.toml: rule 1 (web): protocol: a rule with ports needs protocol tcp or udp (or a list of such)",
        "bad.toml: rule 2 (web): name: used by an earlier rule",
        "bad.toml: rule 3: name: required, a non-empty string",
        "bad.toml: rule 3: protocol: 'gre' is not tcp, udp, icmp, icmpv6, any or a number 0-255",
        "bad.toml: rule 3: protocol: an empty list matches nothing",
        "bad.toml: rule 3: local_net: an empty list matches nothing",
        "bad.toml: [default]: when: unknown field (known: cache, verdict)",
        "bad.toml: [default]: verdict: 'reject' is not accept, block or drop",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]\n", "bad.toml: not valid TOML: "),
        ("", "bad.toml: [default]: missing"),
        ("rule = 3\n[default]\nverdict='block'", "bad.toml: 'rule' must be an array of tables"),
        ("[default]\ncache = true", "bad.toml: [default]: verdict: required"),
        ("[[rule]]\nname='default'\nverdict='block'\n[default]\nverdict='block'", "is the final default's name"),
    ],
)
def test_file_level_mistakes(text: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_policy(text, "bad.toml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_load_policy_reads_a_file_and_names_an_unreadable_one(tmp_path: Any) -> None:
    path = tmp_path / "p.toml"
    path.write_text(EXAMPLE)
    assert load_policy(path).source == str(path)
    with pytest.raises(UsageError, match=r"cannot read policy .*missing.toml: No such file"):
        load_policy(tmp_path / "missing.toml")


def test_default_only_is_the_flag_shorthand() -> None:
    policy = default_only(Verdict.ACCEPT)
    assert policy.rule_names == ("default",)
    assert policy.decide(key(TCP, "10.0.0.1", 22, "10.0.0.2", 1), False) == PolicyDecision(
        Verdict.ACCEPT, False, "default"
    )


def test_shipped_policy_keeps_ssh_open_and_otherwise_fails_closed_like_the_configured_default() -> None:
    policy = shipped_policy()
    ssh = key(TCP, "198.18.0.1", 22, "198.18.0.2", 50000)
    assert policy.decide(ssh, outbound=False) == PolicyDecision(Verdict.ACCEPT, True, "ssh-in")
    assert policy.decide(ssh, outbound=True).rule == "default"
    assert policy.decide(key(TCP, "198.18.0.1", 80, "198.18.0.2", 50000), False).rule == "default"
    assert policy.default == PolicyDecision(config.DEFAULT_VERDICT, False, "default")


# -- property: the compiled matcher agrees with a plain reading of the rules ----------------

NETS = ["10.0.0.0/8", "10.1.0.0/16", "192.168.0.0/24", "0.0.0.0/0", "fd00::/8", "fd00:1::/32", "::/0"]
ADDRESSES_V4 = ["10.0.0.1", "10.1.2.3", "192.168.0.77", "8.8.8.8", "10.255.255.255"]
ADDRESSES_V6 = ["fd00::1", "fd00:1::5", "fe80::1", "2001:db8::1"]

ports = st.integers(1, 65535)
port_item = st.one_of(
    ports, st.tuples(ports, ports).map(lambda p: f"{min(p)}-{max(p)}"), st.sampled_from([22, 53, 80, 443])
)
rules = st.lists(
    st.fixed_dictionaries(
        {"verdict": st.sampled_from(["accept", "block", "drop"]), "cache": st.booleans()},
        optional={
            "direction": st.sampled_from(["inbound", "outbound", "any"]),
            "local_net": st.lists(st.sampled_from(NETS), min_size=1, max_size=3),
            "remote_net": st.sampled_from(NETS),
            "local_port": st.lists(port_item, min_size=1, max_size=3),
            "remote_port": port_item,
        },
    ),
    max_size=6,
)


def to_toml(raw_rules: list[dict[str, Any]]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return f'"{v}"' if isinstance(v, str) else str(v)

    out = []
    for index, rule in enumerate(raw_rules):
        out.append(f'[[rule]]\nname = "r{index}"\nprotocol = ["tcp", "udp"]')
        out += [f"{name} = {value(v)}" for name, v in rule.items()]
    out.append('[default]\nverdict = "block"')
    return "\n".join(out)


def reference(raw_rules: list[dict[str, Any]], conn: ConnKey, outbound: bool) -> str:
    """The rules read literally with ipaddress objects, first match wins."""

    def in_ports(port: int, spec: Any) -> bool:
        for item in spec if isinstance(spec, list) else [spec]:
            low, _, high = str(item).partition("-")
            if int(low) <= port <= int(high or low):
                return True
        return False

    def in_nets(address: bytes, spec: Any) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in ipaddress.ip_network(n) for n in (spec if isinstance(spec, list) else [spec]))

    for index, rule in enumerate(raw_rules):
        direction = rule.get("direction", "any")
        if direction != "any" and (direction == "outbound") != outbound:
            continue
        if "local_net" in rule and not in_nets(conn.local_ip, rule["local_net"]):
            continue
        if "remote_net" in rule and not in_nets(conn.remote_ip, rule["remote_net"]):
            continue
        if "local_port" in rule and not in_ports(conn.local_port, rule["local_port"]):
            continue
        if "remote_port" in rule and not in_ports(conn.remote_port, rule["remote_port"]):
            continue
        return f"r{index}"
    return "default"


@settings(max_examples=300, deadline=None)
@given(raw_rules=rules, protocol=st.sampled_from([TCP, UDP]), outbound=st.booleans(), data=st.data())
def test_compiled_rules_agree_with_a_literal_reading(
    raw_rules: list[dict[str, Any]], protocol: int, outbound: bool, data: st.DataObject
) -> None:
    v6 = data.draw(st.booleans())
    addresses = ADDRESSES_V6 if v6 else ADDRESSES_V4
    port_values = st.one_of(ports, st.sampled_from([1, 22, 53, 80, 443, 65535]))
    conn = key(
        protocol,
        data.draw(st.sampled_from(addresses)),
        data.draw(port_values),
        data.draw(st.sampled_from(addresses)),
        data.draw(port_values),
    )
    policy = parse_policy(to_toml(raw_rules), "generated")
    decision = policy.decide(conn, outbound)
    assert decision.rule == reference(raw_rules, conn, outbound)
    if decision.rule != "default":
        rule = raw_rules[int(decision.rule[1:])]
        assert decision == PolicyDecision(Verdict(rule["verdict"]), rule["cache"], decision.rule)
