#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite (unit + integration
# against a real Kafka, a real SeaweedFS S3 and real PicoLisp, all started on free ports).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Lint, format and types first: they take seconds and name what to fix.
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
set +e
.venv/bin/python -m pytest -q "$@"
rc=$?
set -e
# pytest exits 5 when it collected no tests (e.g. a -k filter that matches nothing).
if [ "$rc" -eq 5 ]; then echo "no tests collected"; exit 0; fi
exit "$rc"
