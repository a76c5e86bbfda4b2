"""Run a command for at most a budget of seconds, children included; its output line by line to
stdout and to a log file (what was printed survives a stop).

    python bench/_budget.py SECONDS LOG -- COMMAND...

The command starts a process group of its own; at the budget the whole group gets SIGTERM
(evaluate.py's ranks and scoring workers too: ``timeout --foreground`` signals the child alone
and leaves its children running), then SIGKILL 20 s later. Whatever the group still holds when
the command ends is killed too. Exit status: the command's, or 124 when it was stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

GRACE_S = 20


def _kill_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__.strip().splitlines()[3].strip(), file=sys.stderr)
        return 2
    budget, log, command = float(argv[0]), argv[1], argv[3:]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        print(f"\n_budget.py: {budget:.0f} s reached, stopping the process group", flush=True)
        _kill_group(proc.pid, signal.SIGTERM)
        if not finished.wait(GRACE_S):
            _kill_group(proc.pid, signal.SIGKILL)

    finished = threading.Event()
    timer = threading.Timer(budget, stop)
    timer.daemon = True
    timer.start()
    with open(log, "ab") as f:
        for line in iter(proc.stdout.readline, b""):
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            f.write(line)
            f.flush()
    code = proc.wait()
    finished.set()
    timer.cancel()
    _kill_group(proc.pid, signal.SIGKILL)  # what the command left behind
    return 124 if stopped.is_set() else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
