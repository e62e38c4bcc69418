#!/usr/bin/env python3
"""Candidate shapes of the tunnel's data plane side by side (issue 20,
part 2): today's tonic streams, the `h2` crate with a task per stream, the
`h2` crate with a connection and its streams in one task, and one TLS
connection per visitor (rathole's shape), each with one and two tunnel
connections where it multiplexes.

Each system is a pair of `postern-dataplane-bench` processes (bench/dataplane)
between a visitor port and an upstream: iperf3's server for bulk, an echo
server for round trips. Per round and system, in an order that rotates from
round to round: iperf3 with 1 stream, 8 streams and 1 stream reversed, then
ping-pong (64 bytes) on one connection and on 64 at once. The report gives
medians, ratios to the tonic shape measured in the same round, and the two
processes' CPU per GB and per round trip.

A system named `<system>@alt` is `<system>` run with the binary that
--alt-bin names (another build of bench/dataplane, e.g. against a changed
postern-proto), for an A/B of one change in the same run.

Usage: bench/dataplane.py [--rounds N] [--duration SECONDS] [--systems a,b]
                          [--alt-bin PATH]
Builds bench/dataplane in release into the workspace's target directory.
Writes bench/out/dataplane/."""

import argparse
import json
import os
import statistics
import subprocess
import time

from procs import TARGET, Procs, build_crate, cpu_seconds, wait_port

BENCH = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(BENCH, "out", "dataplane")
BIN = os.path.join(TARGET, "release", "postern-dataplane-bench")
PORTS = dict(iperf=31150, echo=31151, tunnel=31152, visitor=31153)
# system: (label, shape, tunnel connections); a shape "a/b" is the visitor
# side's a and the upstream side's b (the wire is the same gRPC either way)
SYSTEMS = {
    "no-tunnel": ("no tunnel", None, 0),
    "tls": ("a TLS connection per visitor (rathole's shape)", "tls", 1),
    "tonic": ("tonic streams, 1 connection (today)", "tonic", 1),
    "h2": ("h2 directly, a task per stream, 1 connection", "h2", 1),
    "h2one": ("h2 directly, connection and streams in one task, 1 connection", "h2one", 1),
    "tonic-2c": ("tonic streams, 2 connections", "tonic", 2),
    "h2one-2c": ("h2 in one task per connection, 2 connections", "h2one", 2),
    "h2one/tonic": ("h2 in one task at the visitor side, tonic at the upstream side",
                    "h2one/tonic", 1),
    "tonic/h2one": ("tonic at the visitor side, h2 in one task at the upstream side",
                    "tonic/h2one", 1),
    "direct/tonic": ("the product's direct data connection (the agent's extra connections) "
                     "at the opening side, tonic at the other", "direct/tonic", 1),
    "tonic/direct": ("tonic at the opening side (the agent's first connection), the product's "
                     "direct connection server (the edge) at the other", "tonic/direct", 1),
    "direct": ("the product's direct code at both ends", "direct", 1),
    "direct-2c": ("the product's direct code at both ends, 2 connections", "direct", 2),
}
WORKLOADS = ("bulk-1", "bulk-8", "bulk-1r", "rtt-1", "rtt-64")


def measure(workload, port, duration, pids):
    """One workload through `port`; the pair's CPU seconds with it."""
    before = sum(cpu_seconds(p) for p in pids)
    if workload.startswith("bulk"):
        streams = "8" if workload == "bulk-8" else "1"
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-P", streams,
                "-t", str(duration), "-J"] + (["-R"] if workload.endswith("r") else [])
        # iperf3's server refuses a test while it finishes the previous one
        # ("busy"), and now and then loses a control connection set up right
        # after one: such a run is run again, and says so.
        for attempt in range(5):
            try:
                out = json.loads(subprocess.run(argv, capture_output=True, text=True,
                                                timeout=duration + 60).stdout)
            except subprocess.TimeoutExpired:
                out = {"error": f"no result within {duration + 60} s"}
            if "error" not in out:
                break
            print(f"iperf3 through {port}, attempt {attempt + 1}: {out['error']}", flush=True)
            time.sleep(2)
        if "error" in out:
            raise SystemExit(f"iperf3 through {port}: {out['error']}")
        received = out["end"]["sum_received"]
        used = sum(cpu_seconds(p) for p in pids) - before
        return {"gbps": received["bits_per_second"] / 1e9,
                "cpu_s_per_gb": used / (received["bytes"] / 1e9) if pids else None}
    conns = workload.split("-")[1]
    out = json.loads(subprocess.run(
        [BIN, "pingpong", "--target", f"127.0.0.1:{port}", "--conns", conns,
         "--secs", str(duration)], capture_output=True, text=True, check=True,
        timeout=duration + 60).stdout)
    used = sum(cpu_seconds(p) for p in pids) - before
    trips = out["round_trips_per_s"] * duration
    out["cpu_us_per_trip"] = used * 1e6 / trips if pids else None
    return out


def run_system(system, duration, alt_bin):
    system, at, _ = system.partition("@")
    binary = alt_bin if at else BIN
    _, shape, connections = SYSTEMS[system]
    if shape is None:
        return {w: measure(w, PORTS["echo" if w.startswith("rtt") else "iperf"], duration, [])
                for w in WORKLOADS}
    client_shape, server_shape = (shape.split("/") * 2)[:2]
    row = {}
    for upstream, workloads in (("iperf", WORKLOADS[:3]), ("echo", WORKLOADS[3:])):
        procs = Procs(OUT)
        try:
            name = system.replace("/", "-") + ("-alt" if at else "")
            procs.start(f"{name}-{upstream}-server",
                        [binary, "server", "--shape", server_shape,
                         "--listen", f"127.0.0.1:{PORTS['tunnel']}",
                         "--upstream", f"127.0.0.1:{PORTS[upstream]}", "--cert-dir", OUT])
            wait_port(PORTS["tunnel"], logs=OUT)
            procs.start(f"{name}-{upstream}-client",
                        [binary, "client", "--shape", client_shape,
                         "--listen", f"127.0.0.1:{PORTS['visitor']}",
                         "--server", f"127.0.0.1:{PORTS['tunnel']}", "--cert-dir", OUT,
                         "--connections", str(connections)])
            wait_port(PORTS["visitor"], logs=OUT)
            pids = list(procs.pids.values())
            for w in workloads:
                row[w] = measure(w, PORTS["visitor"], duration, pids)
        finally:
            procs.stop()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5, help="seconds per run")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--alt-bin", help="the binary of `<system>@alt` systems")
    args = ap.parse_args()
    systems = args.systems.split(",")
    os.makedirs(OUT, exist_ok=True)
    build_crate("dataplane")
    upstreams = Procs(OUT)
    rounds = []
    try:
        upstreams.start("iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(PORTS["iperf"])])
        upstreams.start("echo", [BIN, "echo", "--listen", f"127.0.0.1:{PORTS['echo']}"])
        wait_port(PORTS["echo"], logs=OUT)
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            row = {s: run_system(s, args.duration, args.alt_bin) for s in order}
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", flush=True)
    finally:
        upstreams.stop()
    report(args, systems, rounds)


def report(args, systems, rounds):
    def med(system, workload, field):
        values = [r[system][workload][field] for r in rounds
                  if r[system][workload].get(field) is not None]
        return statistics.median(values) if values else None

    def fmt(v, spec):
        return "–" if v is None else format(v, spec)

    lines = [f"| system ({len(rounds)} rounds × {args.duration} s) | bulk 1 stream Gbit/s | "
             "8 streams | 1 stream reversed | CPU-s/GB (1 stream) | round trip p50 µs, "
             "1 conn | p99 | round trips/s, 64 conns | CPU µs per round trip (64) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    def label(s):
        name, at, _ = s.partition("@")
        return SYSTEMS[name][0] + (" (--alt-bin)" if at else "")

    for s in systems:
        lines.append(
            f"| {label(s)} | {fmt(med(s, 'bulk-1', 'gbps'), '.2f')} | "
            f"{fmt(med(s, 'bulk-8', 'gbps'), '.2f')} | {fmt(med(s, 'bulk-1r', 'gbps'), '.2f')} | "
            f"{fmt(med(s, 'bulk-1', 'cpu_s_per_gb'), '.2f')} | "
            f"{fmt(med(s, 'rtt-1', 'p50_us'), '.0f')} | {fmt(med(s, 'rtt-1', 'p99_us'), '.0f')} | "
            f"{fmt(med(s, 'rtt-64', 'round_trips_per_s'), ',.0f')} | "
            f"{fmt(med(s, 'rtt-64', 'cpu_us_per_trip'), '.1f')} |")
    ratios = {}
    if "tonic" in systems:
        lines += ["", "| ÷ tonic (1 connection), medians of per-round ratios | bulk 1 | "
                  "bulk 8 | bulk 1 reversed | round trips/s, 64 conns |", "|---|---:|---:|---:|---:|"]
        for s in systems:
            if s == "tonic":
                continue
            cells = []
            for w, field in (("bulk-1", "gbps"), ("bulk-8", "gbps"), ("bulk-1r", "gbps"),
                             ("rtt-64", "round_trips_per_s")):
                ratio = statistics.median(r[s][w][field] / r["tonic"][w][field] for r in rounds)
                ratios[f"{s} ÷ tonic, {w}"] = round(ratio, 3)
                cells.append(f"{ratio:.2f}")
            lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    with open(os.path.join(OUT, "result.json"), "w") as f:
        json.dump({"rounds": rounds, "ratios": ratios,
                   "load_average_at_end": os.getloadavg()}, f, indent=2)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
