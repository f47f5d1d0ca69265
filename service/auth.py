"""API keys: who may call the LoraLoop service, and for which users.

`LORALOOP_API_KEYS` (Settings.api_keys) lists entries `KEY=SCOPES`, separated by ';' or
newlines:

    k-admin-7f3a9c1e2b4d=*; k-acme-51d0e8a3c9f2=acme.*; sha256:9f86d0...=bob,bob-test

- KEY is the key itself (at least 16 characters, no whitespace or ';'), or
  `sha256:<64 hex digits>`, its SHA-256, so the plain key need not sit in the config;
- SCOPES, comma-separated: `*` (any user), `PREFIX*` (user ids starting with PREFIX, e.g.
  one tenant's `acme.*`), or an exact user id.

Only SHA-256 digests are kept in memory; a presented key is hashed and compared with
every stored digest in constant time. Clients send the key as `x-api-key` metadata (or
`authorization: Bearer KEY`). `AuthInterceptor` guards the LoraLoop service only: health
checks and reflection stay open. The OpenAI-compatible HTTP API (service/openai_api.py)
asks `AuthInterceptor.check` the same question for its calls (`Authorization: Bearer KEY`).
No message or log line ever contains a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from loraloop.core.settings import StartupError
from loraloop.core.user_ids import MAX_USER_ID_LEN, user_id_error
from loraloop.service.log_throttle import LogThrottle

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 16
_DIGEST = re.compile(r"sha256:([0-9a-fA-F]{64})")
_KEY_CHARS = re.compile(r"[^\s;]+")
API_KEY_HEADER = "x-api-key"


class ApiKeyConfigError(StartupError, ValueError):
    """LORALOOP_API_KEYS cannot be parsed; the message names the entry, never the key."""


@dataclass(frozen=True)
class KeyScope:
    """The user ids one key may act for."""

    any_user: bool
    prefixes: tuple[str, ...]
    exact: frozenset[str]

    def allows(self, user_id: str) -> bool:
        return (
            self.any_user
            or user_id in self.exact
            or any(user_id.startswith(p) for p in self.prefixes)
        )

    def describe(self) -> str:
        if self.any_user:
            return "*"
        return ", ".join([*(f"{p}*" for p in self.prefixes), *sorted(self.exact)])


@dataclass(frozen=True)
class KeyEntry:
    digest: bytes
    scope: KeyScope

    @property
    def fingerprint(self) -> str:
        """A short id of the key for log lines (a digest prefix, not the key)."""
        return "key#" + self.digest.hex()[:8]


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _parse_scope(text: str, where: str) -> KeyScope:
    # Messages name a bad scope by its position, never by its text: in an entry written the
    # wrong way round (name=KEY) the "scope" is the key itself.
    any_user, prefixes, exact = False, [], set()
    for n, raw in enumerate(text.split(","), start=1):
        item = raw.strip()
        if not item:
            continue
        what = f"{where}: scope {n} after '=' ({len(item)} characters)"
        if item == "*":
            any_user = True
        elif item.endswith("*"):
            prefix = item[:-1]
            if "*" in prefix or user_id_error(prefix):
                raise ApiKeyConfigError(
                    f"{what} is not a user-id prefix followed by '*'; if it is the key, "
                    "write the entry as KEY=SCOPES"
                )
            prefixes.append(prefix)
        else:
            if user_id_error(item) or "*" in item:
                raise ApiKeyConfigError(
                    f"{what} is not a user id (letters, digits and . _ @ -, at most "
                    f"{MAX_USER_ID_LEN}), PREFIX* or *; if it is the key, write the entry as "
                    "KEY=SCOPES"
                )
            exact.add(item)
    if not (any_user or prefixes or exact):
        raise ApiKeyConfigError(f"{where}: no scopes after '=': list user ids, PREFIX* or *")
    return KeyScope(any_user, tuple(prefixes), frozenset(exact))


def parse_api_keys(text: str) -> list[KeyEntry]:
    """The entries of an api_keys setting; raises ApiKeyConfigError saying what to fix."""
    entries: list[KeyEntry] = []
    seen: set[bytes] = set()
    chunks = [c.strip() for c in re.split(r"[;\n]", text)]
    for n, chunk in enumerate((c for c in chunks if c), start=1):
        where = f"LORALOOP_API_KEYS entry {n}"
        # Scopes never hold '=', so the last '=' ends the key (base64 keys may end in '=').
        key, sep, scopes = chunk.rpartition("=")
        key = key.strip()
        if not sep or not key:
            raise ApiKeyConfigError(f"{where}: write it as KEY=SCOPES (e.g. KEY=* or KEY=alice)")
        if m := _DIGEST.fullmatch(key):
            digest = bytes.fromhex(m.group(1))
        elif not _KEY_CHARS.fullmatch(key):
            raise ApiKeyConfigError(f"{where}: the key may not contain whitespace or ';'")
        elif len(key) < MIN_KEY_CHARS:
            raise ApiKeyConfigError(
                f"{where}: the key is {len(key)} characters: use at least {MIN_KEY_CHARS} "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        else:
            digest = _digest(key)
        if digest in seen:
            raise ApiKeyConfigError(f"{where}: the same key is listed twice: merge its scopes")
        seen.add(digest)
        entries.append(KeyEntry(digest, _parse_scope(scopes, where)))
    return entries


class ApiKeys:
    """Digests of the configured keys with their scopes."""

    def __init__(self, entries: Sequence[KeyEntry]) -> None:
        self._entries = tuple(entries)

    @classmethod
    def parse(cls, text: str) -> ApiKeys:
        return cls(parse_api_keys(text))

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str) -> KeyEntry | None:
        """The entry of `key`, comparing its digest with every stored one (no early exit)."""
        digest = _digest(key)
        found = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        return found


def presented_key(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The key a call carries in `x-api-key`, else in `authorization: Bearer ...`."""
    bearer = None
    for name, value in metadata or ():
        if isinstance(value, bytes):
            continue
        if name == API_KEY_HEADER:
            return value.strip()
        if name == "authorization" and bearer is None:
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                bearer = token.strip()
    return bearer


Denial = tuple[grpc.StatusCode, str]
Check = Callable[[Any], Denial | None]

MISSING = (
    grpc.StatusCode.UNAUTHENTICATED,
    f"no API key: send one in the '{API_KEY_HEADER}' metadata header (the Python client "
    "reads LORALOOP_API_KEY)",
)
UNKNOWN = (
    grpc.StatusCode.UNAUTHENTICATED,
    f"the API key in '{API_KEY_HEADER}' is not valid: check it, or ask the operator for one "
    "(keys are listed in the server's LORALOOP_API_KEYS)",
)


class RefusalLog:
    """Logs refused calls at most once per `interval_s` for each (rpc, reason), with how
    many were left out since: a client trying keys cannot flood the log."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self._throttle = LogThrottle(interval_s)

    @property
    def interval_s(self) -> float:
        return self._throttle.period

    @interval_s.setter
    def interval_s(self, seconds: float) -> None:
        self._throttle.period = seconds

    @property
    def refused(self) -> int:
        return self._throttle.seen

    @property
    def logged(self) -> int:
        return self._throttle.logged

    def refused_call(self, rpc: str, reason: str) -> None:
        skipped = self._throttle.admit((rpc, reason))
        if skipped is None:
            return
        more = f" ({skipped} more like it in the last {self.interval_s:.0f}s)" if skipped else ""
        log.info("%s refused: %s%s", rpc, reason, more)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to `service` without a known key (UNAUTHENTICATED) or for a user_id
    the key is not scoped to (PERMISSION_DENIED); other services pass untouched."""

    def __init__(self, keys: ApiKeys, service: str) -> None:
        if not len(keys):
            raise ValueError("AuthInterceptor needs at least one API key")
        self._keys = keys
        self._prefix = f"/{service}/"
        self.refusals = RefusalLog()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        key = presented_key(handler_call_details.invocation_metadata)
        rpc = method[len(self._prefix) :]

        def check(request: Any) -> Denial | None:
            user_id = None if request is None else str(getattr(request, "user_id", "") or "")
            return self.check(rpc, key, user_id)

        return _guarded(handler, check)

    def check(
        self,
        rpc: str,
        key: str | None,
        user_id: str | None,
        *,
        any_key: bool = False,
        missing: Denial = MISSING,
        unknown: Denial = UNKNOWN,
    ) -> Denial | None:
        """Why `key` may not call `rpc` for `user_id`, or None when it may. The one check of
        both front doors (this interceptor and the HTTP API, service/openai_api.py, which
        passes its own `missing`/`unknown` texts). `user_id` None: a call for no user in
        particular, which only unscoped keys may make, or any known key with `any_key`."""
        if not key:
            return missing
        entry = self._keys.lookup(key)
        if entry is None:
            self.refusals.refused_call(rpc, "unknown API key")
            return unknown
        if user_id is None and (any_key or entry.scope.any_user):
            return None
        if user_id is not None and entry.scope.allows(user_id):
            return None
        user_id = user_id or ""
        self.refusals.refused_call(rpc, f"{entry.fingerprint} may not act for this user_id")
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"this API key may not act for user_id {user_id[:64]!r}: it is scoped to "
            f"{entry.scope.describe()}; use a key for this user",
        )


def _guarded(handler: grpc.RpcMethodHandler, check: Check) -> grpc.RpcMethodHandler:
    """`handler` with `check(request)` run first; a denial aborts the call."""
    common = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if denial := check(request):
                await context.abort(*denial)
            result = unary(request, context)
            return await result if isinstance(result, Awaitable) else result

        return grpc.unary_unary_rpc_method_handler(unary_unary, **common)
    if handler.unary_stream is not None:
        stream = handler.unary_stream

        async def unary_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            if denial := check(request):
                await context.abort(*denial)
            responses = stream(request, context)
            if hasattr(responses, "__aiter__"):
                async for response in responses:
                    yield response
            else:
                for response in responses:
                    yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, **common)
    # Streamed requests: the user_id is not known up front, so only unscoped keys pass.
    denial = check(None)
    if denial is None:
        return handler
    kind = "stream_unary" if handler.stream_unary is not None else "stream_stream"

    async def refuse(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(*denial)

    return getattr(grpc, f"{kind}_rpc_method_handler")(refuse, **common)


def build_interceptor(api_keys: str, required: bool, service: str) -> AuthInterceptor | None:
    """The interceptor for the configured keys; None (auth off) when there are none, which
    `required` turns into a start-up error."""
    keys = ApiKeys.parse(api_keys)
    if not len(keys):
        if required:
            raise ApiKeyConfigError(
                "auth_required is set but LORALOOP_API_KEYS is empty: configure at least one "
                "KEY=SCOPES entry (or unset LORALOOP_AUTH_REQUIRED for a local demo)"
            )
        return None
    return AuthInterceptor(keys, service)
