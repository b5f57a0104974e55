#!/usr/bin/env bash
# The demo command: installs what is missing, then runs the whole flow end to end on a local
# stack (Kafka + SeaweedFS as processes, a PicoLisp app, capture-agent, replica, verify).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
