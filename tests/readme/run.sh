#!/usr/bin/env bash
# The README, run verbatim: its Install, Run it and Quickstart sections'
# shell blocks, exactly as written, with bash -euo pipefail, so the README
# cannot drift from the product.
#
#   tests/readme/run.sh [SECTION...]     default: Install "Run it" Quickstart
#
# Which blocks run is marked in README.md by a comment before the fence
# (see tests/readme/extract.py): `<!-- readme-test: run -->` blocks of a
# section run in order in one bash (so variables carry over from block to
# block, as in a reader's terminal); a `serve` block is a daemon in the
# foreground: it runs in the background until it logs "ready", then gets
# SIGINT and must exit 0; `skip` blocks are shown, not run.
#
# Environments:
#   Install     the real HOME and the clone itself (`cargo install --path .`
#               puts gtar-logd in ~/.cargo/bin, which must be on PATH, as
#               rustup sets it up). CARGO_TARGET_DIR is honoured.
#   Run it      a temporary HOME and XDG_RUNTIME_DIR, so the daemon's
#               defaults land there.
#   Quickstart  the clone as the working directory, a temporary HOME, and
#               XDG_RUNTIME_DIR, XDG_DATA_HOME and GTAR_LOGD_* unset.
#               Afterwards the clone's `git status` must be as before and
#               no process the blocks started may be left running.
# Nothing else is set up: only the clone, a Rust toolchain and python3 (with
# venv and pip) are assumed. pip's download cache is reused when there is
# one (only to save downloads).
#
# Time limits per section (seconds): README_TEST_TIMEOUT_INSTALL (3600),
# README_TEST_TIMEOUT_SERVE (120), README_TEST_TIMEOUT_QUICKSTART (1800).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
README=${README_TEST_FILE:-$ROOT/README.md}   # another file: to test this script
if [ "$#" -eq 0 ]; then set -- "Install" "Run it" "Quickstart"; fi

T0=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/readme-test.XXXXXX")
REAL_HOME=$HOME
PIP_CACHE=${PIP_CACHE_DIR:-$REAL_HOME/.cache/pip}
cleanup() {
  local rc=$?
  if [ "$rc" -eq 0 ]; then rm -rf "$WORK"; else echo "(README test files kept in $WORK)" >&2; fi
}
trap cleanup EXIT

python3 "$ROOT/tests/readme/extract.py" "$README" "$WORK/blocks" "$@"

say() { printf '\n=== %s\n' "$*"; }
die() {
  printf '\nREADME TEST FAILED: %s\n' "$*" >&2
  exit 1
}

# Print the tail of every log a failed section left in its temporary HOME
# (e.g. a daemon's); nothing for a section run in the real HOME.
show_logs() {
  local f
  case $1 in "$WORK"/*) ;; *) return 0 ;; esac
  while IFS= read -r f; do
    printf -- '--- %s (last 40 lines)\n' "$f" >&2
    tail -n 40 "$f" >&2
  done < <(find "$@" -name '*.log' -type f -newer "$WORK/blocks/blocks.tsv" 2>/dev/null)
}

# Whether process $1 still runs (a child that exited stays a zombie until
# it is waited for, and kill -0 succeeds on a zombie).
alive() {
  local st
  st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $st != Z* ]]
}

# The processes left in process group $1, if any (one a line).
leftovers() {
  ps -eo pid=,pgid=,args= | awk -v g="$1" '$2 == g'
}

# Run the `run` blocks of section $1 in one bash, in the current environment
# (the caller sets it), with a time limit of $2 seconds.
run_section() {
  local section=$1 limit=$2 script=$WORK/section.sh state=$WORK/state n sec mode line file
  : >"$state"
  {
    echo 'set -euo pipefail'
    while IFS=$'\t' read -r n sec mode line file; do
      [ "$sec" = "$section" ] && [ "$mode" = run ] || continue
      local where="$section, block $n (README.md line $line)"
      printf 'printf %%s %q >%q\n' "$where" "$state"
      printf 'printf "\\n--- %%s\\n" %q\n' "$where"
      printf 'sed "s/^/  | /" %q\n' "$file"
      cat "$file"
    done <"$WORK/blocks/blocks.tsv"
  } >"$script"
  local start=$SECONDS rc=0 out=$WORK/output-${section// /-}.log
  : >"$out"
  # timeout makes itself a process group leader and signals the whole group
  # when the time is up, so a backgrounded daemon goes too. The output goes
  # to a file (checked against the README's output blocks below) and is
  # shown as it comes.
  timeout --kill-after=10 "$limit" bash "$script" </dev/null >"$out" 2>&1 &
  local pgid=$!
  tail -n +1 -f --pid="$pgid" "$out" &
  local tailer=$!
  wait "$pgid" || rc=$?
  wait "$tailer" || true
  local left
  left=$(leftovers "$pgid")
  if [ -n "$left" ]; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    sleep 2
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  local where
  where=$(cat "$state")
  if [ "$rc" -ne 0 ] && [ $((SECONDS - start)) -ge "$limit" ]; then
    show_logs "$HOME"
    die "$where did not finish within $limit s (the whole '$section' section's limit)"
  elif [ "$rc" -ne 0 ]; then
    show_logs "$HOME"
    die "$where failed with exit status $rc"
  fi
  while IFS=$'\t' read -r n sec mode line file; do
    [ "$sec" = "$section" ] && [ "$mode" = output ] || continue
    python3 "$ROOT/tests/readme/extract.py" --check-output "$out" "$file" "$line" \
      || die "$section: the output shown at README.md line $line did not appear (see above)"
  done <"$WORK/blocks/blocks.tsv"
  if [ -n "$left" ]; then
    die "'$section' left processes running after its last block (a README that starts a daemon must stop it):
$left"
  fi
  say "$section: OK in $((SECONDS - start)) s"
}

# A `serve` block: the daemon in the foreground, as the README shows it.
# Run it in the background, wait until it logs "ready" (and its socket is
# where README's Run it section says it listens by default), stop it with
# SIGINT and expect a clean exit 0.
serve_block() {
  local n=$1 line=$2 file=$3 limit=$4 where="Run it, block $1 (README.md line $2)"
  local log=$WORK/serve-$n.log sock=$XDG_RUNTIME_DIR/gtar-logd/gtar-logd.sock
  printf '\n--- %s\n' "$where"
  sed "s/^/  | /" "$file"
  : >"$log"
  setsid bash -euo pipefail "$file" </dev/null >"$log" 2>&1 &
  local pgid=$! waited=0
  until grep -qw ready "$log"; do
    if ! alive "$pgid"; then
      cat "$log" >&2
      die "$where: the daemon exited before it was ready"
    fi
    if [ "$waited" -ge $((limit * 10)) ]; then
      cat "$log" >&2
      kill -KILL -- "-$pgid" 2>/dev/null || true
      die "$where: no \"ready\" within $limit s"
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  if [ ! -S "$sock" ]; then
    kill -KILL -- "-$pgid" 2>/dev/null || true
    cat "$log" >&2
    die "$where: ready, but there is no socket at $sock (where README's Run it says it listens)"
  fi
  kill -INT -- "-$pgid"
  local rc=0 stopped=$SECONDS
  while alive "$pgid" && [ $((SECONDS - stopped)) -lt 30 ]; do sleep 0.1; done
  if alive "$pgid"; then
    kill -KILL -- "-$pgid" 2>/dev/null || true
    cat "$log" >&2
    die "$where: still running 30 s after SIGINT"
  fi
  wait "$pgid" || rc=$?
  sed "s/^/  > /" "$log"
  [ "$rc" -eq 0 ] || die "$where: exit status $rc after SIGINT (expected a clean exit 0)"
  [ -z "$(leftovers "$pgid")" ] || die "$where: processes left after the daemon exited: $(leftovers "$pgid")"
  [ ! -e "$sock" ] || die "$where: the socket $sock is still there after the daemon exited"
  [ -d "$HOME/.local/share/gtar-logd" ] \
    || die "$where: no data directory at \$HOME/.local/share/gtar-logd (README's default)"
}

for section in "$@"; do
  say "README section: $section"
  case $section in
    Install)
      (cd "$ROOT" && run_section "$section" "${README_TEST_TIMEOUT_INSTALL:-3600}")
      command -v gtar-logd >/dev/null \
        || die "Install ran, but gtar-logd is not on PATH ($PATH): is ~/.cargo/bin on it?"
      echo "gtar-logd is $(command -v gtar-logd): $(gtar-logd --version)"
      ;;
    "Run it")
      (
        export HOME=$WORK/home-serve XDG_RUNTIME_DIR=$WORK/run
        mkdir -p "$HOME" && mkdir -m 700 "$XDG_RUNTIME_DIR"
        unset XDG_DATA_HOME GTAR_LOGD_DATA_DIR GTAR_LOGD_UDS GTAR_LOGD_TCP
        cd "$WORK"
        found=0
        while IFS=$'\t' read -r n sec mode line file; do
          [ "$sec" = "$section" ] || continue
          case $mode in
            serve) serve_block "$n" "$line" "$file" "${README_TEST_TIMEOUT_SERVE:-120}"; found=1 ;;
            run) die "Run it, block $n (README.md line $line): mark it serve (a daemon in the foreground) or skip" ;;
          esac
        done <"$WORK/blocks/blocks.tsv"
        [ "$found" -eq 1 ] || die "no serve block under Run it"
        say "Run it: OK"
      )
      ;;
    Quickstart)
      (
        before=$(git -C "$ROOT" status --porcelain)
        export HOME=$WORK/home
        mkdir -p "$HOME"
        [ -d "$PIP_CACHE" ] && export PIP_CACHE_DIR=$PIP_CACHE
        unset XDG_RUNTIME_DIR XDG_DATA_HOME VIRTUAL_ENV
        unset GTAR_LOGD_ADDRESS GTAR_LOGD_UDS GTAR_LOGD_TCP GTAR_LOGD_DATA_DIR
        command -v gtar-logd >/dev/null || die "gtar-logd is not on PATH: run the Install section first"
        cd "$ROOT"
        run_section "$section" "${README_TEST_TIMEOUT_QUICKSTART:-1800}"
        after=$(git -C "$ROOT" status --porcelain)
        [ "$before" = "$after" ] || die "the Quickstart changed the clone's git status:
before:
$before
after:
$after"
      )
      ;;
    *)
      die "no environment defined for README section '$section' (tests/readme/run.sh knows Install, \"Run it\", Quickstart)"
      ;;
  esac
done
say "README: every tested block ran as written ($(( SECONDS - T0 )) s)"
