"""User id rules, shared by the API validation and the adapter store's paths."""

from __future__ import annotations

import re

MAX_USER_ID_LEN = 128
_USER_ID = re.compile(r"[A-Za-z0-9._@-]{1,128}")


def user_id_error(user_id: str) -> str | None:
    """Why `user_id` is unacceptable, or None when it is fine.

    The allowed alphabet keeps ids safe as single path components of the adapter store and
    as Kafka keys; '.' and '..' are refused so an id can never walk out of the store.
    """
    if not user_id:
        return "user_id is empty: send the id of the user the request is for"
    if len(user_id) > MAX_USER_ID_LEN:
        return f"user_id is {len(user_id)} characters long: the limit is {MAX_USER_ID_LEN}"
    if not _USER_ID.fullmatch(user_id) or user_id in {".", ".."}:
        return "user_id may only hold letters, digits and . _ @ - (and may not be '.' or '..')"
    return None


def check_user_id(user_id: str) -> str:
    """Return `user_id` unchanged, or raise ValueError saying what is wrong with it."""
    error = user_id_error(user_id)
    if error:
        raise ValueError(error)
    return user_id
