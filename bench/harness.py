#!/usr/bin/env python3
"""Postern benchmark harness (issue 7). Start it with bench/run.sh, which
installs the tools and builds the binaries first.

Everything runs on 127.0.0.1. For every round it starts nginx, iperf3, a
Postern edge with two agents (stream pool 8 and 0) and rathole in plain and
TLS mode afresh, measures RSS per idle proxied connection, then runs every
workload against every system, alternating systems (the order rotates from
round to round). After the rounds it measures the edge's memory per idle
agent session, the edge's behaviour at its file-descriptor limit, and takes
a CPU profile of the edge and agent. Raw results go to bench/out/, plots to
bench/plots/ and the summary into BENCHMARKS.md between the GENERATED
markers (prose outside them is kept).

Only the Python standard library is used.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time

from procs import write_between

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
OUT = os.path.join(BENCH, "out")
RUN = os.path.join(OUT, "run")
PLOTS = os.path.join(BENCH, "plots")
TOOLS = os.path.join(BENCH, ".tools")
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
# bench/run.sh copies the binaries it built to bench/out/bin (POSTERN_BIN_DIR).
BIN_DIR = os.environ.get("POSTERN_BIN_DIR", os.path.join(TARGET, "release"))
EDGE_BIN = os.path.join(BIN_DIR, "postern-edge")
AGENT_BIN = os.path.join(BIN_DIR, "postern")
LOADAGENT_BIN = os.path.join(BIN_DIR, "postern-loadagent")
# bench/run.sh --baseline=REV: a second Postern (edge + agent) built from REV,
# measured as one more system in the same run, for before/after numbers.
BASE_BIN_DIR = os.environ.get("POSTERN_BASELINE_BIN_DIR")
BASE_SOURCE = os.environ.get("POSTERN_BASELINE_SOURCE", "baseline")
BASE = ["postern-tcp-base"] if BASE_BIN_DIR else []
RATHOLE_BIN = os.path.join(TOOLS, "bin", "rathole")
BENCHMARKS_MD = os.path.join(REPO, "BENCHMARKS.md")

TOKEN = "bench-token-123"
DOMAIN = "postern.localhost"
HTTPS_NAME = "app.postern.localhost"
# The same upstream behind a 10-rule Traffic Policy (issue 28's cost row).
POLICY_NAME = "policy.postern.localhost"
BODY = b"x" * 100  # the upstream's response body: 100 bytes

# Ports: all ours are in 30000-32767, below the kernel's ephemeral range
# (32768-60999 here), so outgoing connections never take a port an
# endpoint wants to listen on.
P = dict(
    nginx=30080, nginx_tls=30443, iperf=30201,
    edge_agent=30444, edge_http=30081, edge_https=30445, edge_tcp="30100-30199",
    p_web=30101, p_iperf=30102, p_web0=30103,
    edge_agent_b=30450, edge_http_b=30084, edge_https_b=30451, edge_tcp_b="30500-30509",
    p_web_b=30501, p_iperf_b=30502,
    rh_ctl=30300, rh_web=30301, rh_iperf=30302,
    rht_ctl=30310, rht_web=30311, rht_iperf=30312,
    sess_agent=30446, sess_http=30082, sess_https=30447, sess_tcp_base=31000,
    fd_agent=30448, fd_http=30083, fd_https=30449, fd_tcp="30400-30409", fd_web=30401,
)

# name: (label, http port, iperf port, tls?, baseline)
SYSTEMS = {
    "direct": ("direct nginx", P["nginx"], P["iperf"], False, None),
    "postern-tcp": ("Postern TCP endpoint", P["p_web"], P["p_iperf"], False, "direct"),
    "postern-tcp-pool0": ("Postern TCP, stream pool 0", P["p_web0"], None, False, "direct"),
    "rathole": ("rathole plain TCP", P["rh_web"], P["rh_iperf"], False, "direct"),
    "rathole-tls": ("rathole TLS", P["rht_web"], P["rht_iperf"], False, "direct"),
    "direct-https": ("direct nginx HTTPS", P["nginx_tls"], None, True, None),
    "postern-https": ("Postern HTTPS endpoint", P["edge_https"], None, True, "direct-https"),
    # Its ratio and added p50 are to the HTTPS endpoint without the policy.
    "postern-https-policy": ("Postern HTTPS endpoint + 10-rule Traffic Policy (vs without)",
                             P["edge_https"], None, True, "postern-https"),
}
# The TLS name of each HTTPS system (SNI and Host).
TLS_NAME = {"postern-https-policy": POLICY_NAME}
if BASE:
    SYSTEMS["postern-tcp-base"] = (f"Postern TCP endpoint, before ({BASE_SOURCE})", P["p_web_b"],
                                   P["p_iperf_b"], False, "direct")
HTTP_SYSTEMS = ["direct", "postern-tcp"] + BASE + ["rathole", "rathole-tls", "direct-https",
                                                  "postern-https", "postern-https-policy"]
TCP_SYSTEMS = ["direct", "postern-tcp"] + BASE + ["rathole", "rathole-tls"]
# workload: (label, systems, metric, unit, higher is better)
WORKLOADS = {
    "ka": ("HTTP keep-alive, wrk -t2 -c64", HTTP_SYSTEMS, "rps", "req/s", True),
    "close": ("HTTP Connection: close, wrk -t2 -c64",
              HTTP_SYSTEMS[:2] + ["postern-tcp-pool0"] + HTTP_SYSTEMS[2:], "rps", "req/s", True),
    "lat": ("one connection, wrk -t1 -c1 --latency", HTTP_SYSTEMS, "p50_us", "µs p50", False),
    # Every request on a new connection, one at a time: the connection
    # set-up cost through the tunnel (where the stream pool matters).
    "close1": ("one connection at a time, Connection: close, wrk -t1 -c1 --latency",
               HTTP_SYSTEMS[:2] + ["postern-tcp-pool0"] + HTTP_SYSTEMS[2:], "p50_us", "µs p50",
               False),
    "bulk1": ("TCP bulk, iperf3 1 stream", TCP_SYSTEMS, "gbps", "Gbit/s", True),
    "bulk8": ("TCP bulk, iperf3 -P 8", TCP_SYSTEMS, "gbps", "Gbit/s", True),
}
LATENCY_WORKLOADS = ("lat", "close1")
RSS_SYSTEMS = ["postern-tcp"] + BASE + ["rathole", "rathole-tls"]
# The proxy's own processes, for CPU per request and RSS.
PROXY_PROCS = {
    "postern-tcp": ["edge", "agent"],
    "postern-tcp-pool0": ["edge", "agent0"],
    "postern-tcp-base": ["edge-base", "agent-base"],
    "postern-https": ["edge", "agent"],
    "postern-https-policy": ["edge", "agent"],
    "rathole": ["rathole-plain-server", "rathole-plain-client"],
    "rathole-tls": ["rathole-tls-server", "rathole-tls-client"],
}

TARGETS_TEXT = {
    "ka": "≥ 0.48 and ≥ 1.3 × rathole TLS",
    "close": "≥ 0.40",
    "bulk8": "≥ 0.40",
    "bulk1": "≥ 0.30",
    "lat": "added p50 ≤ 40 µs",
    "rss": "≤ 36 KB per proxied connection",
    "sessions": "10,000 idle agent sessions ≤ 1 GiB",
}
# Anchors from the issue (ratio to direct; added p50 µs; KB per connection).
ANCHORS = [
    ("rathole plain TCP (issue)", 0.48, 0.24, 38, 0.34, 0.51, 36),
    ("rathole TLS (issue)", 0.37, 0.016, 51, 0.20, 0.27, 69),
    ("bore (issue)", 0.46, 0.21, 37, 0.32, 0.48, 52),
]

ARGS = None


def log(msg):
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# --------------------------------------------------------------------------
# processes we start: tracked by PID, stopped by PID only


class Procs:
    def __init__(self):
        self.procs = {}
        self.pidfile = os.path.join(RUN, "pids")

    def _write(self):
        with open(self.pidfile, "w") as f:
            for p in self.procs.values():
                if p.poll() is None:
                    f.write(f"{p.pid} {os.path.basename(p.args[0])}\n")

    def start(self, name, argv, nofile=None, env=None, stdout_pipe=False):
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} already running")
        logf = open(os.path.join(RUN, f"{name}.log"), "ab")
        logf.write(f"\n=== {datetime.datetime.now().isoformat()} {' '.join(argv)}\n".encode())
        logf.flush()

        def pre():
            os.setsid()
            if nofile:
                # Raising the hard limit needs CAP_SYS_RESOURCE: stay under it.
                n = min(nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
                resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))

        full_env = dict(os.environ)
        full_env.setdefault("RUST_LOG", "warn")
        if env:
            full_env.update(env)
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else logf,
            stderr=logf,
            preexec_fn=pre,
            env=full_env,
            text=stdout_pipe,
        )
        p.logf = logf
        self.procs[name] = p
        self._write()
        return p

    def pid(self, name):
        return self.procs[name].pid

    def alive(self, name):
        return name in self.procs and self.procs[name].poll() is None

    def stop(self, name, timeout=8):
        p = self.procs.pop(name, None)
        if p is None:
            return
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        p.logf.close()
        self._write()

    def stop_all(self):
        for name in list(self.procs)[::-1]:
            self.stop(name)


PROCS = Procs()


# --------------------------------------------------------------------------
# /proc helpers: load, CPU time of our process tree, RSS


def proc_stat_ticks(with_steal=False):
    """Busy and total ticks of the whole machine (steal, time the hypervisor
    gave to other guests, counts as busy), and steal on its own."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts[:8]]
    total = sum(vals)
    idle = vals[3] + vals[4]
    if with_steal:
        return total - idle, total, vals[7]
    return total - idle, total


def busy_cores(seconds):
    b0, t0 = proc_stat_ticks()
    time.sleep(seconds)
    b1, t1 = proc_stat_ticks()
    return (b1 - b0) / max(1, t1 - t0) * os.cpu_count()


WAITED = {"s": 0.0}  # time spent waiting for quiet and re-measuring, against --wait-budget


def budget_left():
    return ARGS.wait_budget - WAITED["s"]


def gate(max_wait, what):
    """Waits (bounded, and within the run's --wait-budget) until at most
    --gate-threshold cores are busy; returns the load seen."""
    start = time.time()
    max_wait = max(0, min(max_wait, budget_left()))
    load = busy_cores(1.0 if max_wait > 30 else 0.5)
    first = load
    while load > ARGS.gate_threshold and time.time() - start < max_wait:
        log(f"  load gate ({what}): {load:.2f} cores busy, waiting")
        time.sleep(4)
        load = busy_cores(1.0)
    waited = time.time() - start
    if first > ARGS.gate_threshold:
        WAITED["s"] += waited
    return {"load_first": round(first, 2), "load": round(load, 2), "waited_s": round(waited, 1),
            "passed": load <= ARGS.gate_threshold}


def _descendants():
    me = os.getpid()
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rfind(")") + 2:].split()
        children.setdefault(int(rest[1]), []).append((int(d), int(rest[11]) + int(rest[12])))
    ticks = 0
    stack = [me]
    while stack:
        pid = stack.pop()
        for child, t in children.get(pid, []):
            ticks += t
            stack.append(child)
    return ticks


def cpu_snapshot():
    """Machine busy ticks and the CPU ticks our process tree used, for
    telling apart our load from someone else's during a measurement."""
    busy, total, steal = proc_stat_ticks(with_steal=True)
    hz = os.sysconf("SC_CLK_TCK")
    ru_c = resource.getrusage(resource.RUSAGE_CHILDREN)
    ru_s = resource.getrusage(resource.RUSAGE_SELF)
    ours = _descendants() + (ru_c.ru_utime + ru_c.ru_stime + ru_s.ru_utime + ru_s.ru_stime) * hz
    return {"busy": busy, "ours": ours, "steal": steal, "wall": time.time(), "hz": hz}


def steal_cores(a, b):
    wall = max(1e-3, b["wall"] - a["wall"])
    return round((b["steal"] - a["steal"]) / a["hz"] / wall, 2)


def foreign_cores(a, b):
    wall = max(1e-3, b["wall"] - a["wall"])
    other = (b["busy"] - a["busy"]) - (b["ours"] - a["ours"])
    return round(max(0.0, other / a["hz"] / wall), 2)


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rfind(")") + 2:].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def established_on_port(port):
    """Established TCP connections whose local port is `port` (the upstream's side)."""
    n = 0
    want = f":{port:04X}"
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    parts = line.split(None, 4)
                    if parts[1].endswith(want) and parts[3] == "01":
                        n += 1
        except OSError:
            pass
    return n


# --------------------------------------------------------------------------
# setup: certificates and config files


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def make_certs():
    d = os.path.join(RUN, "certs")
    os.makedirs(d, exist_ok=True)
    if os.path.exists(os.path.join(d, "server.p12")):
        return d
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh(["openssl", "req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem",
        "-days", "30", "-subj", "/CN=postern-bench-ca"])
    sh(["openssl", "req", *ec, "-keyout", f"{d}/server.key", "-out", f"{d}/server.csr",
        "-subj", f"/CN={HTTPS_NAME}"])
    with open(f"{d}/ext.cnf", "w") as f:
        f.write(f"subjectAltName=DNS:{HTTPS_NAME},DNS:localhost,IP:127.0.0.1\n")
    sh(["openssl", "x509", "-req", "-in", f"{d}/server.csr", "-CA", f"{d}/ca.pem",
        "-CAkey", f"{d}/ca.key", "-CAcreateserial", "-out", f"{d}/server.pem", "-days", "30",
        "-extfile", f"{d}/ext.cnf"])
    sh(["openssl", "pkcs12", "-export", "-out", f"{d}/server.p12", "-inkey", f"{d}/server.key",
        "-in", f"{d}/server.pem", "-certfile", f"{d}/ca.pem", "-passout", "pass:benchpass"])
    return d


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


# The same ten-rule policy as bench/http_cost.py, indented under a tunnel.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "policy-10-rules.yml")) as _f:
    POLICY_10_RULES = "\n".join("      " + line for line in _f.read().splitlines()
                                 if line and not line.startswith("#"))


def write_configs(certs):
    cfg = {}
    os.makedirs(os.path.join(RUN, "nginx-tmp"), exist_ok=True)
    body = BODY.decode()
    location = f'location / {{ default_type text/plain; return 200 "{body}"; }}'
    cfg["nginx"] = write(os.path.join(RUN, "nginx.conf"), f"""
daemon off;
master_process on;
user root;
worker_processes {ARGS.nginx_workers};
worker_rlimit_nofile 65536;
pid {RUN}/nginx.pid;
error_log {RUN}/nginx-error.log warn;
events {{ worker_connections 16384; multi_accept on; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path {RUN}/nginx-tmp;
    server {{
        listen 127.0.0.1:{P['nginx']} backlog=4096;
        {location}
    }}
    server {{
        listen 127.0.0.1:{P['nginx_tls']} ssl backlog=4096;
        server_name {HTTPS_NAME};
        ssl_certificate {certs}/server.pem;
        ssl_certificate_key {certs}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        {location}
    }}
}}
""")
    cfg["edge"] = write(os.path.join(RUN, "edge.toml"), edge_toml(
        "bench", P["edge_agent"], P["edge_http"], P["edge_https"], P["edge_tcp"], "edge-data"))
    ca = os.path.join(RUN, "edge-data", "dev-ca.pem")
    server = f"tunnel.us.connect.{DOMAIN}:{P['edge_agent']}"
    common = (f'version: "2"\nauthtoken: "{TOKEN}"\nserver_addr: "{server}"\n'
              f'root_cas: "{ca}"\n')
    cfg["agent"] = write(os.path.join(RUN, "agent.yml"), common + f"""stream_pool: {ARGS.stream_pool}
tunnels:
  web-tcp:
    proto: tcp
    addr: "127.0.0.1:{P['nginx']}"
    remote_addr: "127.0.0.1:{P['p_web']}"
  iperf-tcp:
    proto: tcp
    addr: "127.0.0.1:{P['iperf']}"
    remote_addr: "127.0.0.1:{P['p_iperf']}"
  web-https:
    proto: http
    addr: "127.0.0.1:{P['nginx']}"
    domain: "{HTTPS_NAME}"
  web-https-policy:
    proto: http
    addr: "127.0.0.1:{P['nginx']}"
    domain: "{POLICY_NAME}"
    traffic_policy:
{POLICY_10_RULES}
""")
    if BASE:
        cfg["edge-base"] = write(os.path.join(RUN, "edge-base.toml"), edge_toml(
            "bench-base", P["edge_agent_b"], P["edge_http_b"], P["edge_https_b"], P["edge_tcp_b"],
            "edge-base-data", metrics=False))
        ca_b = os.path.join(RUN, "edge-base-data", "dev-ca.pem")
        cfg["agent-base"] = write(os.path.join(RUN, "agent-base.yml"), f"""version: "2"
authtoken: "{TOKEN}"
server_addr: "tunnel.us.connect.{DOMAIN}:{P['edge_agent_b']}"
root_cas: "{ca_b}"
stream_pool: {ARGS.stream_pool}
tunnels:
  web-tcp:
    proto: tcp
    addr: "127.0.0.1:{P['nginx']}"
    remote_addr: "127.0.0.1:{P['p_web_b']}"
  iperf-tcp:
    proto: tcp
    addr: "127.0.0.1:{P['iperf']}"
    remote_addr: "127.0.0.1:{P['p_iperf_b']}"
""")
    cfg["agent0"] = write(os.path.join(RUN, "agent0.yml"), common + f"""stream_pool: 0
tunnels:
  web-tcp-pool0:
    proto: tcp
    addr: "127.0.0.1:{P['nginx']}"
    remote_addr: "127.0.0.1:{P['p_web0']}"
""")
    for kind, ctl, web, ip in (("plain", P["rh_ctl"], P["rh_web"], P["rh_iperf"]),
                               ("tls", P["rht_ctl"], P["rht_web"], P["rht_iperf"])):
        st = ct = ""
        if kind == "tls":
            st = (f'[server.transport]\ntype = "tls"\n[server.transport.tls]\n'
                  f'pkcs12 = "{certs}/server.p12"\npkcs12_password = "benchpass"\n')
            ct = (f'[client.transport]\ntype = "tls"\n[client.transport.tls]\n'
                  f'trusted_root = "{certs}/ca.pem"\nhostname = "localhost"\n')
        cfg[f"rathole-{kind}-server"] = write(os.path.join(RUN, f"rathole-{kind}-server.toml"), f"""
[server]
bind_addr = "127.0.0.1:{ctl}"
{st}
[server.services.web]
token = "{TOKEN}"
bind_addr = "127.0.0.1:{web}"
[server.services.iperf]
token = "{TOKEN}"
bind_addr = "127.0.0.1:{ip}"
""")
        cfg[f"rathole-{kind}-client"] = write(os.path.join(RUN, f"rathole-{kind}-client.toml"), f"""
[client]
remote_addr = "127.0.0.1:{ctl}"
{ct}
[client.services.web]
token = "{TOKEN}"
local_addr = "127.0.0.1:{P['nginx']}"
[client.services.iperf]
token = "{TOKEN}"
local_addr = "127.0.0.1:{P['iperf']}"
""")
    with open("/etc/hosts") as f:
        hosts = f.read()
    cfg["hosts"] = write(os.path.join(RUN, "hosts"),
                         hosts + f"\n127.0.0.1 {HTTPS_NAME}\n127.0.0.1 {POLICY_NAME}\n")
    return cfg


def edge_toml(node, agent, http, https, tcp_ports, data_dir, extra="", metrics=True):
    return f"""node_id = "{node}"
region = "us"
domain = "{DOMAIN}"
data_dir = "{os.path.join(RUN, data_dir)}"
drain_grace = "1s"
[listen]
agent = "127.0.0.1:{agent}"
http = "127.0.0.1:{http}"
https = "127.0.0.1:{https}"
admin = ""  # no admin API (its default port, 9090, is not ours)
{'metrics = ""  # nor /metrics (9100)' if metrics else ''}
[public]
tcp_host = "127.0.0.1"
https_port = {https}
[tcp]
bind_ip = "127.0.0.1"
ports = "{tcp_ports}"
[tls]
dev_ca = true
[limits]
sessions_per_token = 20000
stream_pool = 16
{extra}
[[authtokens]]
token = "{TOKEN}"
"""


# --------------------------------------------------------------------------
# readiness probes


def http_get(port, sni=None, timeout=2.0, host="bench"):
    """One GET / on a new connection; returns the status code or None."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if sni:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = ctx.wrap_socket(s, server_hostname=sni)
            host = sni
        s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        m = re.match(rb"HTTP/1\.[01] (\d+)", data)
        return int(m.group(1)) if m else None
    except (OSError, ssl.SSLError):
        return None


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}; see logs in {RUN}")


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------
# the systems


def start_systems(cfg):
    PROCS.start("nginx", ["nginx", "-p", RUN, "-c", cfg["nginx"], "-e", f"{RUN}/nginx-error.log"],
                nofile=65536)
    PROCS.start("iperf3", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(P["iperf"])])
    PROCS.start("edge", [EDGE_BIN, "--config", cfg["edge"]], nofile=65536)
    wait_for(lambda: http_get(P["nginx"]) == 200, 10, "nginx")
    wait_for(lambda: port_open(P["edge_agent"]), 15, "the edge")
    wait_for(lambda: os.path.exists(os.path.join(RUN, "edge-data", "dev-ca.pem")), 5, "dev CA")
    PROCS.start("agent", [AGENT_BIN, "start", "--all", "--config", cfg["agent"]], nofile=65536)
    PROCS.start("agent0", [AGENT_BIN, "start", "--all", "--config", cfg["agent0"]], nofile=65536)
    if BASE:
        PROCS.start("edge-base", [os.path.join(BASE_BIN_DIR, "postern-edge"), "--config",
                                  cfg["edge-base"]], nofile=65536)
        wait_for(lambda: port_open(P["edge_agent_b"]), 15, "the baseline edge")
        wait_for(lambda: os.path.exists(os.path.join(RUN, "edge-base-data", "dev-ca.pem")), 5,
                 "the baseline dev CA")
        PROCS.start("agent-base", [os.path.join(BASE_BIN_DIR, "postern"), "start", "--all",
                                   "--config", cfg["agent-base"]], nofile=65536)
    for kind in ("plain", "tls"):
        PROCS.start(f"rathole-{kind}-server",
                    [RATHOLE_BIN, "--server", cfg[f"rathole-{kind}-server"]], nofile=65536)
        PROCS.start(f"rathole-{kind}-client",
                    [RATHOLE_BIN, "--client", cfg[f"rathole-{kind}-client"]], nofile=65536)
    for name in ["postern-tcp", "postern-tcp-pool0"] + BASE + ["rathole", "rathole-tls",
                                                               "direct-https", "postern-https",
                                                               "postern-https-policy"]:
        _, port, _, tls, _ = SYSTEMS[name]
        sni = TLS_NAME.get(name, HTTPS_NAME) if tls else None
        wait_for(lambda: http_get(port, sni=sni) == 200, 30, name)
    wait_for(lambda: port_open(P["iperf"]), 5, "iperf3")


def system_pids(name):
    return PROXY_PROCS[name]


# --------------------------------------------------------------------------
# load generators


def _us(value, unit):
    return float(value) * {"us": 1, "ms": 1e3, "s": 1e6}[unit]


def run_wrk(system, threads, conns, duration, close=False, latency=False):
    _, port, _, tls, _ = SYSTEMS[system]
    url = f"https://{TLS_NAME.get(system, HTTPS_NAME)}:{port}/" if tls else f"http://127.0.0.1:{port}/"
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "5s"]
    if close:
        cmd += ["-H", "Connection: close"]
    if latency:
        cmd.append("--latency")
    cmd.append(url)
    if tls:
        # wrk takes SNI and Host from the URL and glibc does not resolve
        # *.localhost: give wrk (only) a private mount namespace whose
        # /etc/hosts has the name. The system's /etc/hosts is not touched.
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
               os.path.join(RUN, "hosts")] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = p.stdout
    res = {"cmd": " ".join(cmd[-8:]), "rc": p.returncode}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non2xx"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if m:
            res[f"p{pct}_us"] = round(_us(*m.groups()), 1)
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)", out)
    if m:
        res["avg_us"] = round(_us(*m.groups()), 1)
    if res["rps"] is None:
        res["error"] = (p.stderr or out)[-400:]
    return res


def run_iperf(system, streams, duration):
    port = SYSTEMS[system][2]
    cmd = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(duration), "-P", str(streams),
           "-J", "--connect-timeout", "5000"]
    res = {}
    for attempt in range(3):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
        try:
            j = json.loads(p.stdout)
        except json.JSONDecodeError:
            j = {"error": p.stdout[-300:] + p.stderr[-300:]}
        if "end" in j and "sum_received" in j["end"]:
            recv = j["end"]["sum_received"]
            res = {"gbps": round(recv["bits_per_second"] / 1e9, 3),
                   "retransmits": j["end"].get("sum_sent", {}).get("retransmits")}
            break
        res = {"gbps": None, "error": str(j.get("error"))[:300]}
        time.sleep(2)  # "the server is busy": let it finish the previous test
    return res


def run_one(workload, system):
    d = ARGS.duration
    if workload == "ka":
        return run_wrk(system, 2, 64, d)
    if workload == "close":
        return run_wrk(system, 2, 64, d, close=True)
    if workload == "lat":
        return run_wrk(system, 1, 1, d, latency=True)
    if workload == "close1":
        return run_wrk(system, 1, 1, d, close=True, latency=True)
    if workload == "bulk1":
        return run_iperf(system, 1, d)
    if workload == "bulk8":
        return run_iperf(system, 8, d)
    raise ValueError(workload)


# --------------------------------------------------------------------------
# RSS per idle proxied connection


def rss_per_conn(system, n):
    port = SYSTEMS[system][1]
    pids = [PROCS.pid(x) for x in system_pids(system)]
    up_before = established_on_port(P["nginx"])
    time.sleep(0.5)
    base_each = [rss_kb(p) for p in pids]
    base = sum(base_each)
    socks = []
    failed = 0
    for i in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            failed += 1
        if i % 100 == 99:
            time.sleep(0.05)
    # Every visitor connection must have reached the upstream through the tunnel.
    deadline = time.time() + 30
    while established_on_port(P["nginx"]) < up_before + len(socks) and time.time() < deadline:
        time.sleep(0.2)
    upstream = established_on_port(P["nginx"]) - up_before
    time.sleep(2)
    idle_each = [rss_kb(p) for p in pids]
    idle = sum(idle_each)
    # Now one request on each, then idle again (buffers that grew stay).
    req = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
    ok = 0
    for s in socks:
        try:
            s.sendall(req)
        except OSError:
            pass
    for s in socks:
        try:
            s.settimeout(5)
            data = b""
            while not (b"\r\n\r\n" in data and data.endswith(BODY)):
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            ok += data.startswith(b"HTTP/1.1 200")
        except OSError:
            pass
    time.sleep(2)
    used = sum(rss_kb(p) for p in pids)
    for s in socks:
        s.close()
    time.sleep(1)
    res = {
        "n": n, "connected": len(socks), "connect_failed": failed, "upstream_established": upstream,
        "responses_ok": ok, "rss_base_kb": base, "rss_idle_kb": idle, "rss_used_kb": used,
        "kb_per_conn_idle": round((idle - base) / max(1, len(socks)), 2),
        "kb_per_conn_used": round((used - base) / max(1, len(socks)), 2),
        # idle growth per connection of each process (edge/agent, server/client)
        "kb_per_conn_idle_each": {name: round((i - b) / max(1, len(socks)), 2) for name, b, i
                                  in zip(system_pids(system), base_each, idle_each)},
    }
    return res


# --------------------------------------------------------------------------
# the rounds


def measure(w, system, r):
    """One measurement, with the load before it, the proxy's CPU during it,
    and how much CPU other processes used meanwhile."""
    pre = gate(ARGS.run_gate_wait, f"{w}/{system}")
    pids = [PROCS.pid(x) for x in PROXY_PROCS.get(system, [])]
    cpu0 = sum(proc_cpu_s(p) for p in pids)
    a = cpu_snapshot()
    res = run_one(w, system)
    b = cpu_snapshot()
    if pids:
        cpu = sum(proc_cpu_s(p) for p in pids) - cpu0
        res["proxy_cpu_s"] = round(cpu, 3)
        if res.get("requests"):
            res["proxy_cpu_us_per_req"] = round(cpu * 1e6 / res["requests"], 1)
        if res.get("gbps"):
            res["proxy_cpu_s_per_gb"] = round(cpu / (res["gbps"] * ARGS.duration / 8), 3)
    res.update({"round": r + 1, "workload": w, "system": system,
                "load_before": pre["load"], "gate_waited_s": pre["waited_s"],
                "foreign_cores_during": foreign_cores(a, b),
                "steal_cores_during": steal_cores(a, b),
                "time": datetime.datetime.now().isoformat(timespec="seconds")})
    metric = WORKLOADS[w][2]
    extra = f" p99 {res.get('p99_us')} µs" if w in LATENCY_WORKLOADS else ""
    if "proxy_cpu_us_per_req" in res:
        extra += f", proxy CPU {res['proxy_cpu_us_per_req']} µs/req"
    if "proxy_cpu_s_per_gb" in res:
        extra += f", proxy CPU {res['proxy_cpu_s_per_gb']} s/GB"
    log(f"  {w:6} {system:18} {metric} {res.get(metric)}{extra}  "
        f"(errors {res.get('socket_errors', 0)}, non-2xx {res.get('non2xx', 0)}, "
        f"other load {res['foreign_cores_during']} cores, of it steal "
        f"{res['steal_cores_during']})")
    return res


def rounds(cfg, results, gates):
    workloads = [w for w in WORKLOADS if w in ARGS.workloads]
    for r in range(ARGS.rounds):
        g = gate(ARGS.gate_wait, f"round {r + 1}")
        g["round"] = r + 1
        gates.append(g)
        log(f"round {r + 1}/{ARGS.rounds}: load {g['load']} cores busy "
            f"(waited {g['waited_s']} s); starting the systems")
        start_systems(cfg)
        try:
            if "rss" in ARGS.workloads:
                order = RSS_SYSTEMS[r % 3:] + RSS_SYSTEMS[:r % 3]
                for system in order:
                    res = rss_per_conn(system, ARGS.rss_conns)
                    log(f"  rss {system}: {res['kb_per_conn_idle']} KB/conn idle "
                        f"{res['kb_per_conn_idle_each']}, "
                        f"{res['kb_per_conn_used']} KB/conn after one request "
                        f"({res['upstream_established']}/{res['n']} reached nginx)")
                    results.append({"round": r + 1, "workload": "rss", "system": system, **res})
            # warm-up: one short run per system and path
            for system in HTTP_SYSTEMS + ["postern-tcp-pool0"]:
                if system in ARGS.systems:
                    run_wrk(system, 2, 16, 1)
            for w in workloads:
                if w == "rss":
                    continue
                systems = [s for s in WORKLOADS[w][1] if s in ARGS.systems]
                k = r % len(systems)
                for system in systems[k:] + systems[:k]:
                    discarded = []
                    for attempt in range(ARGS.retries + 1):
                        res = measure(w, system, r)
                        if (res["foreign_cores_during"] <= ARGS.retry_threshold
                                or attempt == ARGS.retries or budget_left() <= 0):
                            break
                        WAITED["s"] += ARGS.duration + ARGS.pause
                        log(f"    {res['foreign_cores_during']} cores of other load during the "
                            "measurement: measuring again")
                        discarded.append({k: res.get(k) for k in (WORKLOADS[w][2], "p99_us",
                                                                  "foreign_cores_during")})
                        time.sleep(ARGS.pause)
                    if discarded:
                        res["discarded_noisy"] = discarded
                    results.append(res)
                    time.sleep(ARGS.pause)
        finally:
            PROCS.stop_all()


# --------------------------------------------------------------------------
# memory per idle agent session


def sessions_test(n, proto):
    d = f"sess-{proto}-{n}"
    shutil.rmtree(os.path.join(RUN, d), ignore_errors=True)
    hi = P["sess_tcp_base"] + (max(n, 1) if proto == "tcp" else 10) - 1
    path = write(os.path.join(RUN, f"{d}.toml"), edge_toml(
        "bench-sessions", P["sess_agent"], P["sess_http"], P["sess_https"],
        f"{P['sess_tcp_base']}-{hi}", d))
    PROCS.start("sess-edge", [EDGE_BIN, "--config", path], nofile=2 * n + 4096)
    res = {"sessions": n, "proto": proto}
    try:
        wait_for(lambda: port_open(P["sess_agent"]), 15, "the sessions edge")
        ca = os.path.join(RUN, d, "dev-ca.pem")
        wait_for(lambda: os.path.exists(ca), 5, "dev CA")
        time.sleep(1)
        edge = PROCS.pid("sess-edge")
        base = rss_kb(edge)
        base_fds = len(os.listdir(f"/proc/{edge}/fd"))
        t0 = time.time()
        la = PROCS.start("loadagent", [
            LOADAGENT_BIN, "--sessions", str(n),
            "--server-addr", f"tunnel.us.connect.{DOMAIN}:{P['sess_agent']}",
            "--root-cas", ca, "--authtoken", TOKEN, "--proto", proto,
            "--upstream", f"127.0.0.1:{P['nginx']}", "--tcp-port-base", str(P["sess_tcp_base"]),
            "--batch-timeout-secs", "30",
        ], nofile=2 * n + 4096, stdout_pipe=True)
        ready = None
        deadline = time.time() + 600
        while time.time() < deadline:
            line = la.stdout.readline()
            if not line:
                break
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev["event"] == "progress" and ev["started"] % max(1, n // 4) < 250:
                log(f"  sessions {proto}: {ev['online']}/{ev['started']} online after {ev['secs']} s")
            if ev["event"] == "ready":
                ready = ev
                break
        if ready is None:
            raise RuntimeError("the load agent did not report ready")
        res["online"] = ready["online"]
        res["ramp_s"] = round(time.time() - t0, 1)
        res["error_sample"] = ready.get("error", "")
        time.sleep(3)
        cpu0 = proc_cpu_s(edge)
        hold = 10
        time.sleep(hold)
        res["edge_idle_cpu_pct"] = round((proc_cpu_s(edge) - cpu0) / hold * 100, 2)
        res["edge_rss_base_kb"] = base
        res["edge_rss_kb"] = rss_kb(edge)
        res["edge_kb_per_session"] = round((res["edge_rss_kb"] - base) / max(1, res["online"]), 2)
        res["loadagent_rss_kb"] = rss_kb(la.pid)
        res["edge_fds"] = len(os.listdir(f"/proc/{edge}/fd"))
        # Each agent connection is one descriptor at the edge.
        res["connections_per_session"] = round((res["edge_fds"] - base_fds)
                                               / max(1, res["online"]), 2)
        res["projected_10k_mib"] = round((res["edge_rss_kb"] - base) / max(1, res["online"])
                                         * 10000 / 1024, 1)
        res["projected_10k_total_mib"] = round(
            (base + (res["edge_rss_kb"] - base) / max(1, res["online"]) * 10000) / 1024, 1)
    finally:
        PROCS.stop("loadagent")
        PROCS.stop("sess-edge")
    return res


# --------------------------------------------------------------------------
# behaviour at the file-descriptor limit


def fd_limit_test(cfg, limit, n):
    d = "fd-edge-data"
    shutil.rmtree(os.path.join(RUN, d), ignore_errors=True)
    path = write(os.path.join(RUN, "fd-edge.toml"), edge_toml(
        "bench-fd", P["fd_agent"], P["fd_http"], P["fd_https"], P["fd_tcp"], d))
    ca = os.path.join(RUN, d, "dev-ca.pem")
    agent_cfg = write(os.path.join(RUN, "fd-agent.yml"), f"""version: "2"
authtoken: "{TOKEN}"
server_addr: "tunnel.us.connect.{DOMAIN}:{P['fd_agent']}"
root_cas: "{ca}"
tunnels:
  web:
    proto: tcp
    addr: "127.0.0.1:{P['nginx']}"
    remote_addr: "127.0.0.1:{P['fd_web']}"
""")
    res = {"edge_nofile": limit, "visitor_conns": n}
    PROCS.start("nginx", ["nginx", "-p", RUN, "-c", cfg["nginx"], "-e", f"{RUN}/nginx-error.log"],
                nofile=65536)
    PROCS.start("fd-edge", [EDGE_BIN, "--config", path], nofile=limit)
    try:
        wait_for(lambda: port_open(P["fd_agent"]), 15, "the fd edge")
        wait_for(lambda: os.path.exists(ca), 5, "dev CA")
        PROCS.start("fd-agent", [AGENT_BIN, "start", "--all", "--config", agent_cfg], nofile=65536)
        wait_for(lambda: http_get(P["fd_web"]) == 200, 30, "the fd edge's endpoint")
        edge = PROCS.pid("fd-edge")
        res["edge_fds_idle"] = len(os.listdir(f"/proc/{edge}/fd"))
        up0 = established_on_port(P["nginx"])
        socks, failed = [], 0
        for _ in range(n):
            try:
                socks.append(socket.create_connection(("127.0.0.1", P["fd_web"]), timeout=3))
            except OSError:
                failed += 1
        time.sleep(3)
        res["client_connected"] = len(socks)
        res["client_connect_failed"] = failed
        res["edge_fds_loaded"] = len(os.listdir(f"/proc/{edge}/fd"))
        res["reached_upstream"] = established_on_port(P["nginx"]) - up0
        cpu0 = proc_cpu_s(edge)
        time.sleep(5)
        res["edge_cpu_pct_while_exhausted"] = round((proc_cpu_s(edge) - cpu0) / 5 * 100, 1)
        res["new_request_while_exhausted"] = http_get(P["fd_web"], timeout=3)
        # Do the accepted ones still work? One request on the first few.
        ok = 0
        for s in socks[:20]:
            try:
                s.settimeout(3)
                s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
                ok += s.recv(4096).startswith(b"HTTP/1.1 200")
            except OSError:
                pass
        res["first_20_held_conns_served"] = ok
        res["edge_alive_while_exhausted"] = PROCS.alive("fd-edge")
        t0 = time.time()
        for s in socks:
            s.close()
        recovered = None
        while time.time() - t0 < 30:
            if http_get(P["fd_web"], timeout=2) == 200:
                recovered = round(time.time() - t0, 2)
                break
            time.sleep(0.2)
        res["recovered_after_close_s"] = recovered
        after = run_wrk_port(P["fd_web"], 2, 32, 2)
        res["wrk_after_recovery_rps"] = after.get("rps")
        res["wrk_after_recovery_errors"] = after.get("socket_errors")
        res["edge_alive_after"] = PROCS.alive("fd-edge")
        res["edge_fds_after"] = len(os.listdir(f"/proc/{edge}/fd"))
        with open(os.path.join(RUN, "fd-edge.log"), errors="replace") as f:
            text = re.sub(r"\x1b\[[0-9;]*m", "", f.read())
        text = text.rsplit("\n=== ", 1)[-1]  # this run's part of the log
        res["edge_log_resource_warnings"] = text.count("for lack of resources")
        res["edge_log_lines"] = text.count("\n")
        warn = [ln for ln in text.splitlines() if "WARN" in ln or "ERROR" in ln]
        res["edge_log_sample"] = warn[:3]
    finally:
        PROCS.stop("fd-agent")
        PROCS.stop("fd-edge")
        PROCS.stop("nginx")
    return res


def run_wrk_port(port, threads, conns, duration):
    SYSTEMS["_tmp"] = ("tmp", port, None, False, None)
    try:
        return run_wrk("_tmp", threads, conns, duration)
    finally:
        del SYSTEMS["_tmp"]


# --------------------------------------------------------------------------
# CPU profile of the edge and agent during keep-alive through the TCP endpoint


PERF_CATEGORIES = [
    ("TLS/crypto (rustls, ring, AES-GCM)", r"ring|rustls|aes|gcm|ghash|gfmul|chacha|poly1305|sha"),
    ("HTTP/2 (h2)", r"\bh2::|<h2::"),
    ("hyper/tonic/prost/http", r"hyper|tonic|prost|http_body|tower"),
    ("tokio/mio", r"tokio|mio::"),
    ("allocator/memcpy (libc)", r"malloc|free|memcpy|memmove|realloc|_int_|memset|cfree|alloc::"),
    ("postern", r"postern"),
    ("bytes", r"bytes::"),
]


def perf_test(cfg):
    if not shutil.which("perf"):
        return {"error": "perf not installed"}
    start_systems(cfg)
    res = {}
    try:
        run_wrk("postern-tcp", 2, 16, 1)
        dur = max(4, ARGS.duration)
        wrk = subprocess.Popen(["wrk", "-t2", "-c64", f"-d{dur}s", f"http://127.0.0.1:{P['p_web']}/"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(1)
        recs = []
        for name in ("edge", "agent"):
            data = os.path.join(OUT, f"perf-{name}.data")
            recs.append((name, data, subprocess.Popen(
                ["perf", "record", "-e", "cpu-clock", "-g", "-F", "999", "-p",
                 str(PROCS.pid(name)), "-o", data, "--", "sleep", str(dur - 2)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
        for name, data, p in recs:
            _, err = p.communicate(timeout=dur + 60)
            if p.returncode != 0:
                res[name] = {"error": err[-300:]}
        out, _ = wrk.communicate(timeout=dur + 60)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        res["wrk_rps_under_perf"] = float(m.group(1)) if m else None
        for name, data, _ in recs:
            if name in res:
                continue
            res[name] = perf_summary(name, data)
    finally:
        PROCS.stop_all()
    return res


def perf_summary(name, data):
    p = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none",
                        "--sort", "dso,sym", "--percent-limit", "0.01"],
                       capture_output=True, text=True, timeout=300)
    with open(os.path.join(OUT, f"perf-{name}.txt"), "w") as f:
        f.write(p.stdout)
    rows = []
    for line in p.stdout.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$", line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4)))
    kernel = sum(r[0] for r in rows if r[2] == "k" or "kernel" in r[1])
    cats = {}
    for pct, dso, kind, sym in rows:
        if kind == "k" or "kernel" in dso:
            continue
        for cat, rx in PERF_CATEGORIES:
            if re.search(rx, sym):
                cats[cat] = cats.get(cat, 0) + pct
                break
        else:
            cats["other user"] = cats.get("other user", 0) + pct
    top = [{"pct": r[0], "where": "kernel" if r[2] == "k" else "user", "sym": short_sym(r[3])}
           for r in rows[:ARGS.perf_top]]
    top_kernel = [{"pct": r[0], "sym": r[3]} for r in rows if r[2] == "k"][:8]
    # Inclusive time per system call (with the kernel work it triggers: on
    # loopback a send also runs the receiver's TCP input and wake-up).
    p = subprocess.run(["perf", "report", "-i", data, "--stdio", "--children", "-g", "none",
                        "--sort", "sym", "--percent-limit", "0.3"],
                       capture_output=True, text=True, timeout=300)
    syscalls = {}
    for line in p.stdout.splitlines():
        m = re.match(r"^\s+([\d.]+)%\s+([\d.]+)%\s+\[k\]\s+__x64_sys_(\w+)", line)
        if m:
            syscalls[m.group(3)] = max(syscalls.get(m.group(3), 0), float(m.group(1)))
    return {"kernel_pct": round(kernel, 1), "user_pct": round(sum(r[0] for r in rows) - kernel, 1),
            "categories": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda x: -x[1])},
            "top": top, "top_kernel": top_kernel,
            "syscalls_inclusive": dict(sorted(syscalls.items(), key=lambda x: -x[1])[:8])}


def short_sym(sym):
    sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
    sym = re.sub(r"<([^<>]*) as ([^<>]*)>", r"<\1 as \2>", sym)
    return sym if len(sym) <= 110 else sym[:107] + "..."


# --------------------------------------------------------------------------
# summary, plots, BENCHMARKS.md


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(results):
    summary = {}
    for w, (label, systems, metric, unit, _) in WORKLOADS.items():
        for s in systems:
            vals = [r.get(metric) for r in results if r["workload"] == w and r["system"] == s]
            vals = [v for v in vals if v is not None]
            if not vals:
                continue
            e = {"median": med(vals), "min": min(vals), "max": max(vals), "n": len(vals),
                 "values": vals}
            for key in ("proxy_cpu_us_per_req", "proxy_cpu_s_per_gb"):
                cv = [r.get(key) for r in results if r["workload"] == w and r["system"] == s]
                if any(x is not None for x in cv):
                    e[key] = med(cv)
            if w in LATENCY_WORKLOADS:
                p99 = [r.get("p99_us") for r in results if r["workload"] == w and r["system"] == s]
                e["p99_median"] = med(p99)
                e["p99_values"] = p99
            summary[(w, s)] = e
    thr = getattr(ARGS, "retry_threshold", 0.3)

    def quiet(w, s, r):
        v = [x for x in results if x["workload"] == w and x["system"] == s and x["round"] == r
             and x.get(WORKLOADS[w][2]) is not None]
        return v[0] if v and v[0].get("foreign_cores_during", 0) <= thr else None

    for (w, s), e in summary.items():
        base = SYSTEMS[s][4]
        if base and (w, base) in summary:
            # Only rounds where neither this system's nor the baseline's
            # measurement saw more than `thr` cores of other load.
            pairs = [(quiet(w, s, r), quiet(w, base, r)) for r in range(1, ARGS.rounds + 1)]
            pairs = [(a, b) for a, b in pairs if a and b]
            m = WORKLOADS[w][2]
            if pairs and w in LATENCY_WORKLOADS:
                e["quiet_added_p50_us"] = round(med([a[m] - b[m] for a, b in pairs]), 1)
                e["quiet_n"] = len(pairs)
            elif pairs:
                e["quiet_ratio"] = round(med([a[m] / b[m] for a, b in pairs]), 3)
                e["quiet_n"] = len(pairs)
            b = summary[(w, base)]
            if w in LATENCY_WORKLOADS:
                e["added_p50_us"] = round(e["median"] - b["median"], 1)
                if e.get("p99_median") is not None and b.get("p99_median") is not None:
                    e["added_p99_us"] = round(e["p99_median"] - b["p99_median"], 1)
            elif b["median"]:
                e["ratio"] = round(e["median"] / b["median"], 3)
                # the spread of per-round ratios
                per = []
                for r in range(1, ARGS.rounds + 1):
                    sv = [x.get(WORKLOADS[w][2]) for x in results
                          if x["workload"] == w and x["system"] == s and x["round"] == r]
                    bv = [x.get(WORKLOADS[w][2]) for x in results
                          if x["workload"] == w and x["system"] == base and x["round"] == r]
                    if sv and bv and sv[0] and bv[0]:
                        per.append(sv[0] / bv[0])
                if per:
                    e["ratio_min"], e["ratio_max"] = round(min(per), 3), round(max(per), 3)
    for s in RSS_SYSTEMS:
        for key in ("kb_per_conn_idle", "kb_per_conn_used"):
            vals = [r[key] for r in results if r["workload"] == "rss" and r["system"] == s]
            if vals:
                summary[(f"rss:{key}", s)] = {"median": med(vals), "min": min(vals),
                                               "max": max(vals), "n": len(vals), "values": vals}
    return summary


def fmt(v, unit=""):
    if v is None:
        return "–"
    if unit == "req/s":
        return f"{v:,.0f}"
    if unit == "Gbit/s":
        return f"{v:.2f}"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return str(v)


def targets(summary, sessions):
    def g(w, s, k="ratio"):
        e = summary.get((w, s))
        return e.get(k) if e else None

    rows = []
    ka = g("ka", "postern-tcp")
    rt = g("ka", "rathole-tls")
    ok = None if ka is None else (ka >= 0.48 and (rt is None or ka >= 1.3 * rt))
    rows.append(("keep-alive req/s (TCP endpoint)", TARGETS_TEXT["ka"],
                 f"{fmt(ka)} (rathole TLS {fmt(rt)}; 1.3× = {fmt(rt * 1.3 if rt else None)})", ok))
    for w, name in (("close", "Connection: close req/s"), ("bulk8", "TCP bulk, 8 streams"),
                    ("bulk1", "TCP bulk, 1 stream")):
        v = g(w, "postern-tcp")
        lim = {"close": 0.40, "bulk8": 0.40, "bulk1": 0.30}[w]
        rows.append((name, TARGETS_TEXT[w], fmt(v), None if v is None else v >= lim))
    v = g("lat", "postern-tcp", "added_p50_us")
    rows.append(("added p50, one connection", TARGETS_TEXT["lat"],
                 f"{fmt(v)} µs" if v is not None else "–", None if v is None else v <= 40))
    e = summary.get(("rss:kb_per_conn_idle", "postern-tcp"))
    v = e["median"] if e else None
    rows.append(("RSS per idle proxied connection", TARGETS_TEXT["rss"],
                 f"{fmt(v)} KB" if v is not None else "–", None if v is None else v <= 36))
    big = [s for s in sessions if s.get("edge_kb_per_session") is not None]
    big = max(big, key=lambda s: s["online"]) if big else None
    if big:
        v = big["projected_10k_total_mib"]
        note = (f"{big['edge_rss_kb'] / 1024:.0f} MiB edge RSS with {big['online']:,} {big['proto']} "
                f"sessions ({big['edge_kb_per_session']:.1f} KB each)")
        if big["online"] < 10000:
            note += f"; 10,000 projected: {v:.0f} MiB"
        rows.append(("idle agent sessions", TARGETS_TEXT["sessions"], note, v <= 1024))
    else:
        rows.append(("idle agent sessions", TARGETS_TEXT["sessions"], "not measured", None))
    return rows


def write_plots(summary):
    if not shutil.which("gnuplot"):
        return []
    os.makedirs(PLOTS, exist_ok=True)
    pd = os.path.join(OUT, "plotdata")
    os.makedirs(pd, exist_ok=True)
    made = []
    colors = {"direct": "#555555", "postern-tcp": "#1f77b4", "postern-tcp-pool0": "#9ecae1",
              "postern-tcp-base": "#8c564b",
              "rathole": "#d62728", "rathole-tls": "#ff9896", "direct-https": "#999999",
              "postern-https": "#2ca02c", "postern-https-policy": "#98df8a"}

    def hist(fname, title, ylabel, rows, systems, valfn, log_y=False):
        data = os.path.join(pd, fname + ".dat")
        with open(data, "w") as f:
            for label, w in rows:
                cols = [f'"{label}"']
                for s in systems:
                    v = valfn(w, s)
                    cols += [f"{x:.4f}" if x is not None else "?" for x in (v or (None,) * 3)]
                f.write(" ".join(cols) + "\n")
        used = [s for s in systems if any(valfn(w, s) for _, w in rows)]
        idx = {s: i for i, s in enumerate(systems)}
        plots = []
        for s in used:
            i = idx[s]
            plots.append(f"'{data}' using {2 + 3 * i}:{3 + 3 * i}:{4 + 3 * i}:xtic(1) "
                         f"title '{SYSTEMS[s][0]}' lc rgb '{colors[s]}'")
        png = os.path.join(PLOTS, fname + ".png")
        script = f"""set terminal pngcairo size 1100,520 font 'DejaVu Sans,10'
set output '{png}'
set title "{title}"
set ylabel "{ylabel}"
set datafile missing "?"
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
{"set logscale y" + chr(10) + "set yrange [10:*]" if log_y else "set yrange [0:*]"}
set key {"outside right top" if log_y else "inside right top"} vertical opaque box
plot {', '.join(plots)}
"""
        sp = os.path.join(pd, fname + ".gp")
        write(sp, script)
        p = subprocess.run(["gnuplot", sp], capture_output=True, text=True)
        if p.returncode == 0:
            made.append(png)
        else:
            log(f"gnuplot {fname}: {p.stderr[-300:]}")

    def abs_val(w, s):
        e = summary.get((w, s))
        return (e["median"], e["min"], e["max"]) if e else None

    def ratio_val(w, s):
        e = summary.get((w, s))
        if not e or "ratio" not in e:
            return None
        return (e["ratio"], e.get("ratio_min", e["ratio"]), e.get("ratio_max", e["ratio"]))

    def p99_val(w, s):
        e = summary.get((w, s))
        if not e or not e.get("p99_values"):
            return None
        v = [x for x in e["p99_values"] if x is not None]
        return (e["p99_median"], min(v), max(v))

    every = ["direct", "postern-tcp", "postern-tcp-pool0"] + BASE + ["rathole", "rathole-tls",
                                                                     "direct-https", "postern-https"]
    n = ARGS.duration
    hist("requests", f"HTTP requests/s through each system (median, min–max of {ARGS.rounds} rounds, {n} s each)",
         "requests/s", [("keep-alive", "ka"), ("Connection: close", "close")], every, abs_val)
    hist("bulk", "TCP bulk throughput, iperf3 (median, min–max)", "Gbit/s",
         [("1 stream", "bulk1"), ("8 streams", "bulk8")], TCP_SYSTEMS, abs_val)
    def lat_val(key, s):
        w, which = key.split(":")
        return abs_val(w, s) if which == "p50" else p99_val(w, s)

    hist("latency", "Latency with one connection, wrk -t1 -c1 (median, min–max; log scale)", "µs",
         [("keep-alive p50", "lat:p50"), ("keep-alive p99", "lat:p99"),
          ("new conn. p50", "close1:p50"),
          ("new conn. p99", "close1:p99")],
         HTTP_SYSTEMS[:2] + ["postern-tcp-pool0"] + HTTP_SYSTEMS[2:], lat_val, log_y=True)
    hist("ratios", "Throughput as a ratio to the same load sent directly to nginx "
                   "(HTTPS endpoint: to nginx HTTPS)", "ratio to direct",
         [("keep-alive", "ka"), ("Connection: close", "close"), ("bulk 1 stream", "bulk1"),
          ("bulk 8 streams", "bulk8")],
         ["postern-tcp", "postern-tcp-pool0"] + BASE + ["rathole", "rathole-tls", "postern-https"],
         ratio_val)
    return made


def md_tables(summary, results, meta, sessions, fdres, perf, plots):
    L = []
    a = L.append
    a(f"_Generated by `bench/run.sh{' --quick' if ARGS.quick else ''}` on {meta['finished']}; "
      f"{ARGS.rounds} round(s), {ARGS.duration} s per measurement, systems alternating "
      f"(order rotated each round)._\n")
    a("### Machine and versions\n")
    for k, v in meta["machine"].items():
        a(f"- {k}: {v}")
    for k, v in meta["versions"].items():
        a(f"- {k}: `{v}`")
    a("")
    a("### Load seen\n")
    if getattr(ARGS, "nice", 0):
        a(f"- The harness and everything it started ran at nice {ARGS.nice}. (That only helps against "
          "processes in the same scheduling group; the 'other load' figures show how much it helped.)")
    a(f"- Round gate (busy cores, threshold {ARGS.gate_threshold}, sampled from /proc/stat): " +
      "; ".join(f"round {g['round']}: {g['load']} (waited {g['waited_s']} s)" for g in meta["gates"]))
    fc = [r["foreign_cores_during"] for r in results if "foreign_cores_during" in r]
    if fc:
        noisy = [r for r in results if r.get("foreign_cores_during", 0) > 0.25]
        a(f"- Other processes' CPU during measurements (machine busy minus our process tree): "
          f"median {med(fc):.2f} cores, max {max(fc):.2f}; {len(noisy)} of {len(fc)} "
          f"measurements saw more than 0.25 cores of other load"
          + (": " + ", ".join(f"{r['workload']}/{r['system']} r{r['round']} ({r['foreign_cores_during']})"
                              for r in noisy[:12]) if noisy else "") + ".")
        if "waited_for_quiet_s" in meta:
            a(f"- Time spent waiting for a quiet machine and re-measuring: {meta['waited_for_quiet_s']} s "
              f"(budget {getattr(ARGS, 'wait_budget', '?')} s); the whole run took {meta.get('elapsed_min')} min.")
        rep = [r for r in results if r.get("discarded_noisy")]
        if rep:
            a(f"- {len(rep)} measurement(s) were repeated (up to {getattr(ARGS, 'retries', 0)} times) "
              f"because other processes used more than {getattr(ARGS, 'retry_threshold', 0.3)} cores "
              "meanwhile; the table uses the last attempt, the discarded ones are in the raw JSON.")
        st = [r.get("steal_cores_during", 0) for r in results if "foreign_cores_during" in r]
        a(f"- Of that, steal (CPU the hypervisor gave to other guests): median {med(st):.2f} cores, "
          f"max {max(st):.2f}. Load inside the VM does not show what the host's other tenants do "
          f"beyond steal; the spread between rounds below is the honest noise figure.")
    a("")
    a("### Results\n")
    a("Medians over the rounds, min–max in brackets. Ratio: median ÷ median of the same load sent "
      "directly to nginx (for the HTTPS endpoint: to nginx serving HTTPS itself), with the range of "
      "the per-round ratios. Latency: added = system − direct.\n")
    a(f"The last column repeats the comparison using only the rounds in which neither the system's "
      f"nor the baseline's measurement saw more than {getattr(ARGS, 'retry_threshold', 0.3)} cores of "
      "other load (n = such rounds): the least disturbed evidence this run has.\n")
    a("| workload | system | median | min–max | ratio to direct (per-round range) | quiet rounds only |")
    a("|---|---|---:|---:|---|---|")
    for w, (label, systems, metric, unit, _) in WORKLOADS.items():
        for s in systems:
            e = summary.get((w, s))
            if not e:
                continue
            if w in LATENCY_WORKLOADS:
                p99 = [x for x in e.get("p99_values", []) if x is not None]
                val = f"p50 {e['median']:.0f} µs, p99 {e['p99_median']:.0f} µs"
                rng = (f"p50 {e['min']:.0f}–{e['max']:.0f}, p99 {min(p99):.0f}–{max(p99):.0f}"
                       if p99 else "")
                rat = (f"added p50 {e['added_p50_us']:+.0f} µs, p99 {e.get('added_p99_us', 0):+.0f} µs"
                       if "added_p50_us" in e else "(baseline)")
            else:
                val = f"{fmt(e['median'], unit)} {unit}"
                rng = f"{fmt(e['min'], unit)}–{fmt(e['max'], unit)}"
                rat = (f"**{e['ratio']:.2f}** ({e.get('ratio_min', 0):.2f}–{e.get('ratio_max', 0):.2f})"
                       if "ratio" in e else "(baseline)")
            if "quiet_ratio" in e:
                q = f"{e['quiet_ratio']:.2f} (n={e['quiet_n']})"
            elif "quiet_added_p50_us" in e:
                q = f"added p50 {e['quiet_added_p50_us']:+.0f} µs (n={e['quiet_n']})"
            else:
                q = "–" if SYSTEMS[s][4] else ""
            a(f"| {label} | {SYSTEMS[s][0]} | {val} | {rng} | {rat} | {q} |")
    for key, label in (("kb_per_conn_idle", f"RSS per idle proxied connection ({ARGS.rss_conns} connected, nothing sent)"),
                       ("kb_per_conn_used", "RSS per proxied connection after one request each")):
        for s in RSS_SYSTEMS:
            e = summary.get((f"rss:{key}", s))
            if e:
                who = "edge + agent" if s.startswith("postern") else "server + client"
                split = ""
                if key == "kb_per_conn_idle":
                    each = {}
                    for r in results:
                        if r["workload"] == "rss" and r["system"] == s:
                            for n, v in r.get("kb_per_conn_idle_each", {}).items():
                                each.setdefault(n, []).append(v)
                    split = ", ".join(f"{n} {med(v):.1f}" for n, v in each.items())
                a(f"| {label} | {SYSTEMS[s][0]} ({who}) | {e['median']:.1f} KB | "
                  f"{e['min']:.1f}–{e['max']:.1f} | {split} | |")
    a("")
    a("### Side by side with the issue's anchors\n")
    a("Ratio to direct (throughput), added p50 (µs), KB per idle proxied connection.\n")
    a("| system | keep-alive | Connection: close | added p50 | bulk 1 stream | bulk 8 streams | RSS/conn "
      "| added p50, new connection per request |")
    a("|---|---:|---:|---:|---:|---:|---:|---:|")

    def cell(w, s, k="ratio"):
        e = summary.get((w, s))
        v = e.get(k) if e else None
        return "–" if v is None else (f"{v:+.0f}" if k.startswith("added") else f"{v:.2f}")

    def rss_cell(e):
        return "–" if not e else f"{e['median']:.0f}"

    for s in ["postern-tcp", "postern-tcp-pool0"] + BASE + ["postern-https",
                                                            "postern-https-policy", "rathole",
                                                            "rathole-tls"]:
        e = summary.get(("rss:kb_per_conn_idle", s))
        a(f"| {SYSTEMS[s][0]} (this run) | {cell('ka', s)} | {cell('close', s)} | "
          f"{cell('lat', s, 'added_p50_us')} | {cell('bulk1', s)} | {cell('bulk8', s)} | "
          f"{rss_cell(e)} | {cell('close1', s, 'added_p50_us')} |")
    for name, ka, cl, p50, b1, b8, kb in ANCHORS:
        a(f"| {name} | {ka} | {cl} | +{p50} | {b1} | {b8} | {kb} | |")
    a("")
    a("### CPU the proxy itself used\n")
    a("utime+stime of the proxy's processes (Postern: edge + agent; rathole: server + client) over "
      "the measurement, divided by the requests served or the bytes moved; medians. Lower is "
      "better; on 2 cores shared with wrk and nginx this is what caps throughput.\n")
    a("| system | keep-alive µs/request | Connection: close µs/request | bulk 1 stream CPU-s/GB | "
      "bulk 8 streams CPU-s/GB |")
    a("|---|---:|---:|---:|---:|")

    def cpu_cell(w, s, k):
        e = summary.get((w, s))
        v = e.get(k) if e else None
        return "–" if v is None else (f"{v:.0f}" if k == "proxy_cpu_us_per_req" else f"{v:.2f}")

    for s in ["postern-tcp", "postern-tcp-pool0"] + BASE + ["postern-https",
                                                            "postern-https-policy", "rathole",
                                                            "rathole-tls"]:
        a(f"| {SYSTEMS[s][0]} | {cpu_cell('ka', s, 'proxy_cpu_us_per_req')} | "
          f"{cpu_cell('close', s, 'proxy_cpu_us_per_req')} | {cpu_cell('bulk1', s, 'proxy_cpu_s_per_gb')} | "
          f"{cpu_cell('bulk8', s, 'proxy_cpu_s_per_gb')} |")
    a("")
    a("### Targets (Postern TCP endpoint)\n")
    a("| target | goal | measured | met |")
    a("|---|---|---|---|")
    for name, goal, got, ok in targets(summary, sessions):
        a(f"| {name} | {goal} | {got} | {'yes' if ok else ('–' if ok is None else '**no**')} |")
    a("")
    if BASE:
        a(f"### Before and after: this build against {BASE_SOURCE}\n")
        a("The same TCP endpoint served by both builds, measured alternately in every round of "
          "this run. Throughput: after ÷ before (higher is better); latency and memory: after − "
          "before (lower is better). Per-round values in brackets.\n")
        a("| workload | before | after | change |")
        a("|---|---:|---:|---|")
        for w in WORKLOADS:
            new_e, old_e = summary.get((w, "postern-tcp")), summary.get((w, "postern-tcp-base"))
            if not (new_e and old_e):
                continue
            unit = WORKLOADS[w][3]
            rounds = list(zip(new_e["values"], old_e["values"]))
            if w in LATENCY_WORKLOADS:
                per = ", ".join(f"{n - o:+.0f}" for n, o in rounds)
                change = f"**{new_e['median'] - old_e['median']:+.0f} µs** ({per})"
            else:
                per = ", ".join(f"{n / o:.2f}" for n, o in rounds if o)
                change = f"**×{new_e['median'] / old_e['median']:.2f}** ({per})"
            a(f"| {WORKLOADS[w][0]} | {old_e['median']:,.{2 if unit == 'Gbit/s' else 0}f} {unit} | "
              f"{new_e['median']:,.{2 if unit == 'Gbit/s' else 0}f} {unit} | {change} |")
        for key, label in (("kb_per_conn_idle", "RSS per idle proxied connection"),
                           ("kb_per_conn_used", "RSS per proxied connection after one request")):
            new_e = summary.get((f"rss:{key}", "postern-tcp"))
            old_e = summary.get((f"rss:{key}", "postern-tcp-base"))
            if new_e and old_e:
                per = ", ".join(f"{n - o:+.1f}" for n, o in zip(new_e["values"], old_e["values"]))
                a(f"| {label} | {old_e['median']:.1f} KB | {new_e['median']:.1f} KB | "
                  f"**{new_e['median'] - old_e['median']:+.1f} KB** ({per}) |")
        for w, k, unit in (("ka", "proxy_cpu_us_per_req", "µs/request"),
                           ("bulk1", "proxy_cpu_s_per_gb", "CPU-s/GB"),
                           ("bulk8", "proxy_cpu_s_per_gb", "CPU-s/GB")):
            new_e, old_e = summary.get((w, "postern-tcp")), summary.get((w, "postern-tcp-base"))
            if new_e and old_e and new_e.get(k) and old_e.get(k):
                a(f"| edge + agent CPU, {WORKLOADS[w][0]} | {old_e[k]:.2f} {unit} | "
                  f"{new_e[k]:.2f} {unit} | ×{new_e[k] / old_e[k]:.2f} |")
        a("")
    pool = summary.get(("close", "postern-tcp"))
    pool0 = summary.get(("close", "postern-tcp-pool0"))
    if pool and pool0:
        a("### Parked streams vs open-on-request\n")
        a(f"The same TCP endpoint served by an agent with `--stream-pool {ARGS.stream_pool}` "
          "(streams opened ahead and parked at the edge) and by one with `--stream-pool 0` (the edge "
          "asks over the control stream and the agent opens a stream per visitor).\n")
        a("| | pool " + str(ARGS.stream_pool) + " | pool 0 | pool ÷ pool 0 |")
        a("|---|---:|---:|---:|")
        a(f"| Connection: close, wrk -t2 -c64 (req/s, median; min–max) | {fmt(pool['median'], 'req/s')} "
          f"({fmt(pool['min'], 'req/s')}–{fmt(pool['max'], 'req/s')}) | {fmt(pool0['median'], 'req/s')} "
          f"({fmt(pool0['min'], 'req/s')}–{fmt(pool0['max'], 'req/s')}) | "
          f"**{pool['median'] / pool0['median']:.2f}** |")
        if pool.get("proxy_cpu_us_per_req") and pool0.get("proxy_cpu_us_per_req"):
            a(f"| edge + agent CPU per request (µs) | {pool['proxy_cpu_us_per_req']:.0f} | "
              f"{pool0['proxy_cpu_us_per_req']:.0f} | "
              f"{pool['proxy_cpu_us_per_req'] / pool0['proxy_cpu_us_per_req']:.2f} |")
        c8, c0 = summary.get(("close1", "postern-tcp")), summary.get(("close1", "postern-tcp-pool0"))
        if c8 and c0:
            a(f"| new connection per request, one at a time: p50 / p99 (µs) | {c8['median']:.0f} / "
              f"{c8['p99_median']:.0f} | {c0['median']:.0f} / {c0['p99_median']:.0f} | "
              f"{c8['median'] / c0['median']:.2f} (p50) |")
        a("")
    if sessions:
        a("### Memory per idle agent session (edge)\n")
        a("`bench/loadagent` starts N agents in one process, each with the agent's default "
          "number of TLS/HTTP2 connections (one per core, at most four), `stream_pool: 0` and "
          "one tunnel; the edge is a fresh process per row. Connections per session are the "
          "edge's new file descriptors per session online.\n")
        a("| sessions | tunnel | online | connections per session | ramp-up | "
          "edge RSS before → after | per session | edge CPU while idle | load agent RSS |")
        a("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for s in sessions:
            if "edge_kb_per_session" not in s:
                a(f"| {s['sessions']:,} | {s['proto']} | failed: {s.get('error', '')} "
                  "| | | | | | |")
                continue
            a(f"| {s['sessions']:,} | {s['proto']} | {s['online']:,} | "
              f"{s.get('connections_per_session', '–')} | {s['ramp_s']} s | "
              f"{s['edge_rss_base_kb'] / 1024:.0f} → {s['edge_rss_kb'] / 1024:.0f} MiB | "
              f"{s['edge_kb_per_session']:.1f} KB | {s['edge_idle_cpu_pct']}% of a core | "
              f"{s['loadagent_rss_kb'] / 1024:.0f} MiB |")
        a("")
    if fdres:
        a("### At the file-descriptor limit\n")
        f = fdres
        if "error" in f:
            a(f"Failed: {f['error']}\n")
        else:
            yn = {True: "yes", False: "**no**", None: "–"}
            a(f"An edge started with `ulimit -n {f['edge_nofile']}`; {f['visitor_conns']} idle visitor "
              "connections opened at once to one of its TCP endpoints and held for 8 s, then closed.\n")
            a(f"- Edge file descriptors: {f['edge_fds_idle']} idle, {f['edge_fds_loaded']} with the "
              f"visitors held, {f['edge_fds_after']} after they closed.")
            a(f"- Visitor connects that succeeded at the client: {f['client_connected']} of "
              f"{f['visitor_conns']} (the kernel completes handshakes into the listen backlog); "
              f"reached nginx through the tunnel: {f['reached_upstream']}.")
            a(f"- Edge CPU while out of descriptors: {f['edge_cpu_pct_while_exhausted']}% of a core; "
              f"{f['edge_log_resource_warnings']} 'accept failed for lack of resources; backing off' "
              "warnings (the accept loop sleeps 10 ms, doubling to 1 s).")
            nr = f["new_request_while_exhausted"]
            a(f"- A new request while exhausted: "
              f"{'no answer within 3 s (waits in the backlog)' if nr is None else f'HTTP {nr}'}.")
            a(f"- Already-accepted visitors still served: {f['first_20_held_conns_served']} of the first 20.")
            a(f"- Edge alive throughout: {yn[f['edge_alive_while_exhausted'] and f['edge_alive_after']]}. "
              f"After the visitors closed, a new request succeeded after "
              f"{f['recovered_after_close_s']} s; then `wrk -t2 -c32 -d2s`: "
              f"{fmt(f['wrk_after_recovery_rps'], 'req/s')} req/s, {f['wrk_after_recovery_errors']} errors.")
            if f.get("edge_log_sample"):
                a("\nFirst warnings in the edge's log:\n")
                a("```")
                for ln in f["edge_log_sample"]:
                    a(ln)
                a("```")
        a("")
    if perf and "edge" in perf:
        a("### Where the time goes (perf, keep-alive through the TCP endpoint)\n")
        a(f"`perf record -e cpu-clock -g -F 999 -p <pid>` on the edge and the agent during "
          f"`wrk -t2 -c64` through the TCP endpoint ({fmt(perf.get('wrk_rps_under_perf'), 'req/s')} "
          "req/s under perf). Flat (self) time; reports in `bench/out/perf-*.txt`.\n")
        for name in ("edge", "agent"):
            p = perf.get(name, {})
            if "error" in p:
                a(f"- {name}: perf failed: {p['error']}")
                continue
            a(f"**{name}**: kernel {p['kernel_pct']}%, user {p['user_pct']}% — " +
              ", ".join(f"{k} {v}%" for k, v in p["categories"].items()) + ".")
            if p.get("syscalls_inclusive"):
                a("System calls, inclusive of the kernel work they trigger: " +
                  ", ".join(f"{k} {v}%" for k, v in p["syscalls_inclusive"].items()) + ".")
            a("")
            a("| % | where | symbol |")
            a("|---:|---|---|")
            for t in p["top"]:
                sym = t["sym"].replace("|", "\\|")
                a(f"| {t['pct']:.1f} | {t['where']} | `{sym}` |")
            a("")
    if plots:
        a("### Plots\n")
        for pth in plots:
            rel = os.path.relpath(pth, REPO)
            a(f"![{os.path.basename(pth)}]({rel})")
        a("")
    return "\n".join(L)


BEGIN = "<!-- BEGIN GENERATED by bench/harness.py: edits between these markers are overwritten -->"
END = "<!-- END GENERATED -->"

SKELETON = f"""# Postern benchmarks

How fast and how big Postern's data path is, against sending the same load
straight to the upstream and against rathole. Run it with `bench/run.sh`
(`--quick` for a smoke test). The section between the markers is written by
the harness; the rest is prose.

{BEGIN}
{END}
"""


def write_md(text):
    write_between(BENCHMARKS_MD, BEGIN, END, text, SKELETON)


def first_line(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        out = (p.stdout or "") + (p.stderr or "")
        return out.strip().splitlines()[0] if out.strip() else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def machine_meta():
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = f.readline().split()[1]
    git = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no", "--",
                            "proto", "edge-node", "ingress-gateway", "agent"],
                           capture_output=True, text=True).stdout.strip()
    return {
        "machine": {
            "nproc": os.cpu_count(),
            "kernel": platform.release(),
            "CPU": cpu,
            "memory": f"{int(mem) / 1024 / 1024:.1f} GiB",
            "note": "a shared VM: every process (load generator, proxies, upstream) runs on the same 2 vCPUs",
        },
        "versions": {
            "postern": f"{first_line([EDGE_BIN, '--version'])}, "
                       + os.environ.get("POSTERN_BENCH_SOURCE",
                                        f"git {git}{', with uncommitted changes' if dirty else ''}"),
            **({"postern baseline": f"{first_line([os.path.join(BASE_BIN_DIR, 'postern-edge'), '--version'])}, "
                                    f"{BASE_SOURCE}"} if BASE else {}),
            "rathole": "rathole " + re.sub(r"(?s).*Build Version:\s*(\S+).*", r"\1", subprocess.run(
                [RATHOLE_BIN, "--version"], capture_output=True, text=True).stdout).strip()
            + " (crates.io, default features: native-tls)",
            "nginx": first_line(["nginx", "-v"]) + f", {ARGS.nginx_workers} worker(s)",
            "wrk": first_line(["wrk", "-v"]),
            "iperf3": first_line(["iperf3", "--version"]),
            "rustc": first_line(["rustc", "--version"]),
        },
    }


def finish(meta, results, sessions, fdres, perf, stamp):
    summary = summarize(results)
    with open(os.path.join(OUT, f"results-{stamp}.csv"), "w") as f:
        keys = ["round", "workload", "system", "rps", "p50_us", "p99_us", "gbps", "kb_per_conn_idle",
                "kb_per_conn_used", "proxy_cpu_us_per_req", "proxy_cpu_s_per_gb", "socket_errors",
                "non2xx", "load_before", "foreign_cores_during", "steal_cores_during", "time"]
        f.write(",".join(keys) + "\n")
        for r in results:
            f.write(",".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + "\n")
    with open(os.path.join(OUT, f"summary-{stamp}.json"), "w") as f:
        json.dump({f"{w}|{s}": e for (w, s), e in summary.items()}, f, indent=1)
    plots = [] if ARGS.no_md else write_plots(summary)
    text = md_tables(summary, results, meta, sessions, fdres, perf, plots)
    with open(os.path.join(OUT, f"summary-{stamp}.md"), "w") as f:
        f.write(text + "\n")
    print("\n" + text)
    if not ARGS.no_md:
        write_md(text)
        log(f"wrote {BENCHMARKS_MD}")


def rerender(path):
    global ARGS
    with open(path) as f:
        raw = json.load(f)
    no_md = ARGS.no_md
    ARGS = argparse.Namespace(**raw["meta"]["args"])
    ARGS.no_md = no_md
    stamp = re.sub(r".*results-(.*)\.json$", r"\1", path)
    finish(raw["meta"], raw["results"], raw["sessions"], raw["fd_limit"], raw["perf"], stamp)


def main():
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 s runs, 1 round, small N (smoke test)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per wrk/iperf3 measurement")
    ap.add_argument("--workloads", default="rss,ka,close,lat,close1,bulk1,bulk8")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--rss-conns", type=int)
    ap.add_argument("--sessions", help="agent-session tests, e.g. tcp:1000,http:1000,http:10000; "
                                       "'none' to skip")
    ap.add_argument("--fd-limit", type=int, default=256, help="edge ulimit -n for the fd test (0: skip)")
    ap.add_argument("--fd-conns", type=int, default=400)
    ap.add_argument("--no-perf", action="store_true")
    ap.add_argument("--perf-top", type=int, default=15)
    ap.add_argument("--stream-pool", type=int, default=8, help="the main agent's stream pool")
    ap.add_argument("--nginx-workers", default="auto")
    ap.add_argument("--gate-threshold", type=float, default=0.5)
    ap.add_argument("--gate-wait", type=int, help="max seconds to wait for an idle machine per round")
    ap.add_argument("--run-gate-wait", type=int, help="... and before each measurement")
    ap.add_argument("--pause", type=float, default=1.0)
    ap.add_argument("--nice", type=int, default=-10,
                    help="scheduling priority for the harness and everything it starts (as root, "
                         "-10 makes background builds on a shared machine disturb less; 0: off)")
    ap.add_argument("--retry-threshold", type=float, default=0.3,
                    help="measure again when other processes used more cores than this meanwhile")
    ap.add_argument("--retries", type=int, help="at most this many times (default 2; quick 0)")
    ap.add_argument("--wait-budget", type=int,
                    help="total seconds the run may spend waiting for quiet and re-measuring "
                         "(default 900; quick 30)")
    ap.add_argument("--no-md", action="store_true", help="don't touch BENCHMARKS.md or bench/plots")
    ap.add_argument("--from-json", metavar="PATH",
                    help="don't measure: redo the summary, plots and BENCHMARKS.md from a raw results file")
    ARGS = ap.parse_args()
    if ARGS.from_json:
        return rerender(ARGS.from_json)
    q = ARGS.quick
    ARGS.rounds = ARGS.rounds or (1 if q else 3)
    ARGS.duration = ARGS.duration or (2 if q else 10)
    ARGS.rss_conns = ARGS.rss_conns or (200 if q else 1000)
    ARGS.gate_wait = ARGS.gate_wait if ARGS.gate_wait is not None else (10 if q else 300)
    ARGS.run_gate_wait = ARGS.run_gate_wait if ARGS.run_gate_wait is not None else (2 if q else 60)
    ARGS.retries = ARGS.retries if ARGS.retries is not None else (0 if q else 2)
    ARGS.wait_budget = ARGS.wait_budget if ARGS.wait_budget is not None else (30 if q else 900)
    ARGS.sessions = ARGS.sessions or ("tcp:100,http:200" if q else "tcp:1000,http:1000,http:10000")
    ARGS.workloads = ARGS.workloads.split(",")
    ARGS.systems = ARGS.systems.split(",")

    for b in (EDGE_BIN, AGENT_BIN, RATHOLE_BIN):
        if not os.path.exists(b):
            sys.exit(f"{b} is missing: run bench/run.sh, which builds and installs it")
    os.makedirs(RUN, exist_ok=True)
    if ARGS.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, ARGS.nice)  # inherited by all children
        except OSError as e:
            log(f"cannot set nice {ARGS.nice}: {e}; running at the default priority")
            ARGS.nice = 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def on_signal(signum, _frame):
        PROCS.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = machine_meta()
    meta["args"] = {k: v for k, v in vars(ARGS).items()}
    meta["started"] = datetime.datetime.now().isoformat(timespec="seconds")
    meta["gates"] = []
    for old in ("edge-data",):
        shutil.rmtree(os.path.join(RUN, old), ignore_errors=True)
    certs = make_certs()
    cfg = write_configs(certs)
    p = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && getent hosts "$1"',
                        cfg["hosts"], HTTPS_NAME], capture_output=True, text=True)
    if p.returncode != 0:
        log(f"unshare/mount for wrk's name lookup failed ({p.stderr.strip()}); skipping HTTPS systems")
        ARGS.systems = [s for s in ARGS.systems if not SYSTEMS[s][3]]
    results, sessions, fdres, perf = [], [], {}, {}
    raw_path = os.path.join(OUT, f"results-{stamp}.json")

    def save():
        meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        with open(raw_path, "w") as f:
            json.dump({"meta": meta, "results": results, "sessions": sessions, "fd_limit": fdres,
                       "perf": perf}, f, indent=1, default=str)

    t_start = time.time()
    try:
        rounds(cfg, results, meta["gates"])
        save()
        if ARGS.sessions != "none":
            PROCS.start("nginx", ["nginx", "-p", RUN, "-c", cfg["nginx"], "-e",
                                  f"{RUN}/nginx-error.log"], nofile=65536)
            try:
                for spec in ARGS.sessions.split(","):
                    proto, n = spec.split(":")
                    gate(ARGS.run_gate_wait, f"sessions {spec}")
                    log(f"agent sessions: {n} × {proto}")
                    try:
                        res = sessions_test(int(n), proto)
                    except Exception as e:  # record and go on
                        res = {"sessions": int(n), "proto": proto, "error": str(e)[:300]}
                    log(f"  {res}")
                    sessions.append(res)
            finally:
                PROCS.stop("nginx")
            save()
        if ARGS.fd_limit:
            log(f"fd limit: edge with ulimit -n {ARGS.fd_limit}, {ARGS.fd_conns} visitors")
            try:
                fdres.update(fd_limit_test(cfg, ARGS.fd_limit, ARGS.fd_conns))
            except Exception as e:
                fdres["error"] = str(e)[:300]
            log(f"  {fdres}")
            save()
        if not ARGS.no_perf:
            log("perf profile of edge and agent under keep-alive load")
            gate(ARGS.run_gate_wait, "perf")
            try:
                perf.update(perf_test(cfg))
            except Exception as e:
                perf["error"] = str(e)[:300]
            save()
    finally:
        PROCS.stop_all()
    meta["elapsed_min"] = round((time.time() - t_start) / 60, 1)
    meta["waited_for_quiet_s"] = round(WAITED["s"])
    save()
    finish(meta, results, sessions, fdres, perf, stamp)
    log(f"raw results: {raw_path}; took {meta['elapsed_min']} min")


if __name__ == "__main__":
    main()
