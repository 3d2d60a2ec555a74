#!/usr/bin/env bash
# Set up (first time) and run pochta. With no arguments: `pochta serve` on the embedded default.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh >&2
[ $# -gt 0 ] || set -- serve
exec .venv/bin/pochta "$@"
