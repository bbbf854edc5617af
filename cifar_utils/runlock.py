"""A run owns its output folder: one run of a notebook at a time per ``OUTPUT_DIR``.

Two runs of one notebook into one folder would interleave their checkpoints, ``log.csv``
and results silently. The lock is ``fcntl.flock`` on a file the run keeps open for its
whole life: the operating system releases it when the process ends, however it ends (a
crash, ``kill -9``), so a dead run never blocks the next one. A lock file (``O_EXCL``, a
pid file) would outlive a killed run. The file also records who holds it, for the message.
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
    """The lock file of ``notebook``'s runs into ``output_dir``, for this worker.

    ``OUTPUT_DIR/.locks/<notebook name>/run.lock``; a non-chief worker of a multi-worker run
    (``$TF_CONFIG``) has its own, in ``worker-<index>/`` below (:func:`worker_run_dir`), as
    all workers share ``OUTPUT_DIR``.
    """
    return worker_run_dir(Path(output_dir) / ".locks" / Path(notebook).stem) / "run.lock"


def own_output_dir(output_dir, notebook) -> Path:
    """Lock ``output_dir`` for this process's run of ``notebook``, until the process ends.

    Other notebooks may write into the same folder meanwhile (their files have other
    names). Taking the lock again in the process that holds it does nothing.

    Args:
        output_dir: the run's ``OUTPUT_DIR`` (created if missing).
        notebook: the notebook's file name or path (its stem names the lock).

    Returns:
        The lock file's absolute path, symbolic links resolved.

    Raises:
        OutputDirInUse: another live process holds the lock; the message names its process
            id, host, start time and notebook.
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
    """Who holds the lock on ``fd``, as its record says; the holder may be between taking
    the lock and writing its record, so an empty record is read again for a moment."""
    for _ in range(20):
        try:
            r = json.loads(os.pread(fd, 4096, 0))
            return (
                f"{r['notebook']} (process {r['pid']} on host {r['host']}, started {r['started']})"
            )
        except (ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "the same notebook (its process has not recorded itself yet)"
