#!/usr/bin/env bash
# Set up (first time) and run every check: ruff (lint + format), mypy --strict, the whole pytest suite.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh test
bash scripts/start-services.sh
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/mypy
export POCHTA_TEST_PG_DSN=${POCHTA_TEST_PG_DSN:-postgresql://postgres@127.0.0.1:5432/test}
exec .venv/bin/pytest -q "$@"
