#!/usr/bin/env python3
"""Cross-region forwarding (issue 5): what the hop between edge nodes costs.

Two edge nodes of one cluster on loopback (us and ap, release build, gossip
every 100 ms, linked by NodeLink over mutual TLS), an agent connected to ap
and an nginx upstream answering 100 bytes. wrk, keep-alive HTTP/1.1 to each
node's HTTP listener with the endpoint's Host, measured in the same run:

  direct  wrk -> nginx
  local   wrk -> ap -> agent -> nginx            (the agent's own node)
  remote  wrk -> us -> NodeLink -> ap -> agent -> nginx

Rounds interleave the three, medians are reported, and the ratios
remote/local and local/direct are printed as a Markdown table (BENCHMARKS.md,
"Cross-region forwarding"). Run by bench/cross_region.sh.
"""

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

BIN = sys.argv[1]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SECONDS = int(os.environ.get("SECONDS_PER_RUN", "10"))
CONNS = int(os.environ.get("CONNS", "32"))
HOST = "bench.postern.localhost"
P = dict(nginx=31080, us_agent=31443, us_http=31081, us_https=31444, us_gossip=31946,
         us_link=31947, ap_agent=31453, ap_http=31091, ap_https=31454, ap_gossip=31956,
         ap_link=31957)
RUN = tempfile.mkdtemp(prefix="postern-xregion-")
procs = []


def start(cmd, log):
    procs.append(subprocess.Popen(cmd, stdout=open(os.path.join(RUN, log), "w"),
                                  stderr=subprocess.STDOUT, start_new_session=True))


def stop_all():
    for p in reversed(procs):
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def wait_for(pred, what, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}; logs in {RUN}")


def http_status(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
            head = s.recv(64).decode(errors="replace")
            m = re.match(r"HTTP/1\.1 (\d+)", head)
            return int(m.group(1)) if m else None
    except OSError:
        return None


def edge(region, me, other):
    data = os.path.join(RUN, region)
    os.makedirs(data, exist_ok=True)
    path = os.path.join(RUN, f"{region}.toml")
    with open(path, "w") as f:
        f.write(f"""
node_id = "edge-{region}-1"
region = "{region}"
domain = "postern.localhost"
data_dir = "{data}"
[listen]
agent = "127.0.0.1:{P[me + '_agent']}"
http = "127.0.0.1:{P[me + '_http']}"
https = "127.0.0.1:{P[me + '_https']}"
metrics = ""
admin = ""
[tls]
dev_ca = true
[[authtokens]]
token = "bench-token"
[cluster]
cluster_id = "bench"
key = "bench-cluster-key-not-secret-0123456789"
gossip_listen = "127.0.0.1:{P[me + '_gossip']}"
seeds = ["127.0.0.1:{P[other + '_gossip']}"]
gossip_interval = "100ms"
rpc_listen = "127.0.0.1:{P[me + '_link']}"
""")
    start([os.path.join(BIN, "postern-edge"), "--config", path], f"{region}.log")
    return data


def wrk(port):
    out = subprocess.run(
        ["wrk", "-t2", f"-c{CONNS}", f"-d{SECONDS}s", "--latency", "-H", f"Host: {HOST}",
         f"http://127.0.0.1:{port}/"], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def lat(q):
        v, unit = re.search(rf"\s{q}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(v) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return dict(rps=rps, p50=lat(50), p99=lat(99), non2xx=int(errors.group(1)) if errors else 0)


def main():
    try:
        with open(os.path.join(RUN, "nginx.conf"), "w") as f:
            f.write(f"""worker_processes 1; pid {RUN}/nginx.pid; daemon off;
events {{ worker_connections 4096; }}
http {{ access_log off; server {{ listen 127.0.0.1:{P['nginx']};
  location / {{ default_type text/plain; return 200 "{'x' * 100}"; }} }} }}
""")
        start(["nginx", "-p", RUN, "-c", os.path.join(RUN, "nginx.conf"),
               "-e", os.path.join(RUN, "nginx-error.log")], "nginx.log")
        edge("us", "us", "ap")
        ap = edge("ap", "ap", "us")
        wait_for(lambda: os.path.exists(os.path.join(ap, "dev-ca.pem")), "ap's dev CA")
        start([os.path.join(BIN, "postern"), "http", str(P["nginx"]), "--domain", HOST,
               "--authtoken", "bench-token", "--server-addr", f"127.0.0.1:{P['ap_agent']}",
               "--tls-server-name", "tunnel.ap.connect.postern.localhost",
               "--root-cas", os.path.join(ap, "dev-ca.pem")], "agent.log")
        wait_for(lambda: http_status(P["ap_http"]) == 200, "the endpoint at ap")
        wait_for(lambda: http_status(P["us_http"]) == 200, "the endpoint at us")
        systems = dict(direct=P["nginx"], local=P["ap_http"], remote=P["us_http"])
        results = {name: [] for name in systems}
        for _ in range(ROUNDS):
            for name, port in systems.items():
                results[name].append(wrk(port))
        med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for name, runs in results.items()}
        json.dump(dict(results=results, median=med), open(os.path.join(RUN, "results.json"), "w"),
                  indent=1)
        print(f"\n{ROUNDS} rounds x {SECONDS} s, wrk -t2 -c{CONNS}, medians; raw in {RUN}/results.json\n")
        print("| path | requests/s | p50 | p99 | vs local (req/s) | vs direct (req/s) |")
        print("|---|---|---|---|---|---|")
        names = dict(direct="direct to nginx", local="ap, agent on the same node",
                     remote="us, forwarded to ap over NodeLink")
        for name, m in med.items():
            print(f"| {names[name]} | {m['rps']:,.0f} | {m['p50']:,.0f} µs | {m['p99']:,.0f} µs "
                  f"| {m['rps'] / med['local']['rps']:.2f} | {m['rps'] / med['direct']['rps']:.2f} |")
        bad = sum(m["non2xx"] for m in med.values())
        if bad:
            print(f"\nnon-2xx answers (median per run): {bad}")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
