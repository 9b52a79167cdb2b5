#!/usr/bin/env bash
# Installs Debian's PostgreSQL server when its binaries are missing (tests/test_postgres.py and
# benchmarks/mlflow_load.py start a private cluster with them: initdb + postgres, found on PATH or in
# /usr/lib/postgresql/*/bin). Only the binaries are used: no system service is needed or configured.
# Idempotent; needs root (or sudo) and the Debian package mirror.
set -euo pipefail
if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
ls /usr/lib/postgresql/*/bin/initdb >/dev/null
