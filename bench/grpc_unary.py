#!/usr/bin/env python3
"""Unary gRPC calls per second through an HTTPS endpoint vs direct (issue 29).

One edge and one agent publish the gRPC test server (tests/grpc/server.py,
grpcio, h2c) twice with upstream_protocol http2: as grpc.postern.localhost
with inspect off and as inspect.postern.localhost with the agent's inspector
on. A grpcio client (the asyncio API, one channel, --concurrency calls in
flight) calls /echo.Echo/Unary directly, through the plain endpoint and
through the inspected one, in rotating order, round after round, in the same
run; it also measures the p50 of one call at a time. The report is the
ratio of calls/s (through ÷ direct, median of the rounds) and the added p50,
never absolute speed.

The client and server are Python, so "direct" is bounded by grpcio's
per-call cost in Python on the same cores; the ratio shows what the tunnel
adds on top of that, not what it would cost a faster client.

Usage: bench/grpc_unary.py [--rounds N] [--duration SECONDS] [--concurrency N]
Needs release builds of postern-edge and postern (cargo build --release
--bin postern-edge --bin postern; POSTERN_BIN_DIR names another directory of
them; see one_edge.py) and a Python with grpcio (POSTERN_TEST_PYTHON, else the test venv
.venv-svc that scripts/test.sh creates). Writes
bench/out/grpc-unary/result.json and prints a Markdown table."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from one_edge import BIN_DIR, OneEdge

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out", "grpc-unary")
PORTS = dict(grpc=30990, agent=30991, http=30992, https=30993)
NAMES = {"tunnel": "grpc.postern.localhost", "inspected": "inspect.postern.localhost"}
SYSTEMS = ["direct", "tunnel", "inspected"]
TOKEN = "grpc-unary-bench"


def load(target, name, ca, concurrency, duration):
    """The load client (run with --load, in a Python with grpcio): calls/s
    with `concurrency` calls in flight, then the p50 of one call at a time,
    as one JSON line."""
    import asyncio

    import grpc

    async def run():
        if ca == "-":
            channel = grpc.aio.insecure_channel(target)
        else:
            with open(ca, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            options = [("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)]
            channel = grpc.aio.secure_channel(target, credentials, options=options)
        unary = channel.unary_unary("/echo.Echo/Unary")
        assert await unary(b"hi", timeout=10) == b"unary:hi"
        calls = 0
        end = time.monotonic() + duration

        async def worker():
            nonlocal calls
            while time.monotonic() < end:
                await unary(b"hi", timeout=10)
                calls += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rate = calls / (time.monotonic() - start)
        latencies = []
        end = time.monotonic() + min(duration, 5)
        while time.monotonic() < end:
            t = time.perf_counter()
            await unary(b"hi", timeout=10)
            latencies.append((time.perf_counter() - t) * 1e6)
        await channel.close()
        return {"calls_per_s": rate, "p50_us": statistics.median(latencies)}

    print(json.dumps(asyncio.run(run())), flush=True)


def python():
    return os.environ.get("POSTERN_TEST_PYTHON", os.path.join(REPO, ".venv-svc", "bin", "python"))


def measure(system, concurrency, duration, edge_ca):
    """One run of the load client against `system`."""
    if system == "direct":
        target, name, ca = f"127.0.0.1:{PORTS['grpc']}", "-", "-"
    else:
        target, name, ca = f"127.0.0.1:{PORTS['https']}", NAMES[system], edge_ca
    argv = [python(), os.path.abspath(__file__), "--load", target, name, ca,
            str(concurrency), str(duration)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise SystemExit(f"the load client failed against {system}:\n{out.stderr}")
    return json.loads(out.stdout)


def main():
    if sys.argv[1:2] == ["--load"]:
        target, name, ca, concurrency, duration = sys.argv[2:7]
        load(target, name, ca, int(concurrency), float(duration))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    run = OneEdge(OUT, "grpc-unary", PORTS, TOKEN)
    tunnels = f"""  tunnel:
    proto: http
    addr: "127.0.0.1:{PORTS['grpc']}"
    domain: "{NAMES['tunnel']}"
    upstream_protocol: http2
    inspect: false
  inspected:
    proto: http
    addr: "127.0.0.1:{PORTS['grpc']}"
    domain: "{NAMES['inspected']}"
    upstream_protocol: http2
"""

    def answers(system):
        try:
            measure(system, 1, 0.1, run.ca)
            return True
        except SystemExit:
            return False

    try:
        run.start("grpc-server", [python(), os.path.join(REPO, "tests", "grpc", "server.py"),
                                  str(PORTS["grpc"])])
        run.start_edge_and_agent(tunnels, 'web_addr: "127.0.0.1:0"\n')
        for system in SYSTEMS:
            run.wait_for(lambda system=system: answers(system), f"{system} answering", 60)
        rounds = []
        for r in range(args.rounds):
            order = SYSTEMS[r % 3:] + SYSTEMS[:r % 3]
            row = {s: measure(s, args.concurrency, args.duration, run.ca) for s in order}
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", flush=True)
    finally:
        run.stop()
    med = lambda s, k: statistics.median(r[s][k] for r in rounds)  # noqa: E731
    ratio = {s: statistics.median(r[s]["calls_per_s"] / r["direct"]["calls_per_s"] for r in rounds)
             for s in NAMES}
    added = {s: statistics.median(r[s]["p50_us"] - r["direct"]["p50_us"] for r in rounds)
             for s in NAMES}
    result = {
        "rounds": rounds,
        "ratio": {s: round(v, 3) for s, v in ratio.items()},
        "added_p50_us": {s: round(v, 1) for s, v in added.items()},
        "bin_dir": BIN_DIR,
        "load_average_at_end": os.getloadavg(),
    }
    run.write("result.json", json.dumps(result, indent=2))
    print(f"""
| unary gRPC, {args.rounds} rounds × {args.duration} s | direct | HTTPS endpoint | with the inspector |
|---|---:|---:|---:|
| calls/s ({args.concurrency} in flight), median | {med('direct', 'calls_per_s'):.0f} | {med('tunnel', 'calls_per_s'):.0f} (ratio {ratio['tunnel']:.3f}) | {med('inspected', 'calls_per_s'):.0f} (ratio {ratio['inspected']:.3f}) |
| one call at a time, p50 µs, median | {med('direct', 'p50_us'):.0f} | {med('tunnel', 'p50_us'):.0f} ({added['tunnel']:+.0f}) | {med('inspected', 'p50_us'):.0f} ({added['inspected']:+.0f}) |""")


if __name__ == "__main__":
    main()
