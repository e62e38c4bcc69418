#!/usr/bin/env python3
"""What a 10-rule Traffic Policy costs an HTTPS endpoint (issue 28).

One edge and one agent serve the same nginx twice: as app.postern.localhost
without a policy and as policy.postern.localhost with
bench/policy-10-rules.yml. wrk loads both in alternating order, round after
round, in the same run; the report is the ratio of keep-alive requests/s
(policy ÷ none, median of the rounds) and the added one-connection p50
(policy − none), never absolute speed.

Usage: bench/policy_cost.py [--rounds N] [--duration SECONDS]
Needs nginx, wrk, and release builds of postern-edge and postern
(cargo build --release --bin postern-edge --bin postern; POSTERN_BIN_DIR
names another directory of them; see one_edge.py). Writes
bench/out/policy-cost/result.json and prints a Markdown table."""

import argparse
import json
import os
import re
import socket
import ssl
import statistics
import subprocess

from one_edge import OneEdge

BENCH = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(BENCH, "out", "policy-cost")
PORTS = dict(nginx=30980, agent=30960, http=30961, https=30962)
NAMES = {"none": "app.postern.localhost", "policy": "policy.postern.localhost"}
TOKEN = "policy-cost-bench"


def https_status(name):
    """One GET / to the edge as `name`; the status code or None."""
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", PORTS["https"]), timeout=2) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as s:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        m = re.match(rb"HTTP/1\.1 (\d+)", data)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def wrk(name, conns, duration):
    """wrk against the edge as `name` (SNI and Host from the URL, resolved
    through a private /etc/hosts): requests/s and p50 in µs."""
    url = f"https://{name}:{PORTS['https']}/"
    cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
           os.path.join(OUT, "hosts"), "wrk", f"-t{min(conns, 2)}", f"-c{conns}",
           f"-d{duration}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if not rps or not p50 or non2xx:
        raise SystemExit(f"wrk against {name} failed:\n{out}")
    scale = {"us": 1, "ms": 1e3, "s": 1e6}[p50.group(2)]
    return float(rps.group(1)), float(p50.group(1)) * scale


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    args = ap.parse_args()
    os.makedirs(os.path.join(OUT, "nginx-tmp"), exist_ok=True)
    run = OneEdge(OUT, "policy-cost", PORTS, TOKEN)
    with open(os.path.join(BENCH, "policy-10-rules.yml")) as f:
        policy = "".join("      " + line for line in f if line.strip() and not line.startswith("#"))
    nginx = run.write("nginx.conf", f"""daemon off;
worker_processes 1;
pid {OUT}/nginx.pid;
error_log {OUT}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {OUT}/nginx-tmp;
    server {{
        listen 127.0.0.1:{PORTS['nginx']};
        location / {{ default_type text/plain; return 200 "{'x' * 100}"; }}
    }}
}}
""")
    tunnels = f"""  none:
    proto: http
    addr: "127.0.0.1:{PORTS['nginx']}"
    domain: "{NAMES['none']}"
    inspect: false
  policy:
    proto: http
    addr: "127.0.0.1:{PORTS['nginx']}"
    domain: "{NAMES['policy']}"
    inspect: false
    traffic_policy:
{policy}"""
    with open("/etc/hosts") as f:
        run.write("hosts", f.read() + "".join(f"\n127.0.0.1 {n}" for n in NAMES.values()) + "\n")
    try:
        run.start("nginx", ["nginx", "-c", nginx])
        run.start_edge_and_agent(tunnels)
        for name in NAMES.values():
            run.wait_for(lambda name=name: https_status(name) == 200, f"{name} answering 200")
        rounds = []
        for r in range(args.rounds):
            order = ["none", "policy"] if r % 2 == 0 else ["policy", "none"]
            row = {}
            for system in order:
                rps, _ = wrk(NAMES[system], 64, args.duration)
                _, p50 = wrk(NAMES[system], 1, args.duration)
                row[system] = {"rps": rps, "p50_us": p50}
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", flush=True)
    finally:
        run.stop()
    ratio = statistics.median(r["policy"]["rps"] / r["none"]["rps"] for r in rounds)
    added = statistics.median(r["policy"]["p50_us"] - r["none"]["p50_us"] for r in rounds)
    med = lambda s, k: statistics.median(r[s][k] for r in rounds)  # noqa: E731
    result = {
        "rounds": rounds,
        "keepalive_ratio": round(ratio, 3),
        "added_p50_us": round(added, 1),
        "load_average_at_end": os.getloadavg(),
    }
    run.write("result.json", json.dumps(result, indent=2))
    print(f"""
| HTTPS endpoint, {args.rounds} rounds × {args.duration} s | no policy | 10-rule policy | policy vs none |
|---|---:|---:|---:|
| keep-alive req/s (wrk -t2 -c64), median | {med('none', 'rps'):.0f} | {med('policy', 'rps'):.0f} | ratio {ratio:.3f} |
| one connection p50 µs (wrk -t1 -c1), median | {med('none', 'p50_us'):.0f} | {med('policy', 'p50_us'):.0f} | {added:+.1f} µs |""")


if __name__ == "__main__":
    main()
