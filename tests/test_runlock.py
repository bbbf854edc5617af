"""A run owns its OUTPUT_DIR: a second run of the same notebook into it is refused at once,
naming the first; a killed run leaves no lock behind; other notebooks and other workers of a
multi-worker run share the folder."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

import cifar_utils as cu

SIMPLE, COMPLEX = "simple_image_clasifier.ipynb", "complex_image_clasifier.ipynb"
WORKER_1 = {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}, "task": {"type": "worker",
                                                                          "index": 1}}  # fmt: skip

# What a notebook's set-up cell does, in a process of its own: the notebook's parameters as
# globals of the program, then check_parameters(globals(), notebook); "locked" once past it,
# then it holds on until its stdin closes.
START = """import sys
OUTPUT_DIR = sys.argv[1]
import cifar_utils as cu
try:
    cu.check_parameters(globals(), sys.argv[2])
except cu.OutputDirInUse as exc:
    print(exc, flush=True)
    sys.exit(3)
print("locked", flush=True)
sys.stdin.read()
"""


def _start(output_dir, notebook=SIMPLE, tf_config=None):
    """A process that starts a run of ``notebook`` into ``output_dir``; returns it once it
    holds the lock or has stopped."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    process = subprocess.Popen([sys.executable, "-c", START, str(output_dir), notebook],
                               cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    process.first_line = process.stdout.readline().strip()
    return process


def _stop(process):
    process.stdin.close()
    assert process.wait(timeout=60) == 0, process.stderr.read()


def test_each_notebook_and_each_worker_has_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    out = tmp_path / "results"
    assert cu.lock_path(out, SIMPLE) == out / ".locks" / "simple_image_clasifier" / "run.lock"
    assert cu.lock_path(out, f"/elsewhere/{SIMPLE}") == cu.lock_path(out, SIMPLE)
    assert cu.lock_path(out, COMPLEX).parent.name == "complex_image_clasifier"
    monkeypatch.setenv("TF_CONFIG", json.dumps(WORKER_1))
    assert cu.lock_path(out, SIMPLE) == (
        out / ".locks" / "simple_image_clasifier" / "worker-1" / "run.lock"
    )


def test_checking_parameters_alone_takes_no_lock(tmp_path):
    """Only a run (the program's own globals) locks; a check of values writes nothing."""
    defaults = cu.notebook_defaults(SIMPLE)
    cu.check_parameters({**defaults, "OUTPUT_DIR": str(tmp_path / "out")}, SIMPLE)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_second_run_into_the_folder_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "results"
    first = _start(out)
    try:
        assert first.first_line == "locked", first.stderr.read()
        record = json.loads(cu.lock_path(out, SIMPLE).read_text())
        assert record["pid"] == first.pid and record["notebook"] == SIMPLE

        second = _start(out)  # the same notebook, the same folder: refused
        assert second.wait(timeout=60) == 3
        message = second.first_line
        assert message.startswith(f"OUTPUT_DIR = '{out}' is in use by another run of {SIMPLE} ")
        assert f"(process {first.pid} on host {record['host']}, started {record['started']})" in (
            message
        )
        assert "or give this run another OUTPUT_DIR" in message
        with pytest.raises(cu.OutputDirInUse, match=f"process {first.pid} "):
            cu.own_output_dir(out, SIMPLE)  # in this process too

        other = _start(out, COMPLEX)  # another notebook into the same folder: fine
        worker = _start(out, SIMPLE, WORKER_1)  # another worker of a multi-worker run: fine
        assert (other.first_line, worker.first_line) == ("locked", "locked")
        _stop(other)
        _stop(worker)
        assert first.poll() is None  # the first run goes on
    finally:
        _stop(first)
    after = _start(out)  # the first run ended: the folder is free
    _stop(after)
    assert after.first_line == "locked"


@pytest.mark.slow
def test_a_killed_run_leaves_no_lock_behind(tmp_path):
    out = tmp_path / "results"
    crashed = _start(out)
    assert crashed.first_line == "locked", crashed.stderr.read()
    os.kill(crashed.pid, signal.SIGKILL)  # no clean-up code runs
    crashed.wait(timeout=60)
    assert json.loads(cu.lock_path(out, SIMPLE).read_text())["pid"] == crashed.pid  # stale
    again = _start(out)
    try:
        assert again.first_line == "locked", again.stderr.read()
        assert json.loads(cu.lock_path(out, SIMPLE).read_text())["pid"] == again.pid
    finally:
        _stop(again)


def test_the_process_that_holds_the_lock_may_take_it_again(tmp_path):
    """As a notebook's set-up cell run twice in one kernel, the folder named another way."""
    (tmp_path / "results").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "results")
    held = cu.own_output_dir(tmp_path / "results", SIMPLE)
    assert cu.own_output_dir(tmp_path / "link", SIMPLE) == held
    assert cu.own_output_dir(tmp_path / "results" / ".." / "results", SIMPLE) == held
    assert json.loads(held.read_text())["pid"] == os.getpid()


def test_an_unwritable_output_dir_is_a_parameter_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder\n")
    with pytest.raises(cu.ParameterError, match="OUTPUT_DIR = '.*file/results': cannot write"):
        cu.own_output_dir(blocker / "results", SIMPLE)


def _poll(predicate, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.2)


def _papermill(executed: Path, archive: Path, out: Path) -> subprocess.Popen:
    """The simple notebook headless on the generated archive, a tiny run (1 epoch)."""
    command = [str(Path(sys.executable).parent / "papermill"), SIMPLE, str(executed),
               "-p", "DATA_DIR", str(archive), "-p", "TRAIN_LIMIT", "300", "-p", "VAL_SIZE",
               "100", "-p", "EPOCHS", "1", "-p", "BATCH_SIZE", "32", "-p", "OUTPUT_DIR",
               str(out)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    log = open(executed.with_suffix(".log"), "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.mark.slow
def test_two_notebook_runs_into_one_folder(tmp_path, cifar_archive):
    """Two papermill runs of the simple notebook into one OUTPUT_DIR: the second stops at
    its set-up cell with the message; the first ends as a lone run does, file for file."""
    lone, shared = tmp_path / "lone", tmp_path / "shared"
    first = _papermill(tmp_path / "first.ipynb", cifar_archive, shared)
    _poll(
        lambda: cu.lock_path(shared, SIMPLE).is_file()
        and cu.lock_path(shared, SIMPLE).stat().st_size
    )
    kernel = json.loads(cu.lock_path(shared, SIMPLE).read_text())["pid"]
    os.kill(kernel, signal.SIGSTOP)  # the first run holds still while the second starts
    try:
        second = _papermill(tmp_path / "second.ipynb", cifar_archive, shared)
        assert second.wait(timeout=300) == 1
    finally:
        os.kill(kernel, signal.SIGCONT)
    said = (tmp_path / "second.log").read_text()
    assert f"OutputDirInUse: OUTPUT_DIR = '{shared}' is in use by another run of {SIMPLE} " \
           f"(process {kernel} on host" in said  # fmt: skip
    assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    alone = _papermill(tmp_path / "lone.ipynb", cifar_archive, lone)
    assert alone.wait(timeout=600) == 0, (tmp_path / "lone.log").read_text()[-3000:]

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    assert files(shared) == files(lone)
    for name in ("simple_cnn/log.csv", "simple_cnn/best.weights.h5", "simple_cnn/last.weights.h5"):
        assert (shared / name).read_bytes() == (lone / name).read_bytes(), name
    timed = {"seconds", "finished"}  # differ between any two runs
    for name in ("simple_cnn/state.json", "simple_cnn.json"):
        a = json.loads((shared / name).read_text().replace(str(shared), str(lone)))
        b = json.loads((lone / name).read_text())
        assert {k: v for k, v in a.items() if k not in timed} == {
            k: v for k, v in b.items() if k not in timed
        }, name
