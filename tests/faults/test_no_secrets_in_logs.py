"""No secret reaches a log line: `loraloop serve` and `loraloop learn` run as real processes
with API keys and a request-id secret configured, logging JSON at DEBUG; requests good and
bad (no key, a wrong key, a key for the wrong user, tampered request ids) go through, and
every line either process wrote (stdout and stderr) is searched for the secrets. Settings
mask them in repr/str/JSON too."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import grpc
import pytest

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.store import AdapterStore
from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.structured_logs import JsonFormatter
from tests.support import Process, isolated_settings, wait_until

pytestmark = pytest.mark.kafka

ADMIN_KEY = "adm-" + secrets.token_urlsafe(24)
TENANT_KEY = "acme-" + secrets.token_urlsafe(24)
WRONG_KEY = "guess-" + secrets.token_urlsafe(24)
REQUEST_ID_SECRET = "rid-" + secrets.token_urlsafe(24)
SECRETS = {
    "admin key": ADMIN_KEY,
    "tenant key": TENANT_KEY,
    "presented wrong key": WRONG_KEY,
    "request-id secret": REQUEST_ID_SECRET,
}


def _leaks(text: str) -> list[str]:
    """Names of the secrets found in `text`, whole or by their first 16 characters."""
    return [name for name, value in SECRETS.items() if value in text or value[:16] in text]


def _rpc_code(fn, *args, **kwargs) -> str:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        assert not _leaks(exc.details() or ""), "a secret came back in an error message"
        return exc.code().name
    return "OK"


def test_settings_mask_their_secrets(tmp_path: Path) -> None:
    settings = isolated_settings(
        "127.0.0.1:9", tmp_path, api_keys=f"{ADMIN_KEY}=*", request_id_secret=REQUEST_ID_SECRET
    )
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("loraloop.test.settings")
    log.addHandler(handler)
    try:
        log.warning("settings %s %r", settings, settings, extra={"settings": settings})
    finally:
        log.removeHandler(handler)
    texts = {
        "repr": repr(settings),
        "str": str(settings),
        "model_dump_json": settings.model_dump_json(),
        "model_dump(mode=json)": json.dumps(settings.model_dump(mode="json")),
        "log line": "\n".join(records),
    }
    for name, text in texts.items():
        assert not _leaks(text), f"{name} shows a secret"
        assert "**********" in text, name
    # the values are still there for the code that needs them
    assert settings.api_keys.get_secret_value() == f"{ADMIN_KEY}=*"
    assert settings.request_id_secret.get_secret_value() == REQUEST_ID_SECRET


def test_server_and_learner_logs_hold_no_secret(
    kafka_bootstrap: str, tmp_path: Path, monkeypatch
) -> None:
    settings = isolated_settings(
        kafka_bootstrap,
        tmp_path,
        api_keys=f"{ADMIN_KEY}=*;{TENANT_KEY}=acme.*",
        auth_required=True,
        request_id_secret=REQUEST_ID_SECRET,
        log_json=True,
        log_level="DEBUG",
        max_new_tokens=8,
    )
    ensure_loraloop_topics(settings)
    monkeypatch.delenv("LORALOOP_API_KEY", raising=False)
    server = Process(["serve"], settings, r"listening on [\d.]+:(\d+)", log=tmp_path / "server.log")
    learner = None
    codes: list[str] = []
    try:
        learner = Process(["learn"], settings, r"learner consuming", log=tmp_path / "learner.log")
        assert server.match is not None
        target = f"127.0.0.1:{server.match.group(1)}"
        with LoraLoopClient(target, timeout=60, retries=1, api_key=TENANT_KEY) as tenant:
            tenant.wait_ready()
            reply = tenant.generate("acme.ann", "How do I cook rice?", max_tokens=6)
            assert tenant.feedback(reply.request_id, "acme.ann", thumbs=1)
            assert list(tenant.stream("acme.ann", "Tell me about travel", max_tokens=6))
            tampered = reply.request_id[:-1] + ("0" if reply.request_id[-1] != "0" else "1")
            codes += [
                _rpc_code(tenant.generate, "bob", "hi", max_tokens=4),
                _rpc_code(tenant.feedback, tampered, "acme.ann", thumbs=1),
                _rpc_code(tenant.feedback, "made-up", "acme.ann", thumbs=1),
                _rpc_code(tenant.generate, "acme.ann", "", max_tokens=4),
            ]
            tenant.user_state("acme.ann")
        for key in (None, WRONG_KEY):
            with LoraLoopClient(target, timeout=30, retries=1, api_key=key or "") as anon:
                codes.append(_rpc_code(anon.generate, "acme.ann", "hi", max_tokens=4))
        with grpc.insecure_channel(target) as channel:
            stub = api_pb2_grpc.LoraLoopStub(channel)
            bearer = (("authorization", f"Bearer {WRONG_KEY}"),)
            request = api_pb2.GetUserStateRequest(user_id="acme.ann")
            codes.append(_rpc_code(stub.GetUserState, request, timeout=30, metadata=bearer))
        with LoraLoopClient(target, timeout=60, retries=1, api_key=ADMIN_KEY) as admin:
            assert admin.delete_user("someone-else") is False  # nothing to delete: still OK
        store = AdapterStore(settings.adapter_store)
        wait_until(lambda: bool(store.versions("acme.ann")), 90, "the learner's first version")
    finally:
        if learner is not None:
            learner.stop()
        server.stop()

    assert codes == [
        "PERMISSION_DENIED",
        "NOT_FOUND",  # a tampered id was not issued by the service
        "NOT_FOUND",
        "INVALID_ARGUMENT",
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
        "UNAUTHENTICATED",
    ]
    lines = {"server": server.lines, "learner": learner.lines if learner else []}
    for name, output in lines.items():
        leaked = {n for line in output for n in _leaks(line)}
        assert not leaked, f"{name} logged {sorted(leaked)}"
    # The search had something to search: JSON access lines for every refusal, DEBUG on.
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    by_code: dict[str, int] = {}
    for record in records:
        if "code" in record:
            by_code[record["code"]] = by_code.get(record["code"], 0) + 1
    assert by_code.get("UNAUTHENTICATED", 0) >= 3 and by_code.get("PERMISSION_DENIED", 0) >= 1
    assert by_code.get("NOT_FOUND", 0) >= 2
    assert any("refused" in r.get("message", "") for r in records)
    learner_lines = [line for line in lines["learner"] if "acme.ann" in line]
    assert learner_lines, "the learner logged nothing about the user: nothing was searched"
    print(
        f"\nsearched {len(server.lines)} server and {len(lines['learner'])} learner log lines "
        f"for {len(SECRETS)} secrets: none found; server access lines by code: {by_code}"
    )
