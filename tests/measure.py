"""Run a command and measure it the way a busy machine cannot distort: its own CPU time and peak memory."""

import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass


@dataclass
class Measured:
    returncode: int
    stdout: str
    stderr: str
    cpu_s: float  # the child's user + system CPU time
    rss_mib: float  # the child's peak resident memory


def run_measured(cmd: list[str], timeout: float = 300, **kwargs) -> Measured:
    """``cmd`` to completion, reaped with ``os.wait4`` for its resource usage; killed after ``timeout`` s."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kwargs)
        killer = threading.Timer(timeout, proc.kill)  # only against a hang
        killer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            killer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, out.read(), err.read(), usage.ru_utime + usage.ru_stime,
                        usage.ru_maxrss / 1024)
