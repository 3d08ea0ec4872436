"""Where each ``serve`` setting comes from: flag, then environment, then config file, then default.

Everything is derived from ``pmk.config.OPTIONS``: the argparse flags, the
``PMK_*`` variables and the config file keys. Mistakes in the environment,
the file and the policy are all collected and reported together, one line
each, as a UsageError.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pmk.config import OPTIONS, Repeated, ServeConfig, Switch, platform_endpoint
from pmk.core.policy import Policy, default_only, load_policy, shipped_policy
from pmk.errors import UsageError
from pmk.verdicts import Verdict

#: The environment variable naming a config file when ``--config`` is not given.
CONFIG_ENV = "PMK_CONFIG"
_BY_NAME = {option.name: option for option in OPTIONS}


def add_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per option; unset flags stay None so lower layers show through."""
    parser.add_argument(
        "--config", metavar="FILE", default=None, help=f"read options from this TOML file (or ${CONFIG_ENV})"
    )
    for option in OPTIONS:
        shown = "" if option.default in (None, "", ()) else f"; default {option.default}"
        help_text = f"{option.help} (${option.env}{shown})"
        kind = option.kind
        if isinstance(kind, Switch):
            parser.add_argument(
                option.flag, dest=option.dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif isinstance(kind, Repeated):
            parser.add_argument(
                option.flag,
                dest=option.dest,
                action="append",
                type=_argparse_type(kind.one),
                default=None,
                metavar=kind.metavar(),
                help=help_text,
            )
        else:
            parser.add_argument(
                option.flag,
                dest=option.dest,
                type=_argparse_type(kind.from_text),
                default=None,
                metavar=kind.metavar(),
                help=help_text,
            )


def _argparse_type(parse: Any) -> Any:
    """Wrap a parser so argparse prints its message (one usage line, exit 2) instead of 'invalid value'."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = "value"
    return convert


@dataclass
class Layered:
    """The merged settings, and where each came from (for ``--check`` and messages)."""

    config: ServeConfig
    #: option name -> "--flag", "PMK_X", "config FILE" (options left at their default are absent)
    sources: dict[str, str]

    def summary(self) -> str:
        """One line for ``pmk serve --check``."""
        where = sorted(set(self.sources.values()))
        given = f"set by {', '.join(where)}" if where else "all defaults"
        return f"configuration valid ({given}); {self.config.policy.summary()}; endpoint {self.config.endpoint}"


def resolve(args: argparse.Namespace, environ: Mapping[str, str]) -> Layered:
    """Merge flags, environment, config file and defaults; raise UsageError listing every mistake."""
    errors: list[str] = []
    values: dict[str, tuple[Any, str]] = {}
    config_path = args.config or environ.get(CONFIG_ENV) or ""
    if config_path:
        _read_file(config_path, "--config" if args.config else CONFIG_ENV, values, errors)
    for option in OPTIONS:
        text = environ.get(option.env)
        if text is None:
            continue
        try:
            values[option.name] = (option.kind.from_text(text), option.env)
        except ValueError as error:
            errors.append(f"{option.env}={text}: {error}")
    for option in OPTIONS:
        value = getattr(args, option.dest, None)
        if isinstance(value, list):  # a repeated flag: check the items together
            try:
                value = option.kind.check(tuple(value))
            except ValueError as error:
                errors.append(f"{option.flag}: {error}")
                continue
        if value is not None:
            values[option.name] = (value, option.flag)
    config = ServeConfig(endpoint=platform_endpoint())  # PMK_PIPE is read above, like every variable
    for name, (value, _) in values.items():
        attribute = _BY_NAME[name].attribute
        if attribute:
            setattr(config, attribute, value)
    try:
        config.policy = _policy(values)
    except UsageError as error:
        errors += str(error).splitlines()
    if config.metrics and not config.metrics_public:
        errors += _metrics_refused(config.metrics, values["metrics"][1])
    if errors:
        raise UsageError("\n".join(errors))
    config.default_verdict = config.policy.default.verdict
    return Layered(config, {name: source for name, (_, source) in values.items()})


def _read_file(path: str, named_by: str, values: dict[str, tuple[Any, str]], errors: list[str]) -> None:
    """Add the file's settings to ``values``; a relative policy path is taken from the file's directory."""
    place = f"config {path}"
    try:
        document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        errors.append(f"cannot read config {path} ({named_by}): {error.strerror or error}")
        return
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        errors.append(f"{place}: not valid TOML: {error}")
        return
    for key, raw in document.items():
        option = _BY_NAME.get(key)
        if option is None:
            close = difflib.get_close_matches(key, _BY_NAME, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{place}: {key}: unknown option{hint}")
            continue
        try:
            value = option.kind.from_toml(raw)
        except ValueError as error:
            errors.append(f"{place}: {key}: {error}")
            continue
        if option.name == "policy" and value and not os.path.isabs(value):
            value = str(Path(path).parent / value)
        values[key] = (value, place)


def _via(source: str) -> str:
    return "" if source.startswith("--") else f" (from {source})"


def _metrics_refused(address: str, source: str) -> list[str]:
    """The error for a non-loopback ``--metrics`` without ``--metrics-public`` (the form is checked already)."""
    from pmk.metrics import parse_listen

    try:
        parse_listen(address, public=False)
    except UsageError as error:
        return [f"{error}{_via(source)}"]
    return []


def _policy(values: dict[str, tuple[Any, str]]) -> Policy:
    """The policy the settings ask for: a file, ``--default-verdict`` alone, or the shipped one."""
    policy_file, policy_source = values.get("policy", ("", ""))
    verdict, verdict_source = values.get("default-verdict", (None, ""))
    if policy_file and verdict:
        raise UsageError(
            f"--default-verdict{_via(verdict_source)} and --policy{_via(policy_source)} exclude each other;"
            " put the default in the policy's [default]"
        )
    if verdict:
        return default_only(Verdict(verdict))
    if policy_file:
        return load_policy(policy_file)
    return shipped_policy()
