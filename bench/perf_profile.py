"""Where a process's CPU time goes, from `perf record` samples of the CPU
clock (this VM has no hardware counters): µs per request by the crate of
the function each sample falls in, and how much falls just after an
atomic read-modify-write (a `lock`-prefixed instruction: where a
contended cache line is waited for). Used by `http_cost.py --perf`."""

import collections
import functools
import re
import signal
import subprocess

FREQ = 2999
# What the sampling and the reading of the samples run.
TOOLS = ("perf", "objdump", "readelf")

# (group, pattern on the `dso symbol` text of perf's report), first match wins.
GROUPS = [
    ("the kernel", r"\[k\]"),
    ("hyper", r"hyper::|hyper_util::"),
    ("h2", r"\bh2::"),
    ("tokio", r"\btokio::|\btokio_util::"),
    ("Postern's HTTP code (postern_ingress)", r"postern_ingress::"),
    ("Postern's tunnel code (postern_proto, postern_net)", r"postern_proto::|postern_net::"),
    ("Postern's edge and events (postern_edge, postern_events)",
     r"postern_edge::|postern_events::"),
    ("the allocator (mimalloc)", r"\bmi_|_mi_"),
    ("memcpy, memmove, memset, memcmp", r"memmove|memcpy|memset|memcmp"),
    ("http", r"\bhttp::"),
    ("rustls and ring", r"rustls::|\bring::|ring_core"),
    ("bytes, httparse, libc, futures, tracing, the rest", r""),
]


def record(pid, path):
    """Starts sampling `pid` into `path`; `stop` ends it."""
    return subprocess.Popen(["perf", "record", "-q", "-F", str(FREQ), "-p", str(pid),
                             "-o", path], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop(recorder):
    recorder.send_signal(signal.SIGINT)
    recorder.wait(timeout=60)


def _report(path):
    out = subprocess.run(["perf", "report", "-i", path, "--no-children", "--sort",
                          "dso,symbol", "--stdio", "-q"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(.*)", line)
        if m:
            yield float(m.group(1)), m.group(2)


@functools.lru_cache
def _after_lock(binary):
    """Addresses (in the file's layout) of the instruction after each
    `lock`-prefixed one in `binary`."""
    dump = subprocess.Popen(["objdump", "-d", "--no-show-raw-insn", binary],
                            stdout=subprocess.PIPE, text=True)
    after, prev_lock = set(), False
    for line in dump.stdout:
        m = re.match(r"\s*([0-9a-f]+):\s+(\S+)", line)
        if not m:
            continue
        if prev_lock:
            after.add(int(m.group(1), 16))
        prev_lock = m.group(2) == "lock"
    dump.wait()
    return after


def _load_offset(binary):
    """Virtual address minus file offset of `binary`'s executable segment."""
    out = subprocess.run(["readelf", "-lW", binary], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD" and "E" in f[6:-1]:
            return int(f[2], 16) - int(f[1], 16)
    raise SystemExit(f"{binary}: no executable segment")


def _sample_addresses(path, binary):
    """The addresses in `binary`'s layout of the samples that fall in it,
    and the number of samples in all (one pass over the recording: its
    mappings say where `binary` was loaded)."""
    lines = subprocess.run(["perf", "script", "-i", path, "--show-mmap-events", "-F",
                            "ip,dso"], capture_output=True, text=True).stdout.splitlines()
    base, ips = None, []
    for line in lines:
        if "PERF_RECORD_MMAP" in line:
            m = re.search(r"\[0x([0-9a-f]+)\([0-9a-fx]+\) @ 0x([0-9a-f]+) .*r-xp (\S+)", line)
            if base is None and m and m.group(3) == binary:
                base = int(m.group(1), 16) - int(m.group(2), 16)
        elif len(f := line.split(None, 1)) == 2:
            ips.append(f)
    if base is None:
        return [], len(ips)
    shift = _load_offset(binary)
    inside = [int(ip, 16) - base + shift for ip, dso in ips if binary in dso]
    return inside, len(ips)


def summarise(path, binary, requests):
    """µs per request by group, in all, and just after a `lock` op."""
    by_group = collections.Counter()
    for share, what in _report(path):
        group = next(g for g, pattern in GROUPS if re.search(pattern, what))
        by_group[group] += share
    inside, samples = _sample_addresses(path, binary)
    after = _after_lock(binary)
    locked = sum(1 for a in inside if a in after)
    per_request = samples / FREQ / requests * 1e6
    return {"us_per_request": round(per_request, 2),
            "by_group_us": {g: round(by_group[g] / 100 * per_request, 2)
                            for g, _ in GROUPS},
            "after_lock_share": round(locked / samples, 4) if samples else None,
            "after_lock_us": round(locked / FREQ / requests * 1e6, 2)}
