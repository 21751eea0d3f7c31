"""The manager's store and KEK sources without a manager process: wrapping, bindings, a wrong KEK, shredding,
KEK rotation, and the key file's and directory's permission checks."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from backends.vtpmmgr import kek as keksrc
from backends.vtpmmgr.store import NotProvisioned, Store, StoreError

DOM = "3f1c2a4e-0000-4000-8000-00000000000a"
VTPM = "7b9d8c6e-1111-4111-8111-00000000000b"


def new_store(tmp_path: Path, kek: bytes | None = None) -> tuple[Store, bytearray]:
    k = bytearray(kek or os.urandom(32))
    s = Store(tmp_path / "mgr")
    s.initialise("file", k, {})
    s.open(bytearray(k))
    return s, k


def every_byte(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_a_key_is_stored_only_wrapped_and_unwraps_under_its_binding(tmp_path: Path) -> None:
    s, _ = new_store(tmp_path)
    key = os.urandom(32)
    rec = s.create(DOM.upper(), 0, vtpm_uuid=VTPM, group="gold", key=key)
    assert rec.domain_uuid == DOM  # normalised
    disk = every_byte(tmp_path)
    for form in (key, key.hex().encode(), base64.b64encode(key)):
        assert form not in disk
    assert s.key_of(s.get(DOM, 0)) == key
    assert oct(os.stat(tmp_path / "mgr").st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "mgr").rglob("*") if p.is_file())


@pytest.mark.parametrize("field,value", [("domain_uuid", "3f1c2a4e-0000-4000-8000-00000000000c"), ("devid", 1),
                                         ("group", "other"), ("vtpm_uuid", "7b9d8c6e-1111-4111-8111-00000000000d")])
def test_an_edited_binding_does_not_unwrap(tmp_path: Path, field: str, value: object) -> None:
    """Moving a wrapped key to another guest's record (or renaming the record) makes it useless."""
    s, _ = new_store(tmp_path)
    s.create(DOM, 0, vtpm_uuid=VTPM, group="gold")
    path = s.keys / f"{DOM}.0.json"
    d = json.loads(path.read_text())
    d[field] = value
    path.write_text(json.dumps(d))
    rec = s._load(path)
    with pytest.raises(StoreError, match="does not unwrap"):
        s.key_of(rec)


def test_a_wrong_kek_is_refused_before_any_record(tmp_path: Path) -> None:
    s, _ = new_store(tmp_path)
    s.create(DOM, 0, vtpm_uuid=VTPM)
    before = every_byte(tmp_path)
    other = Store(tmp_path / "mgr")
    with pytest.raises(StoreError, match="not the store's KEK"):
        other.open(bytearray(os.urandom(32)))
    with pytest.raises(StoreError, match="not open"):
        other.key_of(s.get(DOM, 0))
    assert every_byte(tmp_path) == before


def test_delete_shreds_the_wrapped_key(tmp_path: Path) -> None:
    s, _ = new_store(tmp_path)
    rec = s.create(DOM, 0, vtpm_uuid=VTPM)
    wrapped = base64.b64decode(rec.wrapped)
    s.delete(DOM, 0)
    with pytest.raises(NotProvisioned):
        s.get(DOM, 0)
    assert wrapped not in every_byte(tmp_path) and rec.wrapped.encode() not in every_byte(tmp_path)
    assert list(s.records()) == []


def test_one_binding_one_vtpm(tmp_path: Path) -> None:
    s, _ = new_store(tmp_path)
    s.create(DOM, 0, vtpm_uuid=VTPM)
    with pytest.raises(StoreError, match="already has a vTPM"):
        s.create(DOM, 0, vtpm_uuid="7b9d8c6e-1111-4111-8111-00000000000e")
    with pytest.raises(StoreError, match="already bound"):
        s.create("3f1c2a4e-0000-4000-8000-00000000000f", 0, vtpm_uuid=VTPM)
    with pytest.raises(StoreError, match="not a UUID"):
        s.create("../../etc", 0, vtpm_uuid=VTPM)
    with pytest.raises(StoreError, match="devid"):
        s.create(DOM, 999, vtpm_uuid=VTPM)


def test_rotating_the_kek_keeps_every_key(tmp_path: Path) -> None:
    s, old = new_store(tmp_path)
    keys = {d: os.urandom(32) for d in range(3)}
    for d, k in keys.items():
        s.create(DOM, d, vtpm_uuid=f"7b9d8c6e-1111-4111-8111-00000000010{d}", key=k)
    new = bytearray(os.urandom(32))
    assert s.set_kek("file", bytearray(new), {}) == 3
    reopened = Store(tmp_path / "mgr")
    with pytest.raises(StoreError):
        reopened.open(bytearray(old))
    reopened.open(bytearray(new))
    assert {d: bytes(reopened.key_of(reopened.get(DOM, d))) for d in keys} == keys


def test_the_key_file_must_be_the_managers_alone(tmp_path: Path) -> None:
    path = tmp_path / "kek"
    kek = keksrc.create_key_file(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert keksrc.read_key_file(path) == kek
    with pytest.raises(keksrc.KekError, match="already exists"):
        keksrc.create_key_file(path)
    os.chmod(path, 0o640)
    with pytest.raises(keksrc.KekError, match="others may read"):
        keksrc.read_key_file(path)
    os.chmod(path, 0o600)
    path.write_bytes(b"short")
    with pytest.raises(keksrc.KekError, match="5 bytes"):
        keksrc.read_key_file(path)
    with pytest.raises(keksrc.KekError, match="does not exist"):
        keksrc.read_key_file(tmp_path / "missing")


def test_a_store_readable_by_others_is_refused(tmp_path: Path) -> None:
    s, k = new_store(tmp_path)
    os.chmod(s.dir, 0o755)
    with pytest.raises(StoreError, match="chmod 0700"):
        Store(s.dir).open(bytearray(k))


def test_passphrase_kek_from_an_fd(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"correct horse\nignored")
    os.close(w)
    try:
        phrase = keksrc.read_passphrase(r)
    finally:
        os.close(r)
    assert phrase == b"correct horse"
    salt = os.urandom(16)
    a = keksrc.from_passphrase(phrase, salt)
    assert len(a) == 32 and a == keksrc.from_passphrase(b"correct horse", salt)
    assert a != keksrc.from_passphrase(b"correct horsf", salt)


def test_a_rotation_interrupted_after_its_commit_is_finished_at_start(tmp_path: Path) -> None:
    """The store switched to the new KEK but the new key file was not renamed into place yet: the next start
    finds <kek_file>.new, checks it against the store and finishes; a stale .new from a rotation that never
    committed is ignored and a stale generation dropped."""
    from backends.vtpmmgr.config import ManagerConfig
    from backends.vtpmmgr.server import obtain_kek, rotate_kek

    cfg = ManagerConfig(state_dir=str(tmp_path / "mgr"), kek_file=str(tmp_path / "kek"))
    s = Store(Path(cfg.state_dir))
    obtain_kek(cfg, s, init=True, passphrase_fd=None)
    key = os.urandom(32)
    s.create(DOM, 0, vtpm_uuid=VTPM, key=key)
    old_kek = (tmp_path / "kek").read_bytes()
    assert rotate_kek(cfg, s) == 1
    assert (tmp_path / "kek").read_bytes() != old_kek and not (tmp_path / "kek.new").exists()
    assert sorted(p.name for p in (tmp_path / "mgr").iterdir()) == ["keys", "keys.2"]

    # Crash between the commit and the rename: redo the commit by hand and put the old key file back.
    new_kek = bytearray(os.urandom(32))
    (tmp_path / "kek.new").write_bytes(new_kek)
    os.chmod(tmp_path / "kek.new", 0o600)
    s.set_kek("file", bytearray(new_kek), {})
    (Path(cfg.state_dir) / "keys.9").mkdir(mode=0o700)  # an uncommitted generation
    s2 = Store(Path(cfg.state_dir))
    assert obtain_kek(cfg, s2, init=False, passphrase_fd=None) == new_kek
    assert (tmp_path / "kek").read_bytes() == new_kek and not (tmp_path / "kek.new").exists()
    assert bytes(s2.key_of(s2.get(DOM, 0))) == key
    assert not (Path(cfg.state_dir) / "keys.9").exists()


def test_a_passphrase_store_refuses_a_wrong_passphrase(tmp_path: Path) -> None:
    from backends.vtpmmgr.config import ManagerConfig
    from backends.vtpmmgr.server import ManagerFatal, obtain_kek

    def fd_with(text: bytes) -> int:
        r, w = os.pipe()
        os.write(w, text)
        os.close(w)
        return r

    cfg = ManagerConfig(state_dir=str(tmp_path / "mgr"), kek_source="passphrase")
    for phrase, init in ((b"open sesame\n", True), (b"open sesame", False)):
        fd = fd_with(phrase)
        try:
            obtain_kek(cfg, Store(Path(cfg.state_dir)), init=init, passphrase_fd=fd)
        finally:
            os.close(fd)
    fd = fd_with(b"open sesamE\n")
    try:
        with pytest.raises(ManagerFatal, match="not the store's KEK"):
            obtain_kek(cfg, Store(Path(cfg.state_dir)), init=False, passphrase_fd=fd)
    finally:
        os.close(fd)
    assert b"open sesame" not in every_byte(tmp_path)


def test_the_shipped_manager_config_is_the_defaults() -> None:
    from backends.vtpmmgr.config import ManagerConfig, ManagerConfigError, load, parse

    root = Path(__file__).resolve().parents[2]
    assert load(root / "contrib" / "vtpm-manager.toml") == ManagerConfig()
    for text, message in (({"manager": {"kek_sourse": "file"}}, "unknown key"),
                          ({"manager": {"kek_source": "usb"}}, "not one of"),
                          ({"manager": {"release_uids": [-1]}}, "list of uids"),
                          ({"vtpm": {}}, "only a [manager] table")):
        with pytest.raises(ManagerConfigError, match=message.replace("[", r"\[")):
            parse(text)
