"""Request ids: an HMAC binds each id to the user it was served to."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from loraloop.service.request_ids import RequestIds


@pytest.fixture
def ids() -> RequestIds:
    return RequestIds("secret-one")


def test_issued_id_belongs_to_its_user_only(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    assert ids.well_formed(rid)
    assert ids.belongs_to(rid, "alice")
    assert not ids.belongs_to(rid, "bob")
    assert not ids.belongs_to(rid, "alice2")
    assert not ids.belongs_to(rid, "")


def test_ids_are_unique_and_shaped(ids: RequestIds) -> None:
    issued = {ids.issue("alice") for _ in range(200)}
    assert len(issued) == 200
    for rid in issued:
        nonce, dot, mac = rid.partition(".")
        assert dot == "." and len(nonce) == 24 and len(mac) == 24
        int(nonce, 16), int(mac, 16)  # both hex


def test_mac_is_hmac_sha256_of_nonce_and_user(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    nonce, _, mac = rid.partition(".")
    expected = hmac.new(b"secret-one", f"{nonce}\x00alice".encode(), hashlib.sha256)
    assert mac == expected.hexdigest()[:24]


def test_another_replica_with_the_same_secret_agrees(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    assert RequestIds("secret-one").belongs_to(rid, "alice")


def test_different_secret_fails(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    assert not RequestIds("secret-two").belongs_to(rid, "alice")
    assert not RequestIds("").belongs_to(rid, "alice")


def _flip(ch: str) -> str:
    return "0" if ch != "0" else "1"


@pytest.mark.parametrize("where", [0, 11, 23, 25, 36, 48])
def test_tampered_id_fails(ids: RequestIds, where: int) -> None:
    rid = ids.issue("alice")
    tampered = rid[:where] + _flip(rid[where]) + rid[where + 1 :]
    assert tampered != rid
    assert ids.well_formed(tampered)  # still looks right...
    assert not ids.belongs_to(tampered, "alice")  # ...but is not ours


def test_forged_mac_for_another_nonce_fails(ids: RequestIds) -> None:
    a, b = ids.issue("alice"), ids.issue("alice")
    forged = a.partition(".")[0] + "." + b.partition(".")[2]
    assert not ids.belongs_to(forged, "alice")


def test_user_boundary_cannot_be_shifted(ids: RequestIds) -> None:
    # the NUL separator keeps (nonce, user) pairs from colliding
    rid = ids.issue("ab")
    nonce, _, mac = rid.partition(".")
    assert not ids.belongs_to(f"{nonce}a.{mac}", "b")


@pytest.mark.parametrize(
    "junk",
    [
        "",
        ".",
        "abc",
        "0" * 49,
        "0" * 24 + "." + "0" * 23,
        "0" * 24 + "." + "0" * 25,
        "0" * 23 + "." + "0" * 24,
        "0" * 24 + "." + "0" * 23 + "g",
        "0" * 24 + "." + "0" * 23 + "A",  # uppercase hex is not what we issue
        "0" * 24 + "-" + "0" * 24,
        "0" * 24 + "." + "0" * 24 + ".x",
        "é" * 24 + "." + "0" * 24,
    ],
)
def test_well_formed_rejects_junk(ids: RequestIds, junk: str) -> None:
    assert not ids.well_formed(junk)


@pytest.mark.parametrize("junk", ["", "abc", "nodot", "0" * 24 + "." + "f" * 24])
def test_junk_belongs_to_nobody(ids: RequestIds, junk: str) -> None:
    assert not ids.belongs_to(junk, "alice")
