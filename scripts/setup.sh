#!/usr/bin/env bash
# One-command set-up on a fresh Debian machine: system packages the tests and benchmarks use
# (only those missing), a virtualenv with the Python dependencies, and the Rust extension built
# in the release profile.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v nats-server >/dev/null || need_apt+=(nats-server)
command -v wrk >/dev/null || need_apt+=(wrk)
# The RabbitMQ tests and benchmark use a local broker (guest/guest on 127.0.0.1:5672); the
# Debian package starts it as a service.
command -v rabbitmqctl >/dev/null || need_apt+=(rabbitmq-server)
command -v mosquitto >/dev/null || need_apt+=(mosquitto)
# The webhook benchmark's reverse-proxy baseline (run with its own config; the service is unused).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
# The postgres source's tests start throw-away clusters with initdb/pg_ctl (PostgreSQL 15 or later).
{ command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; } \
  || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
# The vcenter tests build govmomi's simulator (tests/vcsim/main.go) offline with Debian's Go
# against Debian's govmomi sources.
command -v go >/dev/null || need_apt+=(golang-go)
[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || need_apt+=(golang-github-vmware-govmomi-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# profile = "release" in [tool.maturin]: the editable install keeps python/ live while
# the extension is built optimised.
.venv/bin/pip install -q -e '.[dev,bench]'
.venv/bin/python -c "import fastconn._core as c; print('setup: fastconn._core', c.__version__, c.build_profile)"
