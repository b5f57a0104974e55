#!/usr/bin/env bash
# Installs everything pool-pipeline needs, idempotently: PicoLisp, Java >= 17 and Maven (Debian,
# when missing), a .venv with the package and its test deps, and the Kafka broker jars (Maven
# Central, cached in ~/.cache/pool-pipeline). Both README commands run it first.
set -euo pipefail
export PYTHONUNBUFFERED=1 DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PHASE=""
PHASE_START=$SECONDS
phase() {
    if [ -n "$PHASE" ]; then
        echo "[setup] $PHASE: $((SECONDS - PHASE_START)) s"
    fi
    PHASE="$1"
    PHASE_START=$SECONDS
}

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    fi
fi
APT_UPDATED=0
apt_install() {
    if [ "$(id -u)" -ne 0 ] && [ -z "$SUDO" ]; then
        echo "[setup] ERROR: need root or passwordless sudo to apt-get install $*" >&2
        exit 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -q
        APT_UPDATED=1
    fi
    $SUDO apt-get install -y -q --no-install-recommends "$@"
}

java_major() {
    java -version 2>&1 | sed -n 's/.*version "\([0-9][0-9]*\)\(\.\([0-9]*\)\)\{0,1\}.*/\1 \3/p' | head -n1 |
        awk '{ if ($1 == 1) print $2; else print $1 }'
}

# ------------------------------------------------------------------------------------------
phase "system packages"
missing=()
command -v pil >/dev/null 2>&1 || missing+=(picolisp)
JAVA_MAJOR=""
command -v java >/dev/null 2>&1 && JAVA_MAJOR="$(java_major)"
if [ -z "$JAVA_MAJOR" ] || [ "$JAVA_MAJOR" -lt 17 ]; then
    missing+=(openjdk-17-jre-headless)  # Kafka 4.x brokers need Java >= 17
fi
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "[setup] installing: ${missing[*]}"
    apt_install "${missing[@]}"
else
    echo "[setup] pil, java $JAVA_MAJOR, mvn already present"
fi

# ------------------------------------------------------------------------------------------
phase "python venv + dependencies"
PY=python3.11
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -m venv .venv; then
        rm -rf .venv
        apt_install python3-venv
        "$PY" -m venv .venv
    fi
fi
if ! .venv/bin/python -c "import pipeline, kafka, crc32c, fastavro, boto3, pytest, yaml, inotify_simple, mypy, cryptography" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch .venv/.installed
fi

# ------------------------------------------------------------------------------------------
phase "kafka jars"
.venv/bin/python -c 'from pool_pipeline.devstack import kafka_jars; print(kafka_jars())'

phase ""
