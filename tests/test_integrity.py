"""Hashes checked cheaply (edgetok/integrity.py): a file is hashed once, then trusted by its stamp
until its size or mtime changes — so a file overwritten in place is hashed again and caught."""

from __future__ import annotations

import os
import time

import pytest

from edgetok import integrity
from edgetok.errors import EdgetokError
from edgetok.files import file_sha256


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGETOK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def settled(path, seconds_ago: float = 60) -> None:
    """As if written a while ago: a file younger than integrity.RACY_NS is never stamped."""
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_a_file_is_hashed_once_then_trusted_by_its_stamp(home, tmp_path, monkeypatch):
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(4096))
    settled(f)
    digest = integrity.sha256(f)
    assert digest == file_sha256(f) and len(list((home / "stamps").iterdir())) == 1
    monkeypatch.setattr(integrity, "file_sha256", lambda path: pytest.fail("hashed again"))
    assert integrity.sha256(f) == digest
    os.rename(f, tmp_path / "moved.bin")  # a rename keeps the inode and mtime: an export's move into place
    assert integrity.sha256(tmp_path / "moved.bin") == digest


def test_a_file_overwritten_in_place_is_hashed_again(home, tmp_path):
    f = tmp_path / "model.onnx.data"
    f.write_bytes(b"\x01" * 4096)
    settled(f, 120)
    recorded = integrity.sha256(f)
    with open(f, "r+b") as w:  # same size, other bytes: only the mtime tells
        w.seek(100)
        w.write(b"\x02\x02")
    settled(f, 60)
    assert not integrity.matches(f, recorded)
    with pytest.raises(EdgetokError, match=r"model\.onnx\.data does not match the SHA-256 recorded in .*edgetok\.json.*export it again"):
        integrity.check(f, recorded, tmp_path / "edgetok.json")


def test_a_fresh_file_is_not_stamped(home, tmp_path):
    """Changed within the clock tick of its stamp, a file could keep its mtime: young files are hashed each time."""
    f = tmp_path / "fresh.bin"
    f.write_bytes(b"abc")
    integrity.sha256(f)
    assert not (home / "stamps").exists()


def test_a_prefix_of_the_hash_is_enough_but_not_too_short(home, tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"abc")
    digest = file_sha256(f)
    assert integrity.matches(f, digest[:32]) and integrity.matches(f, digest.upper())
    assert not integrity.matches(f, digest[:8])  # too short to mean anything
    assert not integrity.matches(f, None)


def test_an_unwritable_home_only_costs_rehashing(tmp_path, monkeypatch):
    (tmp_path / "home").write_text("a file where the home folder should be")
    monkeypatch.setenv("EDGETOK_HOME", str(tmp_path / "home"))
    f = tmp_path / "a"
    f.write_bytes(b"abc")
    settled(f)
    assert integrity.sha256(f) == file_sha256(f)

