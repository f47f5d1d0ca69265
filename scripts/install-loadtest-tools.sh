#!/usr/bin/env bash
# Install ghz (github.com/bojand/ghz), the gRPC load tool `python -m loadtests compare`
# checks our figures against. Idempotent: does nothing when the pinned version is there.
# Needs Go (1.21+) and the Go module proxy; installs into $(go env GOPATH)/bin.
set -euo pipefail
GHZ_VERSION="${GHZ_VERSION:-v0.120.0}"  # `@latest` resolves to the older v0.93.0, which cannot read proto3 `optional`
command -v go >/dev/null || { echo "install-loadtest-tools: needs Go on PATH" >&2; exit 2; }
bin="$(go env GOBIN)"
[ -n "$bin" ] || bin="$(go env GOPATH)/bin"
# `ghz --version` says "dev" when built by go install: read the module version instead.
if [ -x "$bin/ghz" ] && go version -m "$bin/ghz" | grep -q "mod.*github.com/bojand/ghz.*${GHZ_VERSION}"; then
  echo "ghz ${GHZ_VERSION} already installed: $bin/ghz"
  exit 0
fi
go install "github.com/bojand/ghz/cmd/ghz@${GHZ_VERSION}"
echo "installed ghz ${GHZ_VERSION} at $bin/ghz (add $bin to PATH, or loadtests finds it there)"
