#!/usr/bin/env bash
# A venv where keras_gtar 1.1.0 (the callback GTARLogger replaces) runs, for
# bench_stall.py's anchor on the tensorflow backend:
#
#   clients/python/bench/setup_keras_gtar.sh .venv-kgtar
#   GTAR_LOGD_BIN=target/release/gtar-logd KERAS_BACKEND=tensorflow \
#       .venv-kgtar/bin/python clients/python/bench/bench_stall.py
#
# keras_gtar imports with tensorflow-cpu 2.21.0 (Keras 3), but gtar 1.1.7's
# wheels are built for numpy 1.x: rebuild it from its sdist with Cython < 3
# (the shipped _gtar.cpp is for numpy 1; deleting it makes setup.py
# cythonize again). Idempotent: does nothing when it all imports already.
# The compile takes several minutes on 2 cores.
set -euo pipefail
VENV=${1:?usage: setup_keras_gtar.sh VENV}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv "$VENV"
fi
if ! "$PY" -c 'import tensorflow, keras, grpc, Cython' 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check "tensorflow-cpu==2.21.0" "keras==3.15.1" \
    "ml_dtypes>=0.5" "grpcio==1.85.1" "protobuf>=7.35.1,<8" "pytest" "cython<3" setuptools wheel
fi
if ! "$PY" -c 'import gtar' 2>/dev/null; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # --no-build-isolation: fetching the sdist must not try to build it.
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-binary :all: --no-deps \
    --no-build-isolation -d "$work" gtar==1.1.7
  tar xzf "$work/gtar-1.1.7.tar.gz" -C "$work"
  (cd "$work/gtar-1.1.7" && rm -f gtar/_gtar.cpp && "$PY" setup.py -q build_ext --cython &&
    "$VENV/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps .)
fi
if ! "$PY" -c 'import keras_gtar' 2>/dev/null; then
  # --no-deps: its requirement on gtar would pull the numpy-1 wheel back.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "keras-gtar==1.1.0"
fi
"$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$ROOT/clients/python"
KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 "$PY" -c 'import gtar, keras_gtar, gtar_logd'
