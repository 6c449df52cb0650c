#!/usr/bin/env bash
# Set up .venv (first run) and run the main job on built-in synthetic receipts.
source "$(dirname "$0")/_env.sh"
exec .venv/bin/wds-ocr demo "$@"
