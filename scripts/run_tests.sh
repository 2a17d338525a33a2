#!/usr/bin/env bash
# The tests on a fresh machine: set up with the test and training extras, then pytest.
# Extra arguments go to pytest. Exit code 5 (no tests collected) is an error here:
# a suite that collected nothing has not passed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,train"
# Child processes print progress bars (UTF-8); decode the same whatever the locale.
export PYTHONUTF8=1
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "run_tests: pytest collected no tests" >&2
  exit 1
fi
exit "$code"
