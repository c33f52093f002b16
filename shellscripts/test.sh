#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the whole suite on the CPU.
# Reference data is read from ../shared/reference (next to this repository).
# One pytest worker per core (pytest-xdist; at most 4, which bounds the memory where a
# container shows more cores than it may use), each test file on one worker, each worker on
# one thread: the tiny models gain nothing from intra-op threads, and two single-threaded
# workers ran the suite in 63 s on 2 cores against 98 s for one two-threaded process.
# `bash shellscripts/test.sh -n 0` runs in one process; other pytest arguments pass through,
# and test paths among them (`tests/test_readme.py`, `tests/test_api.py::test_x`) narrow the run.
source "$(dirname "$0")/env.sh"
workers="$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)"  # (nproc obeys both)
[ "$workers" -gt 4 ] && workers=4
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# the whole suite unless a test path is given (an argument naming a file or folder that exists,
# `::test` stripped, other than an option's value)
paths=(tests)
prev=""
for arg in "$@"; do
  case "$prev" in
    -n|-k|-m|-p|-c|--deselect|--ignore|--ignore-glob|--rootdir) ;;
    *) [[ "$arg" != -* && -e "${arg%%::*}" ]] && paths=() ;;
  esac
  prev="$arg"
done
python -m pytest -q -n "$workers" --dist loadfile ${paths[@]+"${paths[@]}"} "$@"
