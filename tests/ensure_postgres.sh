#!/usr/bin/env bash
# The sweep tests start a throw-away PostgreSQL server (tests/pg_server.py); in CI they fail rather
# than skip without one. Debian's package puts the binaries under /usr/lib/postgresql/<version>/bin
# and creates the non-root `postgres` user the server runs as when the tests run as root.
# `make test` runs this first: nothing happens where the binaries are already there.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
echo "installing Debian's postgresql for the sweep storage tests"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql >/dev/null
