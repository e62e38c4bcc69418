"""What the small bench scripts share: the processes they start, and the
CPU time those use."""

import os
import signal
import subprocess

HOST_CLK = os.sysconf("SC_CLK_TCK")


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
