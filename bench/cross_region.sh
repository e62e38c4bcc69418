#!/usr/bin/env bash
# Cross-region forwarding (issue 5): requests at a node whose agent is
# connected to another node, against the agent's own node and a direct
# connection, in one run; prints a Markdown table (BENCHMARKS.md,
# "Cross-region forwarding").
#
#   bench/cross_region.sh        ROUNDS=3 SECONDS_PER_RUN=10 CONNS=32 by default
set -euo pipefail
BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$BENCH")"
for cmd in nginx wrk; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [[ ! -x "/usr/sbin/$cmd" ]]; then
        if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 $SUDO apt-get install -y -qq --no-install-recommends nginx wrk >/dev/null
        break
    fi
done
PATH="$PATH:/usr/sbin"
cargo build --release --bin postern-edge --bin postern --manifest-path "$REPO/Cargo.toml"
exec python3 "$BENCH/cross_region.py" "${CARGO_TARGET_DIR:-$REPO/target}/release"
