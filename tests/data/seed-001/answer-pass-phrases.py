"""Runs a command on a pseudo-terminal and types a pass phrase at every
OpenSSL "pass phrase" prompt, as a user following seed 001 does.

usage: answer-pass-phrases.py PASS_PHRASE COMMAND [ARG...]
Exits with the command's status; prints what the command printed.
"""
import os
import pty
import sys


def main() -> int:
    phrase = sys.argv[1].encode() + b"\n"
    pid, fd = pty.fork()
    if pid == 0:
        os.execvp(sys.argv[2], sys.argv[2:])
    pending = b""
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        sys.stdout.buffer.write(data)
        pending += data
        # A prompt ends with "pass phrase...:" and no newline after it.
        line = pending.rsplit(b"\n", 1)[-1]
        if b"pass phrase" in line.lower() and line.rstrip().endswith(b":"):
            os.write(fd, phrase)
            pending = b""
    _, status = os.waitpid(pid, 0)
    sys.stdout.flush()
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
