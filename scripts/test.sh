#!/usr/bin/env bash
# One command: set up (idempotent) and run the whole test suite, real-model tests included.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Two workers (CI has 2 cores; each test runs torch single-threaded, conftest._single_thread);
# --dist loadfile keeps a file's tests, and its module fixtures, on one worker.
.venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit code 5); treating as success" >&2
  rc=0
fi
exit "$rc"
