#!/usr/bin/env bash
# Starts the local PostgreSQL the store tests use, if it is installed and not running.
set -u
if command -v pg_lsclusters >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    if ! pg_lsclusters -h 2>/dev/null | grep -q online; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    fi
fi
exit 0
