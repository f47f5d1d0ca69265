"""The ids of a response as call metadata: gRPC initial metadata of GenerateStream, which
goes out with its first token (the final message carries them too), and the HTTP API's
response headers. The HTTP front door reads what the servicer sent this way, so both
protocols hand the app the same three values as soon as they are settled."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import quote, unquote

REQUEST_ID = "x-loraloop-request-id"
ADAPTER_VERSION = "x-loraloop-adapter-version"
ARM = "x-loraloop-arm"


def response_metadata(
    request_id: str, adapter_version: int, arm: str
) -> tuple[tuple[str, str], ...]:
    """The three ids as (key, value) pairs; the arm (an operator's name, any text) is
    percent-encoded, since metadata and header values are printable ASCII."""
    return (
        (REQUEST_ID, request_id),
        (ADAPTER_VERSION, str(adapter_version)),
        (ARM, quote(arm, safe="")),
    )


def read_response_metadata(
    metadata: Iterable[tuple[str, str | bytes]],
) -> tuple[str, int, str] | None:
    """(request_id, adapter_version, arm) from metadata that `response_metadata` made, or
    None when it holds none of them."""
    values = {k: v for k, v in metadata if isinstance(v, str)}
    if REQUEST_ID not in values:
        return None
    return (
        values[REQUEST_ID],
        int(values.get(ADAPTER_VERSION, "0")),
        unquote(values.get(ARM, "")),
    )
