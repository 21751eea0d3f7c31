"""`toy`: a device type with no data path.  It connects when its frontend says Initialised, echoes the frontend's
`word` back with its configured greeting, and counts its connects for the metrics endpoint."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from backends.xenbus.device import BackendDevice
from backends.xenbus.registry import AttachSpec, CommandError, Commands, DeviceType, StatusColumns, register
from backends.xenbus.state import XenbusState


@dataclass
class ToyConfig:
    greeting: str = "hello"  # written to the backend dir on connect
    max_word: int = 16  # longest frontend `word` accepted


class ToyData:
    def __init__(self) -> None:
        self.connects = 0

    def stats(self) -> dict[str, Any]:
        return {"queues": [{"requests": {"connect": self.connects}}]}


class ToyDeviceClass:
    connect_states = frozenset({XenbusState.INITIALISED, XenbusState.CONNECTED})

    def __init__(self, cfg: ToyConfig, type_names: tuple[str, ...]) -> None:
        self.cfg = cfg
        self.type_names = type_names

    async def realize(self, dev: BackendDevice) -> None:
        dev.data = ToyData()
        await dev.write_backend({"feature-toy": "1"})

    async def connect(self, dev: BackendDevice) -> None:
        word = await dev.read_frontend("word", max_len=self.cfg.max_word) or ""
        dev.data.connects += 1
        await dev.write_backend({"greeting": f"{self.cfg.greeting} {word}".strip()})

    async def disconnect(self, dev: BackendDevice) -> None:
        pass

    async def unrealize(self, dev: BackendDevice) -> None:
        dev.data = None


def _spec(args: argparse.Namespace) -> AttachSpec:
    if not args.name.isalpha():
        raise CommandError(f"toy name {args.name!r} must be letters only")
    return AttachSpec(devid=args.number, backend={"name": args.name}, frontend={"name": args.name})


def _add_attach(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--number", type=int, default=0)


def _add_detach(p: argparse.ArgumentParser) -> None:
    p.add_argument("number", type=int)


DEVICE_TYPE = register(DeviceType(
    name="toy",
    kind="toy",
    frontend_type="toy",
    backend_types=("toy",),
    default_backend_types=(),
    config=ToyConfig,
    config_ranges={"max_word": (1, 64)},
    device_class=lambda cfg, names: ToyDeviceClass(cfg, names),
    commands=Commands(add_attach_arguments=_add_attach, attach_spec=_spec, add_detach_arguments=_add_detach,
                      detach_devid=lambda args: int(args.number), describe=lambda args: "toy"),
    status=StatusColumns(summary_key="name", backend_keys=("greeting",), frontend_keys=("word",)),
))
