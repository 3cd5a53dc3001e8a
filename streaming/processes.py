"""Child-process helpers shared by the launchers of local servers (Prometheus, brokers)."""

from __future__ import annotations

import subprocess


def stop_process(process: subprocess.Popen | None, timeout_s: float = 5.0) -> None:
    """Terminate ``process`` and wait for it, killing it if it outlives ``timeout_s``.

    Args:
        process: The child to stop; ``None`` or an already finished one is left alone.
        timeout_s: Seconds to wait after SIGTERM before SIGKILL.

    >>> import sys
    >>> child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    >>> stop_process(child)
    >>> child.returncode is not None
    True
    """
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
