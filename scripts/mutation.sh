#!/usr/bin/env bash
# Mutation testing (not part of CI): installs mutmut (and pytest-timeout, which ends a mutant's hung test)
# into the project's virtualenv, then runs scripts/mutation.py over the core modules, or those named;
# JSON on stdout, progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install --quiet 'mutmut==3.8.1' 'pytest-timeout==2.3.1'
exec .venv/bin/python scripts/mutation.py "$@"
