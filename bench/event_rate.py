#!/usr/bin/env python3
"""How many events per second one node's event pipeline delivers into Kafka (issue 20).

Starts a tansu broker (POSTERN_TEST_TANSU, as the tests use; in memory) and
bench/eventrate, which runs the edge's own event pipeline with one Kafka
subscription and publishes events shaped like the edge's for a plain GET,
at each offered rate in turn (and as fast as one thread can, `max`),
waiting for the spool to empty between steps. The broker shares the
machine's cores with the pipeline, as it does in bench/http_cost.py.

A rate is sustained when every event offered was accepted and delivered
within the step (the spool did not grow: what is left at its end is at
most a tenth of a second's worth, the batching delay).

Usage: bench/event_rate.py [--rates 25000,50000,100000,200000,max] [--seconds 10]
Builds bench/eventrate (release, CARGO_TARGET_DIR or <repo>/target) unless
POSTERN_EVENTRATE_BIN names the binary. Writes bench/out/event-rate/result.json
and prints a Markdown table."""

import argparse
import json
import os
import shutil
import subprocess

from procs import TARGET, Procs, build_crate, cpu_seconds, wait_port

BENCH = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(BENCH, "out", "event-rate")
KAFKA_PORT = 30875


def binary():
    if os.environ.get("POSTERN_EVENTRATE_BIN"):
        return os.environ["POSTERN_EVENTRATE_BIN"]
    build_crate("eventrate")
    return os.path.join(TARGET, "release", "postern-eventrate")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="25000,50000,100000,200000,max")
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    tansu = os.environ.get("POSTERN_TEST_TANSU")
    if not tansu:
        raise SystemExit("POSTERN_TEST_TANSU must name the tansu binary (see scripts/test.sh)")
    eventrate = binary()
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    procs = Procs(OUT)
    try:
        procs.start("tansu", [tansu, "broker", "--listener-url",
                              f"tcp://127.0.0.1:{KAFKA_PORT}", "--advertised-listener-url",
                              f"tcp://127.0.0.1:{KAFKA_PORT}", "--storage-engine",
                              "memory://tansu/"])
        wait_port(KAFKA_PORT, seconds=30, logs=OUT)
        with open("/proc/loadavg") as f:
            load_before = f.read().split()[0]
        tansu_cpu = cpu_seconds(procs.pids["tansu"])
        run = subprocess.run([eventrate, "--brokers", f"127.0.0.1:{KAFKA_PORT}", "--data-dir",
                              os.path.join(OUT, "data"), "--rates", args.rates,
                              "--seconds", str(args.seconds)],
                             check=True, capture_output=True, text=True)
        tansu_cpu = cpu_seconds(procs.pids["tansu"]) - tansu_cpu
    finally:
        procs.stop()
    steps = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    for s in steps:
        s["sustained"] = (s["dropped"] == 0 and s["failed"] == 0
                          and s["accepted_per_s"] >= s["offered_per_s"]
                          and s["spool_at_end"] <= s["offered_per_s"] / 10)
    result = dict(load_before=load_before, tansu_cpu_seconds=tansu_cpu, steps=steps)
    with open(os.path.join(OUT, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"load average before: {load_before}; tansu used {tansu_cpu:.1f} CPU seconds in all\n")
    print("| offered (events/s) | accepted/s | delivered/s in the step | dropped | "
          "spool at the step's end | drained after | sustained |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for s in steps:
        print(f"| {s['rate']} | {s['accepted_per_s']:,.0f} | {s['delivered_per_s']:,.0f} | "
              f"{s['dropped']:,} | {s['spool_at_end']:,} | {s['drain_seconds']:.1f} s | "
              f"{'yes' if s['sustained'] else 'no'} |")
    best = max((s["offered_per_s"] for s in steps if s["sustained"] and s["rate"] != "max"),
               default=0)
    print(f"\nhighest offered rate sustained: {best:,.0f} events/s")


if __name__ == "__main__":
    main()
