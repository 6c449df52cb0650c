#!/usr/bin/env bash
# Set up .venv (first run) and run the whole test suite. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
exec .venv/bin/python -m pytest -q "$@"
