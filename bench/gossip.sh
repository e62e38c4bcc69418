#!/usr/bin/env bash
# Cluster config convergence (issue 5): 3 nodes on UDP loopback and N nodes
# (default 50) on chitchat's in-memory network, at 100 ms and 1 s gossip
# intervals; prints a Markdown table (BENCHMARKS.md, "Cluster config
# convergence"). Per-write times go to stderr.
#
#   bench/gossip.sh [N] [writes per row]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec cargo run --release --manifest-path "$REPO/Cargo.toml" -p postern-config-sync \
    --example convergence -- "$@"
