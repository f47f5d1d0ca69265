"""Request ids that say when and by whom they were issued, and to which user.

    <issued ms, 12 hex>-<random, 16 hex>.<user MAC, 24 hex>.<issue MAC, 16 hex>

The user MAC is HMAC-SHA256(secret, head NUL user_id), head being everything before the
first dot: the id belongs to that user. The issue MAC is HMAC-SHA256(secret, "issued" NUL
head "." user MAC) over the rest of the id: this service issued it, to *some* user. Any
replica sharing the secret checks both without shared state, so Feedback can tell

- an id issued to this user (accepted, subject to the feedback rules),
- an id this service issued to another user (PERMISSION_DENIED), and
- an id it never issued: made up, tampered with anywhere, or for a made-up user (NOT_FOUND).

The issue time (the request's start, the same instant its Interaction is stamped with) lets
Feedback tell, without shared state, that a reward window has closed or that the user was
deleted after the response was served.

Ids of the first format, `<random, 24 hex>.<user MAC, 24 hex>`, issued before this one,
are still accepted for their user; they carry neither an issue MAC nor a time, so one that
does not belong to the user is NOT_FOUND (it cannot be told from a forgery), and the window
and deletion checks pass over them.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass
from enum import Enum

_USER_MAC_HEX = 24
_ISSUE_MAC_HEX = 16
_CURRENT = re.compile(r"([0-9a-f]{12})-[0-9a-f]{16}\.[0-9a-f]{24}\.[0-9a-f]{16}")
_LEGACY = re.compile(r"[0-9a-f]{24}\.[0-9a-f]{24}")


class Ownership(Enum):
    """Whose an id is, as far as the MACs tell."""

    USER = "user"  # issued to this user
    OTHER_USER = "other_user"  # issued by this service, to another user
    UNKNOWN = "unknown"  # not issued by this service (or a first-format id of another user)


@dataclass(frozen=True)
class RequestId:
    head: str  # everything before the first dot
    user_mac: str
    issue_mac: str | None  # None: a first-format id
    issued_ms: int | None  # None: a first-format id


class RequestIds:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, msg: str, length: int) -> str:
        return hmac.new(self._key, msg.encode(), hashlib.sha256).hexdigest()[:length]

    def _user_mac(self, head: str, user_id: str) -> str:
        return self._mac(f"{head}\x00{user_id}", _USER_MAC_HEX)

    def _issue_mac(self, head: str, user_mac: str) -> str:
        return self._mac(f"issued\x00{head}.{user_mac}", _ISSUE_MAC_HEX)

    def issue(self, user_id: str, issued_ms: int | None = None) -> str:
        """A new id for a response to `user_id`, issued at `issued_ms` (ms since the epoch;
        None: now)."""
        if issued_ms is None:
            issued_ms = int(time.time() * 1000)
        if not 0 <= issued_ms < 16**12:
            raise ValueError(f"issued_ms={issued_ms} does not fit the id")
        head = f"{issued_ms:012x}-{secrets.token_hex(8)}"
        user_mac = self._user_mac(head, user_id)
        return f"{head}.{user_mac}.{self._issue_mac(head, user_mac)}"

    @staticmethod
    def parse(request_id: str) -> RequestId | None:
        """The parts of a well-formed id (either format), None for anything else."""
        current = _CURRENT.fullmatch(request_id)
        if current is not None:
            head, user_mac, issue_mac = request_id.split(".")
            return RequestId(head, user_mac, issue_mac, int(current.group(1), 16))
        if _LEGACY.fullmatch(request_id):
            head, user_mac = request_id.split(".")
            return RequestId(head, user_mac, None, None)
        return None

    def well_formed(self, request_id: str) -> bool:
        return self.parse(request_id) is not None

    def ownership(self, request_id: str, user_id: str) -> Ownership:
        parsed = self.parse(request_id)
        if parsed is None:
            return Ownership.UNKNOWN
        if hmac.compare_digest(parsed.user_mac, self._user_mac(parsed.head, user_id)):
            if parsed.issue_mac is None or hmac.compare_digest(
                parsed.issue_mac, self._issue_mac(parsed.head, parsed.user_mac)
            ):
                return Ownership.USER
            return Ownership.UNKNOWN
        if parsed.issue_mac is not None and hmac.compare_digest(
            parsed.issue_mac, self._issue_mac(parsed.head, parsed.user_mac)
        ):
            return Ownership.OTHER_USER
        return Ownership.UNKNOWN

    def belongs_to(self, request_id: str, user_id: str) -> bool:
        return self.ownership(request_id, user_id) is Ownership.USER

    def issued_ms(self, request_id: str) -> int | None:
        """When the id was issued (None: a first-format id, or not an id)."""
        parsed = self.parse(request_id)
        return parsed.issued_ms if parsed is not None else None
