"""Request ids that carry an HMAC binding them to the user they were served to.

`<random hex>.<hmac>`: any replica sharing the secret can tell, without shared state,
that an id was issued by this service and for which user, so Feedback for another
user's request is refused and made-up ids are reported as unknown.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_MAC_HEX = 24


class RequestIds:
    def __init__(self, secret: str) -> None:
        self._key = secret.encode()

    def _mac(self, nonce: str, user_id: str) -> str:
        msg = f"{nonce}\x00{user_id}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:_MAC_HEX]

    def issue(self, user_id: str) -> str:
        nonce = secrets.token_hex(12)
        return f"{nonce}.{self._mac(nonce, user_id)}"

    def well_formed(self, request_id: str) -> bool:
        nonce, _, mac = request_id.partition(".")
        return (
            len(nonce) == 24
            and len(mac) == _MAC_HEX
            and all(c in "0123456789abcdef" for c in nonce + mac)
        )

    def belongs_to(self, request_id: str, user_id: str) -> bool:
        nonce, _, mac = request_id.partition(".")
        return hmac.compare_digest(mac, self._mac(nonce, user_id))
