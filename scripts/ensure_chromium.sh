#!/usr/bin/env bash
# Installs Debian's headless-capable Chromium when no Chromium is on PATH (the browser test of the listening page,
# tests/test_listen_browser.py, needs one). Idempotent; needs root (or sudo) and the Debian package mirror.
set -euo pipefail
for name in chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then
    exit 0
  fi
done
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
command -v chromium >/dev/null
