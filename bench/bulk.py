#!/usr/bin/env python3
"""TCP bulk through the tunnel: the Postern agent with one connection per
session and with its default, and an ngrok SDK session (issues 20, 22).

One iperf3 server; one edge with its SDK ingress on; two Postern agents
(`connections: 1`, and the default: one per core, at most 4) and ngrok's
Python SDK (tests/ngrok-sdk/forward.py, `ngrok.forward(..., proto="tcp")`)
each serve it as a TCP endpoint of that edge. iperf3 runs against the
server directly and through each, one stream and eight, the order rotating
from round to round, all in the same run. The report gives medians and the
ratios between systems measured side by side, and the edge's plus the
tunnel client's CPU seconds per GB.

Usage: bench/bulk.py [--rounds N] [--duration SECONDS] [--baseline-agent PATH]
With --baseline-agent, a third Postern agent (that binary, another build,
default connections) serves the same server, for a before/after in one run.
Needs iperf3 and release builds of postern-edge and postern (POSTERN_BIN_DIR
names another directory of them), and the test venv's `ngrok` package
(POSTERN_TEST_PYTHON, else .venv-svc). Writes bench/out/sdk-bulk/."""

import argparse
import json
import os
import re
import statistics
import subprocess
import time

from procs import Procs, cpu_seconds

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out", "bulk")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
PORTS = dict(iperf=31050, agent=31051, https=31052, sdk=31053, tcp_first=31060)
DOMAIN = "postern.localhost"
TOKEN = "sdk-bulk-bench"
# system: (label, processes whose CPU counts)
SYSTEMS = {
    "direct": ("iperf3 direct", ()),
    "agent-1c": ("TCP endpoint through the Postern agent, `connections: 1`",
                 ("edge", "agent-1c")),
    "agent": ("TCP endpoint through the Postern agent, default connections", ("edge", "agent")),
    "sdk": ("TCP endpoint through an ngrok SDK session (Python `ngrok.forward`)",
            ("edge", "sdk")),
}


def iperf(port, streams, duration, procs, pids):
    """Gbit/s received and CPU seconds per GB of the system's processes."""
    for attempt in range(5):
        before = {p: cpu_seconds(pids[p]) for p in procs}
        out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P",
                              str(streams), "-t", str(duration), "-J"],
                             capture_output=True, text=True, timeout=duration + 60).stdout
        used = sum(cpu_seconds(pids[p]) - before[p] for p in procs)
        result = json.loads(out)
        if "busy" not in result.get("error", ""):
            break
        time.sleep(2)  # the server is still finishing the previous test
    if "error" in result:
        raise SystemExit(f"iperf3 on port {port}: {result['error']}")
    received = result["end"]["sum_received"]
    gbytes = received["bytes"] / 1e9
    return {"gbps": received["bits_per_second"] / 1e9,
            "cpu_s_per_gb": used / gbytes if procs else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per iperf3 run")
    ap.add_argument("--baseline-agent", help="a `postern` binary of another build")
    args = ap.parse_args()
    if args.baseline_agent:
        SYSTEMS["agent-base"] = ("TCP endpoint through the baseline agent (--baseline-agent), "
                                 "default connections", ("edge", "agent-base"))
    os.makedirs(OUT, exist_ok=True)
    data = os.path.join(OUT, "edge-data")
    bins = os.environ.get("POSTERN_BIN_DIR", os.path.join(TARGET, "release"))
    edge_toml = os.path.join(OUT, "edge.toml")
    with open(edge_toml, "w") as f:
        f.write(f"""node_id = "edge"
domain = "{DOMAIN}"
data_dir = "{data}"
[listen]
agent = "127.0.0.1:{PORTS['agent']}"
https = "127.0.0.1:{PORTS['https']}"
http = ""
admin = ""
metrics = ""
ngrok_agent = "127.0.0.1:{PORTS['sdk']}"
[public]
tcp_host = "127.0.0.1"
[tcp]
bind_ip = "127.0.0.1"
ports = "{PORTS['tcp_first']}-{PORTS['tcp_first'] + 9}"
[tls]
dev_ca = true
[[authtokens]]
token = "{TOKEN}"
""")
    agent_ymls = {}
    agents = {"agent": ("", 0), "agent-1c": ("connections: 1\n", 1)}
    if args.baseline_agent:
        agents["agent-base"] = ("", 2)
    for name, (connections, port) in agents.items():
        agent_ymls[name] = os.path.join(OUT, f"{name}.yml")
        with open(agent_ymls[name], "w") as f:
            f.write(f"""version: "2"
authtoken: "{TOKEN}"
server_addr: "tunnel.us.connect.{DOMAIN}:{PORTS['agent']}"
root_cas: "{data}/dev-ca.pem"
{connections}tunnels:
  bulk:
    proto: tcp
    addr: "127.0.0.1:{PORTS['iperf']}"
    remote_addr: "127.0.0.1:{PORTS['tcp_first'] + port}"
""")
    procs = Procs(OUT)
    start, pids = procs.start, procs.pids

    def wait_for(check, what, seconds=30):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if found := check():
                return found
            time.sleep(0.2)
        raise SystemExit(f"timed out waiting for {what}; logs in {OUT}")

    def log_match(name, pattern):
        with open(os.path.join(OUT, f"{name}.log")) as f:
            m = re.search(pattern, f.read())
        return m and m.group(1)

    ports = {"direct": PORTS["iperf"], "agent": PORTS["tcp_first"],
             "agent-1c": PORTS["tcp_first"] + 1, "agent-base": PORTS["tcp_first"] + 2}
    rounds = []
    try:
        start("iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(PORTS["iperf"])])
        start("edge", [os.path.join(bins, "postern-edge"), "--config", edge_toml])
        wait_for(lambda: os.path.exists(f"{data}/dev-ca.pem"), "the edge's dev CA")
        for name, yml in agent_ymls.items():
            binary = (args.baseline_agent if name == "agent-base"
                      else os.path.join(bins, "postern"))
            start(name, [binary, "start", "--all", "--config", yml])
        # Before the SDK asks for a port, so that it gets none of theirs.
        for name in agent_ymls:
            wait_for(lambda n=name: log_match(n, r"(Forwarding)"), f"{name}'s tunnel")
        python = os.environ.get("POSTERN_TEST_PYTHON",
                                os.path.join(REPO, ".venv-svc", "bin", "python"))
        env = dict(os.environ, POSTERN_SERVER_ADDR=f"127.0.0.1:{PORTS['sdk']}",
                   POSTERN_CA=f"{data}/dev-ca.pem", UPSTREAM_PORT=str(PORTS["iperf"]),
                   ENDPOINT_DOMAIN="", NGROK_AUTHTOKEN=TOKEN)
        start("sdk", [python, os.path.join(REPO, "tests", "ngrok-sdk", "forward.py"), "tcp"],
              env)
        ports["sdk"] = int(wait_for(lambda: log_match("sdk", r"tcp://[^:]+:(\d+)"),
                                    "the SDK's TCP endpoint"))
        for r in range(args.rounds):
            order = list(SYSTEMS)[r % len(SYSTEMS):] + list(SYSTEMS)[:r % len(SYSTEMS)]
            row = {}
            for system in order:
                for streams in (1, 8):
                    row[f"{system}-{streams}"] = iperf(ports[system], streams, args.duration,
                                                       SYSTEMS[system][1], pids)
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", flush=True)
    finally:
        procs.stop()
    report(args, rounds)


def report(args, rounds):
    def med(key, field):
        values = [r[key][field] for r in rounds if r[key][field] is not None]
        return statistics.median(values) if values else None

    lines = [f"| system ({args.rounds} rounds × {args.duration} s) | 1 stream Gbit/s | "
             "8 streams Gbit/s | edge + tunnel client CPU-s/GB (1 stream) |",
             "|---|---:|---:|---:|"]
    for system, (label, _) in SYSTEMS.items():
        cpu = med(f"{system}-1", "cpu_s_per_gb")
        lines.append(f"| {label} | {med(f'{system}-1', 'gbps'):.2f} | "
                     f"{med(f'{system}-8', 'gbps'):.2f} | "
                     f"{'–' if cpu is None else f'{cpu:.2f}'} |")
    lines += ["", "| comparison, medians of the per-round values | value |", "|---|---:|"]
    ratios = {}
    for streams in (1, 8):
        pairs = [("agent", "agent-1c"), ("sdk", "agent"), ("sdk", "direct"),
                 ("agent", "direct"), ("agent-1c", "direct")]
        if "agent-base" in SYSTEMS:
            pairs.append(("agent", "agent-base"))
        for a, b in pairs:
            label = f"bulk {streams} stream{'s' if streams > 1 else ''}: {a} ÷ {b}"
            ratio = statistics.median(r[f"{a}-{streams}"]["gbps"] / r[f"{b}-{streams}"]["gbps"]
                                      for r in rounds)
            ratios[label] = round(ratio, 3)
            lines.append(f"| {label} | {ratio:.2f} |")
    with open(os.path.join(OUT, "result.json"), "w") as f:
        json.dump({"rounds": rounds, "ratios": ratios,
                   "load_average_at_end": os.getloadavg()}, f, indent=2)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
