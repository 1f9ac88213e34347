#!/usr/bin/env bash
# Create .venv (if needed) and install meshcore editable with its test and bench extras; the Cython
# extensions in ext/ are compiled in place as meshcore/_ext/*.so. Safe to re-run.
# As root, also installs Debian's `prometheus` (the observability test scrapes meshcore with it)
# `iptables` (the sidecar tests install capture rules in network namespaces they create) and
# `openssl` (the TLS tests make a test CA).
set -euo pipefail
cd "$(dirname "$0")/.."

install_prometheus() {
  # Debian's package, without its recommends (node exporter) and without starting its service:
  # a policy-rc.d that refuses service starts is put in place for the install when none exists,
  # so nothing takes port 9090 (the test runs its own prometheus on a port it picks).
  command -v prometheus >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "meshcore: prometheus is not installed (apt-get install prometheus); the Prometheus" \
         "scrape test will be skipped" >&2
    return 0
  fi
  local policy=/usr/sbin/policy-rc.d added=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && added=1
  fi
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
              -o Dpkg::Options::=--force-confold prometheus >/dev/null; }; then
    echo "meshcore: installing prometheus failed; the Prometheus scrape test will fail in CI" >&2
  fi
  if [ "$added" = 1 ]; then rm -f "$policy"; fi
}
install_prometheus

install_tool() {
  # install_tool COMMAND PACKAGE WHY: Debian's PACKAGE when COMMAND is missing (as root).
  local cmd=$1 pkg=$2 why=$3
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "meshcore: $cmd is not installed (apt-get install $pkg); $why" >&2
    return 0
  fi
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
              "$pkg" >/dev/null; }; then
    echo "meshcore: installing $pkg failed; $why" >&2
  fi
}
# `meshcore iptables` runs the iptables binary; the sidecar tests run it inside network
# namespaces they create (tests/integration/netns.py). A fresh machine has `ip` but not this.
install_tool iptables iptables "the network-namespace sidecar tests need it and root"
# The TLS tests sign their certificates with a test CA made by the openssl command.
install_tool openssl openssl "the TLS origination tests need it to make their test CA"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,bench]"
.venv/bin/python -c "import meshcore._accel as a, sys; missing=[m for m in ('h1parse','h1conn','pool','shmatomic','ring','loop') if a.load(m) is None]; sys.exit('meshcore: extensions not built: %s' % missing if missing else 0)"
