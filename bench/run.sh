#!/usr/bin/env bash
# Postern benchmark harness (issue 7): the one command.
#
#   bench/run.sh            full run (3 rounds x 10 s per measurement, ~25 min)
#   bench/run.sh --quick    smoke test (1 round x 2 s, small N)
#   bench/run.sh --help     harness options (workload/system selection, ...)
#
# It installs what it compares against when missing (nginx, wrk, iperf3,
# gnuplot, perf from Debian; rathole from crates.io into bench/.tools),
# builds Postern and the load agent in release mode, then runs
# bench/harness.py, which writes raw results to bench/out/, plots to
# bench/plots/ and the generated part of BENCHMARKS.md.
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$REPO/target}"

for arg in "$@"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then
        exec python3 "$BENCH/harness.py" --help
    fi
done

log() { printf '\n== %s\n' "$*" >&2; }

# --- system packages (Debian) ---------------------------------------------
declare -A PKG_FOR=(
    [nginx]=nginx [wrk]=wrk [iperf3]=iperf3 [gnuplot]=gnuplot-nox
    [perf]=linux-perf [openssl]=openssl [unshare]=util-linux [python3]=python3
)
missing=()
for cmd in "${!PKG_FOR[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || [[ -x "/usr/sbin/$cmd" ]] || missing+=("${PKG_FOR[$cmd]}")
done
if ((${#missing[@]})); then
    log "installing from Debian: ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    # RUNLEVEL=1 keeps the packages' init scripts from starting daemons.
    DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- rathole (crates.io; its lock file does not build here, so no --locked) --
if [[ ! -x "$BENCH/.tools/bin/rathole" ]]; then
    log "cargo install rathole --root bench/.tools"
    # Its own target dir: don't mix its dependency versions into Postern's.
    CARGO_TARGET_DIR="$BENCH/.tools/build" cargo install rathole --root "$BENCH/.tools"
    rm -rf "$BENCH/.tools/build"
fi

# --- Postern and the load agent --------------------------------------------
log "cargo build --release (postern-edge, postern)"
(cd "$REPO" && cargo build --release --bin postern-edge --bin postern)

log "cargo build --release (bench/loadagent)"
# Start from the workspace's lock file so the shared crates resolve to the
# same versions and their compiled artifacts in target/ are reused.
cp "$REPO/Cargo.lock" "$BENCH/loadagent/Cargo.lock"
cargo build --release --manifest-path "$BENCH/loadagent/Cargo.toml"

# --- run -------------------------------------------------------------------
mkdir -p "$BENCH/out/run"
PIDS="$BENCH/out/run/pids"
cleanup() {
    # The harness stops what it started; this is the backstop if it died.
    # Only the PIDs it recorded are signalled.
    if [[ -f "$PIDS" ]]; then
        while read -r pid _name; do
            [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
        done <"$PIDS"
        sleep 1
        while read -r pid _name; do
            [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
        done <"$PIDS"
        rm -f "$PIDS"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 "$BENCH/harness.py" "$@"
