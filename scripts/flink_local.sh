#!/usr/bin/env bash
# A local Flink session cluster for bft's Beam passes: fetch | start | stop | status (scripts/flink_local.py).
# Runs with the project's venv (make setup), whose Beam and bft the cluster's Python workers import.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
python="${BFT_PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || { echo "flink_local: $python missing: run \`make setup\` first" >&2; exit 1; }
exec "$python" "$here/scripts/flink_local.py" "$@"
