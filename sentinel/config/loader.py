"""Load configuration: embedded default < YAML file < environment < CLI flags.

Validation happens once, here; the result is an immutable ``SentinelConfig``.
Errors are raised as ``ConfigError`` whose message names the key, what was
expected and where the bad value came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from sentinel.config.schema import SentinelConfig

ENV_PREFIX = "SENTINEL_"
ENV_SEP = "__"


class ConfigError(Exception):
    """A configuration problem a user must fix; the message says which key and why."""


def default_yaml_text() -> str:
    return resources.files("sentinel.config").joinpath("default.yaml").read_text()


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, val in over.items():
        if isinstance(val, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], val)
        else:
            out[key] = val
    return out


def _set_path(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ConfigError(f"{origin}: empty key")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin}: '{dotted}': '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def _parse_scalar(text: str, origin: str) -> Any:
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: cannot parse value {text!r}: {exc}") from None


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of sections at the top, "
            f"got {type(data).__name__}"
        )
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Map of dotted key -> (raw value, variable name) from SENTINEL_* variables."""
    out: dict[str, tuple[str, str]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or ENV_SEP not in name:
            continue
        dotted = ".".join(p.lower() for p in name[len(ENV_PREFIX) :].split(ENV_SEP))
        out[dotted] = (raw, name)
    return out


def _describe(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    got = err.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    shown = repr(got)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    msg = msg.removeprefix("Value error, ")
    return f"{msg} (got {shown})" if kind != "value_error" else msg


def _format_errors(exc: ValidationError, origins: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        where = origins.get(loc)
        if where is None:
            # a value error of a whole section: the nearest origin that lies inside it
            where = next((o for k, o in origins.items() if k.startswith(loc + ".")), None)
        suffix = f" [from {where}]" if where else ""
        lines.append(f"  {loc or '(top level)'}: {_describe(err)}{suffix}")
    return "invalid configuration:\n" + "\n".join(lines)


def _flatten_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, val in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(val, Mapping):
            keys.extend(_flatten_keys(val, dotted + "."))
    return keys


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    sets: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
) -> SentinelConfig:
    """Build the validated configuration.

    ``sets`` are ``section.key=value`` strings (``--set``); ``overrides`` are
    dotted keys from named CLI flags; both beat the environment, which beats the file.
    """
    environ = os.environ if environ is None else environ
    tree: dict[str, Any] = yaml.safe_load(default_yaml_text())
    origins: dict[str, str] = {}

    if path is not None:
        user = _read_file(path)
        for key in _flatten_keys(user):
            origins[key] = f"file {path}"
        # a user's tier list replaces the default one whole
        tree = _deep_merge(tree, user)

    for dotted, (raw, name) in sorted(env_overrides(environ).items()):
        _set_path(tree, dotted, _parse_scalar(raw, f"env {name}"), f"env {name}")
        origins[dotted] = f"env {name}"

    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        _set_path(tree, dotted, _parse_scalar(raw, f"--set {dotted}"), f"--set {dotted}")
        origins[dotted] = f"--set {dotted}"

    for dotted, value in (overrides or {}).items():
        _set_path(tree, dotted, value, f"flag for {dotted}")
        origins[dotted] = "command-line flag"

    try:
        return SentinelConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origins)) from None
