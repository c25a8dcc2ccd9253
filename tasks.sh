#!/usr/bin/env bash
# One entry point for a fresh machine: ./tasks.sh demo | test | lint
set -euo pipefail
cd "$(dirname "$0")"

setup() {
  if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e '.[dev]'
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  fi
}

case "${1:-test}" in
  setup) setup ;;
  test) setup; shift || true; .venv/bin/python -m pytest "$@" ;;
  demo) setup; .venv/bin/relay dev --demo --port 0 ;;
  lint)
    setup
    .venv/bin/ruff check .
    .venv/bin/ruff format --check .
    .venv/bin/mypy --strict relay
    ;;
  *) echo "usage: ./tasks.sh [demo|test|lint|setup]" >&2; exit 2 ;;
esac
