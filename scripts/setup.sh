#!/usr/bin/env bash
# Installs everything pool-pipeline needs, idempotently: a venv with the package and its test
# deps, PicoLisp (Debian), Java/Maven checks, and the Kafka broker jars (cached in ~/.cache).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*"; }
t0=$(date +%s)

if ! command -v pil >/dev/null 2>&1; then
  step "installing PicoLisp (Debian package picolisp)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq picolisp >/dev/null
fi

for tool in java mvn; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is required (Java >= 17 and Maven run the local Kafka broker)" >&2; exit 1; }
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  step "creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import pipeline, kafka, crc32c, fastavro, boto3, pytest, yaml" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  step "installing pool-pipeline and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch .venv/.installed
fi

step "Kafka broker jars (Maven Central, cached in ~/.cache/pool-pipeline)"
.venv/bin/python -c 'from connectors.localstack import kafka_jars; print(kafka_jars())'
echo "setup done in $(( $(date +%s) - t0 )) s"
