#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite on the CPU.
# Reference data is read from ../shared/reference (next to this repository).
source "$(dirname "$0")/env.sh"
python -m pytest -q tests "$@"
