"""Request ids: an HMAC binds each id to the user it was served to, another to this
service, and each carries its issue time; ids of the first format still verify."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from loraloop.service.request_ids import Ownership, RequestIds


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
    issued = {ids.issue("alice", 1_796_000_000_000) for _ in range(200)}
    assert len(issued) == 200
    for rid in issued:
        head, user_mac, issue_mac = rid.split(".")
        when, dash, nonce = head.partition("-")
        assert dash == "-" and len(when) == 12 and len(nonce) == 16
        assert len(user_mac) == 24 and len(issue_mac) == 16
        assert int(when, 16) == 1_796_000_000_000
        int(nonce, 16), int(user_mac, 16), int(issue_mac, 16)  # all hex
        assert len(rid) == 71


def test_macs_are_hmac_sha256_of_head_and_user_and_of_the_issued_id(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    head, user_mac, issue_mac = rid.split(".")
    expected = hmac.new(b"secret-one", f"{head}\x00alice".encode(), hashlib.sha256)
    assert user_mac == expected.hexdigest()[:24]
    issued = hmac.new(b"secret-one", f"issued\x00{head}.{user_mac}".encode(), hashlib.sha256)
    assert issue_mac == issued.hexdigest()[:16]


def test_the_id_carries_its_issue_time(ids: RequestIds) -> None:
    assert ids.issued_ms(ids.issue("alice", 1_234_567)) == 1_234_567
    assert ids.issued_ms("0" * 24 + "." + "0" * 24) is None  # the first format has none
    assert ids.issued_ms("junk") is None
    with pytest.raises(ValueError):
        ids.issue("alice", -1)


def test_ownership_tells_another_users_id_from_a_forgery(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    assert ids.ownership(rid, "alice") is Ownership.USER
    assert ids.ownership(rid, "bob") is Ownership.OTHER_USER  # ours, issued to alice
    for where in range(len(rid)):
        if rid[where] in "-.":
            continue
        tampered = rid[:where] + _flip(rid[where]) + rid[where + 1 :]
        for user in ("alice", "bob"):
            assert ids.ownership(tampered, user) is Ownership.UNKNOWN, (where, user)
    assert RequestIds("secret-two").ownership(rid, "bob") is Ownership.UNKNOWN


def _legacy(key: bytes, user: str, nonce: str = "ab" * 12) -> str:
    mac = hmac.new(key, f"{nonce}\x00{user}".encode(), hashlib.sha256).hexdigest()[:24]
    return f"{nonce}.{mac}"


def test_first_format_ids_still_belong_to_their_user(ids: RequestIds) -> None:
    old = _legacy(b"secret-one", "alice")
    assert ids.well_formed(old) and ids.belongs_to(old, "alice")
    assert ids.ownership(old, "alice") is Ownership.USER
    # without an issue MAC, another user's old id cannot be told from a forgery
    assert ids.ownership(old, "bob") is Ownership.UNKNOWN


def test_another_replica_with_the_same_secret_agrees(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    assert RequestIds("secret-one").belongs_to(rid, "alice")


def test_different_secret_fails(ids: RequestIds) -> None:
    rid = ids.issue("alice")
    assert not RequestIds("secret-two").belongs_to(rid, "alice")
    assert not RequestIds("").belongs_to(rid, "alice")


def _flip(ch: str) -> str:
    return "0" if ch != "0" else "1"


@pytest.mark.parametrize("where", [0, 11, 13, 28, 30, 53, 55, 70])
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
    assert ids.ownership(forged, "alice") is Ownership.UNKNOWN


def test_user_boundary_cannot_be_shifted(ids: RequestIds) -> None:
    # the NUL separator keeps (nonce, user) pairs from colliding
    rid = _legacy(b"secret-one", "ab", "0" * 23)
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
        "0" * 12 + "-" + "0" * 16 + "." + "0" * 24,  # the current format without its issue MAC
        "0" * 11 + "-" + "0" * 16 + "." + "0" * 24 + "." + "0" * 16,
        "0" * 12 + "-" + "0" * 16 + "." + "0" * 24 + "." + "0" * 15,
        "0" * 12 + "." + "0" * 16 + "." + "0" * 24 + "." + "0" * 16,
    ],
)
def test_well_formed_rejects_junk(ids: RequestIds, junk: str) -> None:
    assert not ids.well_formed(junk)


@pytest.mark.parametrize("junk", ["", "abc", "nodot", "0" * 24 + "." + "f" * 24])
def test_junk_belongs_to_nobody(ids: RequestIds, junk: str) -> None:
    assert not ids.belongs_to(junk, "alice")
