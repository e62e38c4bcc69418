"""What the bench scripts share: building a bench crate, the processes
they start, waiting for their ports, the CPU time those use, and writing
a generated part of BENCHMARKS.md."""

import os
import shutil
import signal
import socket
import subprocess
import time

HOST_CLK = os.sysconf("SC_CLK_TCK")
BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))


def build_crate(name):
    """Builds bench/<name> (a crate outside the workspace) in release, with
    the workspace's lock file and target directory so that shared
    dependencies are reused."""
    crate = os.path.join(BENCH, name)
    shutil.copy(os.path.join(REPO, "Cargo.lock"), crate)
    subprocess.run(["cargo", "build", "--release", "--manifest-path",
                    os.path.join(crate, "Cargo.toml")],
                   env=dict(os.environ, CARGO_TARGET_DIR=TARGET), check=True)


def write_between(path, begin, end, text, skeleton=""):
    """Replaces what lies between the lines `begin` and `end` of the file
    at `path` (`skeleton` when there is none yet) with `text`; the rest of
    the file is kept. Markers not found are added at the end."""
    doc = skeleton
    if os.path.exists(path):
        with open(path) as f:
            doc = f.read()
    if begin not in doc or end not in doc:
        doc = doc.rstrip() + "\n\n" + begin + "\n" + end + "\n"
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + "\n" + end + tail)


def wait_port(port, seconds=20, logs=None):
    """Returns once something accepts on 127.0.0.1:`port`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {seconds} s"
                     + (f"; logs in {logs}" if logs else ""))


def cpu_seconds(pid):
    """User plus system CPU seconds `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HOST_CLK


class Procs:
    """Processes started by name, each logging to `<out>/<name>.log`."""

    def __init__(self, out):
        self.out, self.started, self.pids = out, [], {}

    def start(self, name, argv, env=None):
        log = open(os.path.join(self.out, f"{name}.log"), "w")
        self.started.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                             env=env))
        self.pids[name] = self.started[-1].pid

    def stop(self):
        """SIGTERM to all, the last started first; SIGKILL after 10 s."""
        for p in reversed(self.started):
            p.send_signal(signal.SIGTERM)
        for p in self.started:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
