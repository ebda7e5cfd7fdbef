#!/usr/bin/env bash
# `gtar-logd view` in headless Chromium against a real Keras run, and offline
# on a libgetar-written archive; takes the README's screenshots (docs/view-*.png).
#
# Needs: $GTAR_LOGD_BIN (the daemon binary), $CLIENT_PYTHON (Keras 3 + jax +
# grpcio + numpy), $GTAR_ORACLE_PYTHON (libgetar), node + npm, /usr/bin/chromium
# (test.sh installs Debian's chromium when it is missing).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
: "${GTAR_LOGD_BIN:?set GTAR_LOGD_BIN to the gtar-logd binary}"
: "${CLIENT_PYTHON:?set CLIENT_PYTHON to a python with keras, jax and grpcio}"
: "${GTAR_ORACLE_PYTHON:?set GTAR_ORACLE_PYTHON to a python with libgetar (gtar)}"

WORK=$(mktemp -d /tmp/gtar-view-test.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

(cd "$HERE" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)

# Wait until FILE has a line matching PATTERN (deadline SECS), or fail.
wait_line() {
  local file=$1 pattern=$2 secs=$3 pid=$4
  local end=$((SECONDS + secs))
  until grep -q "$pattern" "$file" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "process $pid exited; its output:"; cat "$file"; exit 1; fi
    if [ "$SECONDS" -ge "$end" ]; then echo "no '$pattern' in $file within ${secs}s:"; cat "$file"; exit 1; fi
    sleep 0.05
  done
}

export XDG_CACHE_HOME=$WORK/cache
SOCK=$WORK/d.sock
"$GTAR_LOGD_BIN" serve --data-dir "$WORK/data" --uds "$SOCK" 2>"$WORK/daemon.log" &
PIDS+=($!)
wait_line "$WORK/daemon.log" ready 30 "${PIDS[-1]}"
ADDR=unix:$SOCK
ARCHIVE=runs/keras.zip

echo "== view: a Keras run (jax, 3 epochs)"
PYTHONPATH=$ROOT/clients/python KERAS_BACKEND=jax JAX_PLATFORMS=cpu \
  "$CLIENT_PYTHON" "$HERE/keras_run.py" "$ADDR" "$ARCHIVE" "$WORK/expect.json"

"$GTAR_LOGD_BIN" view --address "$ADDR" >"$WORK/view.out" 2>"$WORK/view.log" &
PIDS+=($!)
wait_line "$WORK/view.out" 'token=' 30 "${PIDS[-1]}"
VIEW_URL=$(grep -o 'http://127.0.0.1:[0-9]*/?token=[0-9a-f]*' "$WORK/view.out")

echo "== view: offline, a libgetar-written archive (no daemon)"
mkdir -p "$WORK/offline"
"$GTAR_ORACLE_PYTHON" "$HERE/libgetar_archive.py" "$WORK/offline/libgetar.zip" "$WORK/offline.json"
"$GTAR_LOGD_BIN" view "$WORK/offline/libgetar.zip" >"$WORK/offline.out" 2>"$WORK/offline.log" &
PIDS+=($!)
wait_line "$WORK/offline.out" 'token=' 30 "${PIDS[-1]}"
OFFLINE_URL=$(grep -o 'http://127.0.0.1:[0-9]*/?token=[0-9a-f]*' "$WORK/offline.out")

echo "== view: headless Chromium"
LIVE_CMD="PYTHONPATH='$ROOT/clients/python' '$CLIENT_PYTHON' '$HERE/write_frame.py' '$ADDR' '$ARCHIVE' 999999"
VIEW_URL=$VIEW_URL EXPECT=$WORK/expect.json ARCHIVE=$ARCHIVE LIVE_CMD=$LIVE_CMD \
  SHOTS=$ROOT/docs OFFLINE_URL=$OFFLINE_URL OFFLINE_EXPECT=$WORK/offline.json \
  node "$HERE/view.test.mjs"
