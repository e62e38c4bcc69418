"""One edge and one agent as release binaries on loopback, with a dev CA,
for single-question benchmarks (grpc_unary.py): their
configs, the processes, and waiting. Only the Python standard library."""

import os
import signal
import subprocess
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
# POSTERN_BIN_DIR: binaries built elsewhere (as bench/run.sh sets it).
BIN_DIR = os.environ.get("POSTERN_BIN_DIR", os.path.join(TARGET, "release"))


class OneEdge:
    """Writes configs and logs to `out`; `ports` has agent, http, https."""

    def __init__(self, out, node_id, ports, token):
        self.out, self.node_id, self.ports, self.token = out, node_id, ports, token
        self.procs = []
        self.ca = os.path.join(out, "edge-data", "dev-ca.pem")

    def write(self, name, text):
        path = os.path.join(self.out, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def start(self, name, argv):
        log = open(os.path.join(self.out, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))

    def wait_for(self, check, what, seconds=30):
        deadline = time.time() + seconds
        while time.time() < deadline:
            if check():
                return
            time.sleep(0.2)
        raise SystemExit(f"timed out waiting for {what}; logs in {self.out}")

    def start_edge_and_agent(self, tunnels, agent_extra=""):
        """The edge (waiting for its dev CA), then an agent serving
        `tunnels` (the YAML body of its `tunnels:` map)."""
        p = self.ports
        edge = self.write("edge.toml", f"""node_id = "{self.node_id}"
domain = "postern.localhost"
data_dir = "{self.out}/edge-data"
[listen]
agent = "127.0.0.1:{p['agent']}"
http = "127.0.0.1:{p['http']}"
https = "127.0.0.1:{p['https']}"
admin = ""
metrics = ""
[tls]
dev_ca = true
[[authtokens]]
token = "{self.token}"
""")
        agent = self.write("agent.yml", f"""version: "2"
authtoken: "{self.token}"
server_addr: "tunnel.us.connect.postern.localhost:{p['agent']}"
root_cas: "{self.ca}"
{agent_extra}tunnels:
{tunnels}""")
        self.start("edge", [os.path.join(BIN_DIR, "postern-edge"), "--config", edge])
        self.wait_for(lambda: os.path.exists(self.ca), "the edge's dev CA")
        self.start("agent", [os.path.join(BIN_DIR, "postern"), "start", "--all", "--config", agent])

    def stop(self):
        """SIGTERM to everything started, last first; SIGKILL after 10 s."""
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
