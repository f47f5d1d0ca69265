#!/usr/bin/env bash
# Installs the operators' tools the tests use, idempotently (each step is skipped when the
# tool is already there):
#   promtool + prometheus   Debian's `prometheus` package (apt)
#   helm, kubeconform,      `go install` from the Go module proxy into $GOBIN (~/go/bin)
#   grpcurl                 (tests/integration/test_grpcurl.py drives the server with it)
#   Kubernetes schemas      the `kubernetes-validate` Python package (pip, into the venv)
# Grafana's dashboard-linter is not installed: its releases need Grafana's AGPL module,
# which the module proxy does not serve; tests/unit/test_dashboard.py checks its rules.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-v0.8.0}"
GRPCURL_VERSION="${GRPCURL_VERSION:-v1.9.4}"
GOBIN="${GOBIN:-$(go env GOPATH 2>/dev/null || echo "$HOME/go")/bin}"
PY="${PY:-.venv/bin/python}"
export GOBIN

have() { command -v "$1" >/dev/null 2>&1 || [ -x "$GOBIN/$1" ]; }

if ! have promtool || ! have prometheus; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus
  # The package starts a system Prometheus on :9090 where systemd runs; tests start their own.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

if ! command -v go >/dev/null 2>&1; then
  echo "install-ops-tools: go is not on PATH; helm, kubeconform and grpcurl are skipped" >&2
else
  have helm || go install "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  have kubeconform || go install "github.com/yannh/kubeconform/cmd/kubeconform@${KUBECONFORM_VERSION}"
  have grpcurl || go install "github.com/fullstorydev/grpcurl/cmd/grpcurl@${GRPCURL_VERSION}"
fi

if [ -x "$PY" ] && ! "$PY" -c "import kubernetes_validate" 2>/dev/null; then
  "$PY" -m pip install -q "kubernetes-validate==1.37.0"
fi

for tool in promtool prometheus helm kubeconform grpcurl; do
  if command -v "$tool" >/dev/null 2>&1; then echo "$tool: $(command -v "$tool")";
  elif [ -x "$GOBIN/$tool" ]; then echo "$tool: $GOBIN/$tool";
  else echo "$tool: missing"; fi
done
