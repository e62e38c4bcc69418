#!/usr/bin/env bash
# Postern benchmark harness (issue 7): the one command.
#
#   bench/run.sh            full run (3 rounds x 10 s per measurement, ~35 min)
#   bench/run.sh --quick    smoke test (1 round x 2 s, small N)
#   bench/run.sh --help     harness options (workload/system selection, ...)
#   bench/run.sh --rev=HEAD [...]   benchmark a committed revision instead of
#                           the working tree (built from `git archive` in
#                           bench/out/src with its own target dir)
#   bench/run.sh --baseline=REV [...]   also build REV and measure it as one
#                           more system ("Postern TCP endpoint, before"), for
#                           before/after numbers from the same run
#   bench/run.sh --no-http-cost [...]   skip the HTTP/HTTPS endpoint step
#
# After the harness it runs bench/http_cost.py (issue 27's HTTP and HTTPS
# rows, against the TCP endpoint and, with --baseline, the same endpoints of
# REV), which writes its own generated part of BENCHMARKS.md. Its events
# system publishes to Kafka when the test setup's tansu is there
# (.venv-svc, made by scripts/test.sh, or POSTERN_TEST_TANSU), else to a
# file only; its ngrok SDK system runs when that venv has ngrok.
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

REV=""
BASELINE=""
HTTP_COST=1
QUICK=""
ARGS=()
for arg in "$@"; do
    case "$arg" in
        -h | --help) exec python3 "$BENCH/harness.py" --help ;;
        --rev=*) REV="${arg#--rev=}" ;;
        --baseline=*) BASELINE="${arg#--baseline=}" ;;
        --no-http-cost) HTTP_COST="" ;;
        --quick) QUICK=1; ARGS+=("$arg") ;;
        *) ARGS+=("$arg") ;;
    esac
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
SRC="$REPO"
if [[ -n "$REV" ]]; then
    SHA="$(git -C "$REPO" rev-parse --short "$REV")"
    log "exporting $REV ($SHA) to bench/out/src"
    SRC="$BENCH/out/src"
    rm -rf "$SRC"
    mkdir -p "$SRC"
    # -m: see the baseline's extraction below.
    git -C "$REPO" archive "$SHA" | tar -x -m -C "$SRC"
    # The load agent as it is now, built against that revision's agent crate.
    rm -rf "$SRC/bench"
    mkdir -p "$SRC/bench/loadagent"
    cp -r "$BENCH/loadagent/Cargo.toml" "$BENCH/loadagent/src" "$SRC/bench/loadagent/"
    # Its own target dir, so the workspace's target/release stays the other
    # builds' own.
    export CARGO_TARGET_DIR="$BENCH/out/target"
    if [[ ! -d "$CARGO_TARGET_DIR/release" && -d "$REPO/target/release" ]]; then
        # Seed it with the workspace's compiled dependencies (saves ~10 min).
        mkdir -p "$CARGO_TARGET_DIR"
        cp -a "$REPO/target/release" "$CARGO_TARGET_DIR/release"
    fi
    export POSTERN_BENCH_SOURCE="git $SHA (committed revision $REV, built from git archive)"
else
    dirty=""
    [[ -n "$(git -C "$REPO" status --porcelain --untracked-files=no -- proto edge-node ingress-gateway agent 2>/dev/null)" ]] \
        && dirty=", with uncommitted changes"
    export POSTERN_BENCH_SOURCE="working tree at git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$dirty"
fi

log "cargo build --release (postern-edge, postern) in $SRC"
(cd "$SRC" && cargo build --release --bin postern-edge --bin postern)

# POSTERN_LOADAGENT_BIN=path: use an already built load agent (its agents
# only load the edge, which is what the session test measures).
LOADAGENT="${POSTERN_LOADAGENT_BIN:-$CARGO_TARGET_DIR/release/postern-loadagent}"
if [[ -z "${POSTERN_LOADAGENT_BIN:-}" ]]; then
    log "cargo build --release (bench/loadagent)"
    # Start from the workspace's lock file so the shared crates resolve to the
    # same versions and their compiled artifacts in the target dir are reused.
    cp "$SRC/Cargo.lock" "$SRC/bench/loadagent/Cargo.lock"
    cargo build --release --manifest-path "$SRC/bench/loadagent/Cargo.toml"
fi

# Run private copies: a rebuild elsewhere during the run must not swap the
# binaries between rounds.
mkdir -p "$BENCH/out/bin"
for b in postern-edge postern; do
    cp "$CARGO_TARGET_DIR/release/$b" "$BENCH/out/bin/$b.new"
    mv -f "$BENCH/out/bin/$b.new" "$BENCH/out/bin/$b"
done
cp "$LOADAGENT" "$BENCH/out/bin/postern-loadagent.new"
mv -f "$BENCH/out/bin/postern-loadagent.new" "$BENCH/out/bin/postern-loadagent"
export POSTERN_BIN_DIR="$BENCH/out/bin"

if [[ -n "$BASELINE" ]]; then
    BSHA="$(git -C "$REPO" rev-parse --short "$BASELINE")"
    BSRC="$BENCH/out/src-base"
    log "exporting the baseline $BASELINE ($BSHA) to bench/out/src-base and building it"
    rm -rf "$BSRC"
    mkdir -p "$BSRC"
    # -m: the files get the time of extraction, not the commit's. Cargo
    # hashes a workspace member by its path inside the workspace, so this
    # build shares the working tree's artifacts; with the commit's older
    # times a build script's output (the generated protobuf code) would
    # look up to date and be reused.
    git -C "$REPO" archive "$BSHA" | tar -x -m -C "$BSRC"
    (cd "$BSRC" && cargo build --release --bin postern-edge --bin postern)
    mkdir -p "$BENCH/out/bin-base"
    for b in postern-edge postern; do
        cp "$CARGO_TARGET_DIR/release/$b" "$BENCH/out/bin-base/$b.new"
        mv -f "$BENCH/out/bin-base/$b.new" "$BENCH/out/bin-base/$b"
    done
    # The baseline's artifacts now sit where the working tree's were, under
    # the same hashes; cargo would take them for the working tree's, whose
    # files are older. Newer times make its next build compile them again.
    git -C "$REPO" ls-files -z '*.rs' | (cd "$REPO" && xargs -0 touch -c)
    export POSTERN_BASELINE_BIN_DIR="$BENCH/out/bin-base"
    export POSTERN_BASELINE_SOURCE="git $BSHA"
fi

# --- run -------------------------------------------------------------------
mkdir -p "$BENCH/out/run"
PIDS="$BENCH/out/run/pids"
cleanup() {
    # The harness stops what it started; this is the backstop if it died.
    # Only the PIDs it recorded, and only while they still run the recorded
    # program (a PID can be reused).
    ours() { [[ -n "$1" && -r "/proc/$1/cmdline" ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -qF -- "$2"; }
    if [[ -f "$PIDS" ]]; then
        while read -r pid exe; do
            if ours "$pid" "$exe"; then kill -TERM "$pid" 2>/dev/null || true; fi
        done <"$PIDS"
        sleep 1
        while read -r pid exe; do
            if ours "$pid" "$exe"; then kill -KILL "$pid" 2>/dev/null || true; fi
        done <"$PIDS"
        rm -f "$PIDS"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 "$BENCH/harness.py" "${ARGS[@]}"

if [[ -n "$HTTP_COST" ]]; then
    # Every system (the `…-before` ones with --baseline, which exports
    # their binaries); it finds the test venv's SDK and tansu itself.
    if [[ -n "$QUICK" ]]; then rounds=(--rounds 1 --duration 2 --pairs 3); else rounds=(--rounds 3 --duration 5); fi
    log "bench/http_cost.py (HTTP and HTTPS endpoints against the TCP endpoint)"
    python3 "$BENCH/http_cost.py" "${rounds[@]}" --write-md
fi
