#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests
# drive (curl, openssl), builds the binaries the end-to-end tests start,
# then runs every test with cargo-nextest (cargo test if nextest is absent).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in curl openssl; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
