#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite on the CPU.
# Reference data is read from ../shared/reference (next to this repository).
# One pytest worker per core (pytest-xdist), each test file on one worker, each worker on one
# thread: the tiny models gain nothing from intra-op threads, and two single-threaded workers
# ran the suite in 63 s on 2 cores against 98 s for one two-threaded process.
# `bash shellscripts/test.sh -n 0` runs in one process; other pytest arguments pass through.
source "$(dirname "$0")/env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -q -n auto --dist loadfile tests "$@"
