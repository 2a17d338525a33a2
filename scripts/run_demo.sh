#!/usr/bin/env bash
# The main job on a fresh machine: set up, then segment the bundled sample CT with the
# bundled demo model and write every output into ./livertumorseg-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cli
.venv/bin/livertumorseg demo -o "${1:-livertumorseg-demo}"
