"""TLS for the gRPC server from the settings' PEM files (standard gRPC credentials).

- tls_cert_file + tls_key_file: the server speaks TLS only (a plaintext client fails);
- tls_client_ca_file as well: mutual TLS, every client must present a certificate that
  this CA signed.
None of them: plaintext (the local demo; in a cluster, a mesh may terminate TLS).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from loraloop.core.settings import Settings, StartupError


class TlsConfigError(StartupError, ValueError):
    """The TLS settings are incomplete or name unreadable files."""


def _read(path: Path, setting: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(
            f"{setting}={str(path)!r} cannot be read ({exc.strerror}): give a readable PEM file"
        ) from None
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{setting}={str(path)!r} is not a PEM file")
    return data


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """Server credentials for the configured files, or None for plaintext."""
    cert, key, client_ca = (
        settings.tls_cert_file,
        settings.tls_key_file,
        settings.tls_client_ca_file,
    )
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError(
                "LORALOOP_TLS_CLIENT_CA_FILE needs the server's own certificate: set "
                "LORALOOP_TLS_CERT_FILE and LORALOOP_TLS_KEY_FILE too"
            )
        return None
    if cert is None or key is None:
        raise TlsConfigError(
            "TLS needs both LORALOOP_TLS_CERT_FILE and LORALOOP_TLS_KEY_FILE (or neither)"
        )
    pair = (_read(key, "LORALOOP_TLS_KEY_FILE"), _read(cert, "LORALOOP_TLS_CERT_FILE"))
    ca = _read(client_ca, "LORALOOP_TLS_CLIENT_CA_FILE") if client_ca is not None else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=bool(ca))


def describe(settings: Settings) -> str:
    """'plaintext', 'TLS' or 'mutual TLS', for the start-up log line."""
    if settings.tls_cert_file is None:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca_file is not None else "TLS"
