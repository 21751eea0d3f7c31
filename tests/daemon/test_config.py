from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from backends.blk.vdev import VdevError, vdev_to_devid
from backends.daemon.config import Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_example_equals_defaults() -> None:
    shipped = load_config(ROOT / "contrib" / "pvback.toml")
    default = Config()
    assert shipped.platform == default.platform
    assert shipped.serve == default.serve
    assert shipped.blk == default.blk
    assert shipped.section("net") == default.section("net")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[nope]\nx = 1", "unknown section [nope]"),
        ("[blk]\nmax_queuez = 1", "unknown key [blk] max_queuez"),
        ("[blk]\nmax_queues = 'two'", "expected an integer"),
        ("[blk]\nmax_ring_page_order = 9", "outside 0..4"),
        ("[platform]\nkind = 'kvm'", "not one of auto, xen, emulated"),
        ("[serve]\nbackend_types = 'qdisk'", "list of strings"),
        ("[serve]\ndrain_timeout_s = -1", "non-negative"),
        ("[net]\npoll_us = 5000", "outside 0..1000"),
    ],
)
def test_bad_values_are_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(tomllib.loads(text))


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[blk\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_values_are_applied() -> None:
    cfg = parse_config({"blk": {"max_queues": 4, "poll_us": 50}, "serve": {"backend_types": ["qdisk", "vbd"]},
                        "net": {"poll_us": 20}})
    assert cfg.blk.max_queues == 4 and cfg.blk.poll_us == 50
    assert cfg.net.poll_us == 20
    assert cfg.serve.backend_types == ["qdisk", "vbd"]


@pytest.mark.parametrize(
    ("name", "devid"),
    [("xvda", 51712), ("xvdb", 51728), ("xvdp", 51712 + 15 * 16), ("xvda1", 51713), ("xvdq", (1 << 28) | (16 << 8)),
     ("768", 768)],
)
def test_vdev(name: str, devid: int) -> None:
    assert vdev_to_devid(name) == devid


@pytest.mark.parametrize("name", ["sda", "xvd", "xvdA", "0", "-1", "xvda999"])
def test_bad_vdev(name: str) -> None:
    with pytest.raises(VdevError):
        vdev_to_devid(name)
