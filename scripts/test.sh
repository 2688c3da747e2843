#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), check style and types, and run the whole test suite
# against real volfs mounts. Extra arguments go to pytest.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup.sh"
venv=${VOLFS_VENV:-$repo/.venv}
cd "$repo"
"$venv/bin/ruff" check volfs tests scripts
"$venv/bin/mypy"
exec "$venv/bin/python" -m pytest "$@"
