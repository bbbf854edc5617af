"""A run owns its output folder: one run of a notebook at a time per ``OUTPUT_DIR``.

``fcntl.flock`` on a file kept open for the run's life: the OS releases it however the
process ends, so a killed run never blocks the next (a pid file would).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .devices import worker_run_dir
from .errors import OutputDirInUse, ParameterError

#: lock file -> its open descriptor, kept open (so locked) until this process ends.
_HELD: dict[Path, int] = {}


def lock_path(output_dir, notebook) -> Path:
    """``OUTPUT_DIR/.locks/<notebook stem>/run.lock`` (in ``worker-<index>/`` if not chief)."""
    return worker_run_dir(Path(output_dir) / ".locks" / Path(notebook).stem) / "run.lock"


def own_output_dir(output_dir, notebook) -> Path:
    """Lock ``output_dir`` (created if missing) for this process's run of ``notebook``; idempotent.

    Returns:
        The lock file's resolved absolute path.

    Raises:
        OutputDirInUse: another live process holds it; names its pid, host, start and notebook.
        ParameterError: the folder cannot be created or written.
    """
    path = lock_path(output_dir, notebook).resolve()  # one key for every spelling of it
    if path in _HELD:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # never inherited by child programs
    except OSError as exc:
        raise ParameterError(
            f"OUTPUT_DIR = {str(output_dir)!r}: cannot write there ({exc.strerror}); give a "
            "folder you can write to"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise OutputDirInUse(
            f"OUTPUT_DIR = {str(output_dir)!r} is in use by another run of {holder}. Two runs "
            "into one folder would overwrite each other's checkpoints and results: wait for "
            "that run to end (or stop it), or give this run another OUTPUT_DIR"
        ) from None
    record = {
        "notebook": Path(notebook).name,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    os.ftruncate(fd, 0)  # in place: replacing the file would leave the lock on the old one
    os.pwrite(fd, json.dumps(record).encode(), 0)
    _HELD[path] = fd
    return path


def _holder(fd: int) -> str:
    """Who holds the lock on ``fd``, per its record (re-read briefly while still empty)."""
    for _ in range(20):
        try:
            r = json.loads(os.pread(fd, 4096, 0))
            return (
                f"{r['notebook']} (process {r['pid']} on host {r['host']}, started {r['started']})"
            )
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "the same notebook (its process has not recorded itself yet)"
