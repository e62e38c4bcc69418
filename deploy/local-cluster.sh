#!/usr/bin/env bash
# A local three-region Postern cluster on loopback: edge nodes us, eu and
# ap (configs in deploy/local-cluster/), gossiping every second. Prints what
# to try, runs until Ctrl-C, then stops the nodes (each drains and saves
# its cluster snapshot, so the next start has the config at once).
#
#   deploy/local-cluster.sh [state-dir]      (default ./postern-cluster-data)
#
# Not yet in it: Redis, the Kafka-protocol broker, a demo agent (see the
# README, "Running a multi-region cluster").
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY")"
STATE="$(mkdir -p "${1:-postern-cluster-data}" && cd "${1:-postern-cluster-data}" && pwd)"

cargo build --release --bin postern-edge --manifest-path "$REPO/Cargo.toml"
EDGE="${CARGO_TARGET_DIR:-$REPO/target}/release/postern-edge"

pids=()
stop() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap stop EXIT INT TERM

cd "$STATE"
for region in us eu ap; do
    "$EDGE" --config "$DEPLOY/local-cluster/$region.toml" >"$region.log" 2>&1 &
    pids+=("$!")
done
for port in 9090 9091 9092; do
    for _ in $(seq 100); do
        curl -fsS -o /dev/null -H "Authorization: Bearer local-cluster-api-key" \
            "http://127.0.0.1:$port/certificate_authorities" && break
        sleep 0.1
    done
done

cat <<BANNER

Three edge nodes are up (logs in $STATE/<region>.log):

  region  agent ingress                            HTTPS   admin API
  us      tunnel.us.connect.postern.localhost:4443  :8443   http://127.0.0.1:9090
  eu      tunnel.eu.connect.postern.localhost:4444  :8444   http://127.0.0.1:9091
  ap      tunnel.ap.connect.postern.localhost:4445  :8445   http://127.0.0.1:9092

Upload a CA at us and read it at ap a second later:

  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \\
      -subj /CN=demo-ca -addext basicConstraints=critical,CA:TRUE \\
      -keyout /tmp/demo-ca-key.pem -out /tmp/demo-ca.pem
  curl -H 'Authorization: Bearer local-cluster-api-key' \\
      --data-binary @/tmp/demo-ca.pem http://127.0.0.1:9090/certificate_authorities
  curl -H 'Authorization: Bearer local-cluster-api-key' http://127.0.0.1:9092/certificate_authorities

An agent in eu (each node has its own dev CA, $STATE/<region>/dev-ca.pem):

  python3 -m http.server 8000 &
  postern http 8000 --authtoken local-cluster-authtoken \\
      --server-addr tunnel.eu.connect.postern.localhost:4444 --root-cas $STATE/eu/dev-ca.pem

Ctrl-C stops the cluster.
BANNER
wait
