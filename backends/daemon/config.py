"""pvback's TOML configuration: `[platform]` and `[serve]` with every default documented here, and one section
per device type (`[blk]`, ...), documented in that type's package and registered with it.

The file is optional: `pvback serve` runs on the defaults.  Unknown keys and wrong types are errors (an
operator's typo must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.daemon.devtypes import all_backend_types, default_backend_types, load_device_types

DEFAULT_CONFIG_PATH = Path("/etc/pvback/pvback.toml")
DEFAULT_SIM_DIR = "/run/pvback-sim"


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class PlatformConfig:
    # "auto": real Xen when /dev/xen/gntdev and a xenstore exist, else the emulated platform in sim_dir.
    kind: str = "auto"
    sim_dir: str = DEFAULT_SIM_DIR


@dataclass
class ServeConfig:
    # Backend directory types served (default: each device type's own defaults, e.g. blk's "qdisk": what xl
    # writes for backendtype=qdisk and what no dom0 kernel driver claims; "vbd" only when xen-blkback is not
    # loaded, it would race us for the device).
    backend_types: list[str] = field(default_factory=default_backend_types)
    # Prometheus text endpoint, HOST:PORT (port 0 picks a free one and logs it); empty disables it.
    metrics_listen: str = "127.0.0.1:9477"
    # "text" (key=value) or "json", one line per state change and per error.
    log_format: str = "text"
    log_level: str = "info"
    # How long SIGTERM waits for in-flight I/O before giving up.
    drain_timeout_s: float = 10.0


@dataclass
class DaemonConfig:
    # The user `pvback serve` runs as once it has opened what it needs (backends.daemon.privdrop): "auto" =
    # "pvback" when that user exists (contrib/sysusers.d creates it), else stay as started, with a warning;
    # a name or uid = that user, which must exist; "" = stay as started (root).  Needs a restart.
    user: str = "auto"


def _device_sections() -> dict[str, Any]:
    return {dt.name: dt.config() for dt in load_device_types()}


@dataclass
class Config:
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    # One section per device type, by its name (`cfg.blk` reads `devices["blk"]`).
    devices: dict[str, Any] = field(default_factory=_device_sections)
    source: str = "<defaults>"

    def __getattr__(self, name: str) -> Any:
        devices = self.__dict__.get("devices")
        if devices is not None and name in devices:
            return devices[name]
        raise AttributeError(name)

    def section(self, name: str) -> Any:
        return getattr(self, name)

    @property
    def section_names(self) -> list[str]:
        return ["platform", "serve", "daemon", *self.devices]


_SECTIONS: dict[str, type[Any]] = {"platform": PlatformConfig, "serve": ServeConfig, "daemon": DaemonConfig}
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("platform", "kind"): ("auto", "xen", "emulated"),
    ("serve", "log_format"): ("text", "json"),
    ("serve", "log_level"): ("debug", "info", "warning", "error"),
}
_RANGES: dict[tuple[str, str], tuple[int, int]] = {}


def _rules(section: str) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[str, ...]]]:
    """(ranges, choices) of a section's keys: the loader's own, or the device type's."""
    for dt in load_device_types():
        if dt.name == section:
            return dict(dt.config_ranges), dict(dt.config_choices)
    return ({k: v for (s, k), v in _RANGES.items() if s == section},
            {k: v for (s, k), v in _CHOICES.items() if s == section})


def _check_value(section: str, key: str, value: Any, default: Any) -> Any:
    where = f"[{section}] {key}"
    if isinstance(default, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(default, bool):
            raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    elif isinstance(default, int):
        if not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        lo, hi = _rules(section)[0].get(key, (-(1 << 62), 1 << 62))
        if not lo <= value <= hi:
            raise ConfigError(f"{where}: {value} is outside {lo}..{hi}")
    elif isinstance(default, float):
        if not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"{where}: expected a non-negative number, got {value!r}")
        value = float(value)
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        choices = _rules(section)[1].get(key)
        if choices and value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    elif isinstance(default, list):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where}: expected a list of strings, got {value!r}")
    check = _CHECKS.get((section, key))
    if check is not None:
        check(where, value)
    return value


def check_backend_types(where: str, types: list[str]) -> None:
    known = all_backend_types()
    if not types:
        raise ConfigError(f"{where}: empty; serve at least one of {', '.join(known)}")
    for t in types:
        if t not in known:
            raise ConfigError(f"{where}: unknown backend type {t!r} (pvback serves {', '.join(known)})")
    if len(set(types)) != len(types):
        raise ConfigError(f"{where}: {types!r} names a type twice")


def parse_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 hosts in brackets) -> (host, port); ValueError when it is not one."""
    host, _, port = listen.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{listen!r} is not HOST:PORT (e.g. 127.0.0.1:9477, or '' to disable)")
    return host, int(port)


def check_listen(where: str, listen: str) -> None:
    if listen:
        try:
            parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _check_drain(where: str, value: float) -> None:
    if not 0 < value <= 3600:
        raise ConfigError(f"{where}: {value} is outside (0, 3600] seconds")


_CHECKS: dict[tuple[str, str], Callable[[str, Any], None]] = {
    ("serve", "backend_types"): check_backend_types,
    ("serve", "metrics_listen"): check_listen,
    ("serve", "drain_timeout_s"): _check_drain,
}


def parse_config(data: dict[str, Any], source: str = "<string>") -> Config:
    cfg = Config(source=source)
    sections = {**_SECTIONS, **{dt.name: dt.config for dt in load_device_types()}}
    for section, body in data.items():
        cls = sections.get(section)
        if cls is None:
            raise ConfigError(f"{source}: unknown section [{section}] (known: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        obj = getattr(cfg, section)
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in body.items():
            if key not in known:
                raise ConfigError(f"{source}: unknown key [{section}] {key} (known: {', '.join(known)})")
            setattr(obj, key, _check_value(section, key, value, getattr(obj, key)))
    return cfg


def load_config(path: str | Path | None) -> Config:
    """Load `path`, or the default path if it exists, or the built-in defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    return parse_config(data, str(p))
