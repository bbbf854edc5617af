"""Several devices and several machines, simulated on the CPU: logical CPU devices under
MirroredStrategy, and two worker processes on 127.0.0.1 under MultiWorkerMirroredStrategy."""

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import synthetic_cifar
from conftest import ROOT, free_ports, run_notebook

import cifar_utils as cu


def _env(**extra):
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        **extra,
    }


@pytest.fixture(scope="module")
def equivalence():
    """What ``tests/strategy_equivalence.py`` reports, run once with two CPU replicas."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "strategy_equivalence.py")],
        env=_env(CIFAR_CPU_DEVICES="2"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_two_replicas_match_one_device_with_twice_the_batch(equivalence):
    result = equivalence
    assert (result["strategy"], result["replicas"]) == ("MirroredStrategy", 2)
    # Same data, same seed, same initial weights; per-replica batch 16 against batch 32.
    plain = result["plain"]  # no BatchNorm: the same computation up to float round-off
    for a, b in zip(plain["one_device"], plain["two_replicas"], strict=True):
        assert abs(a - b) / a < 1e-5  # measured 1e-7
    bn = result["batch_norm"]  # BatchNorm normalises each replica's 16 images on their own
    for a, b in zip(bn["one_device"], bn["two_replicas"], strict=True):
        assert abs(a - b) / a < 1e-3  # measured 1.5e-4 and 1.1e-4 (epochs 1 and 2)
    assert result["resumed"] == {"initial_epoch": 2, "step": 24, "epochs": 3}
    assert result["predict_rows"] < 1e-5 and result["predict_matches_model"] < 1e-5
    # 4 steps x 2 replicas, 8 masks of 256 drawn at rate 0.5: all different (with the seed's
    # counter plus the replica id, replica 1 drew replica 0's mask of the next step)
    assert result["dropout_masks"] == {"masks": 8, "distinct": 8}


@pytest.mark.slow
def test_two_replicas_validate_the_weights_they_save(equivalence):
    """Each replica keeps its own BatchNorm statistics while training; validation must score
    the first replica's, which the checkpoint holds. Before the fix the history said val
    accuracy 2/64 at the best epoch, its best.weights.h5 gave 1/64."""
    best = equivalence["best_reproduced"]
    history, evaluated = best["history"], best["evaluate"]
    assert history["accuracy"] == history["best"] == evaluated["accuracy"]  # to the last digit
    assert np.float32(best["predict_correct"] / best["images"]) == np.float32(history["best"])
    assert history["loss"] == evaluated["loss"]  # the same test step, weights and data


def test_cpu_devices_setting_is_checked(monkeypatch):
    monkeypatch.setenv("CIFAR_CPU_DEVICES", "two")
    with pytest.raises(ValueError, match="CIFAR_CPU_DEVICES / cpu_devices must be an int >= 1"):
        cu.choose_strategy()
    monkeypatch.setenv("CIFAR_CPU_DEVICES", "1")
    assert cu.choose_strategy().num_replicas_in_sync == 1
    # TensorFlow has long started in this test process: too late to split the CPU.
    with pytest.raises(RuntimeError, match="restart the kernel"):
        cu.choose_strategy(cpu_devices=3)


def test_chief_and_worker_folders(monkeypatch, tmp_path):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert cu.is_chief() and cu.worker_run_dir(tmp_path) == tmp_path
    cluster = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}
    for index, chief in ((0, True), (1, False)):
        config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        monkeypatch.setenv("TF_CONFIG", json.dumps(config))
        assert cu.is_chief() is chief
        assert cu.worker_run_dir(tmp_path) == (tmp_path if chief else tmp_path / "worker-1")
        (tmp_path / "m.json").unlink(missing_ok=True)
        path = cu.write_results(tmp_path, "m", test_top1=0.5)  # only the chief writes
        assert path == tmp_path / "m.json" and path.exists() is chief
    config = {"cluster": {"chief": ["h:1"], **cluster}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert not cu.is_chief()  # a cluster that names a chief: worker 0 is not it


SMALL = dict(TRAIN_LIMIT=300, VAL_SIZE=200, BATCH_SIZE=16)


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory):
    return synthetic_cifar.write_archive(tmp_path_factory.mktemp("data"), 500, 200, seed=2)


def _outputs(executed) -> str:
    return "".join(o.get("text", "") for c in executed.cells for o in c.get("outputs", []))


@pytest.mark.slow
def test_simple_notebook_on_two_replicas_resumes_exactly_and_repeats(
    small_archive, tmp_path, monkeypatch
):
    monkeypatch.setenv("CIFAR_CPU_DEVICES", "2")
    # bfloat16 forced (native here or emulated): the mirrored path under a mixed policy.
    quick = dict(DATA_DIR=str(small_archive), MIXED_PRECISION="bfloat16", **SMALL)
    nb = "simple_image_clasifier.ipynb"
    photo = cu.sample_photo("chelsea")  # the PHOTO parameter replaces the sample photo
    first = run_notebook(nb, tmp_path, EPOCHS=1, PHOTO=str(photo), **quick)
    assert "MirroredStrategy: 2 replica(s), global batch 32" in _outputs(first)
    assert "Precision: mixed_bfloat16 (MIXED_PRECISION = 'bfloat16' forces it" in _outputs(first)
    assert f"Classifying {photo}" in _outputs(first)
    results = tmp_path / "results"
    state = json.loads((results / "simple_cnn" / "state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 10)  # 300 images at 32 a step
    resumed = run_notebook(nb, tmp_path, EPOCHS=2, **quick)  # a stopped run, started again
    assert "Resuming from" in _outputs(resumed)
    record = json.loads((results / "simple_cnn.json").read_text())
    assert (record["epochs"], record["history"]["loss"][0]) == (2, state["history"]["loss"][0])
    # The same command from scratch, same SEED: the very same run, resumed or not.
    run_notebook(nb, tmp_path, EPOCHS=2, RESUME=False, **quick)
    again = json.loads((results / "simple_cnn.json").read_text())
    assert record["precision"] == again["precision"] == "mixed_bfloat16"
    assert again["history"] == record["history"]
    for key in ("val_top1", "test_top1", "test_top5", "test_per_class"):
        assert again[key] == record[key], key
    assert json.loads((results / "simple_cnn" / "state.json").read_text())["initial_epoch"] == 0
    model = cu.load_exported_model(results / "simple_cnn.keras")[0]  # float32 for everyone
    assert {layer.dtype_policy.name for layer in model.layers[1:]} == {"float32"}


def _start_workers(tmp_path, archive, epochs, tag):
    """The simple notebook in two papermill processes forming one two-worker cluster."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(2)]
    procs = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        log = open(tmp_path / f"{tag}-worker{index}.log", "wb")  # noqa: SIM115
        command = [
            sys.executable,
            "-m",
            "papermill",
            "simple_image_clasifier.ipynb",
            str(tmp_path / f"{tag}-{index}.ipynb"),
            "-p",
            "DATA_DIR",
            str(archive),
            "-p",
            "OUTPUT_DIR",
            str(tmp_path / "results"),
            "-p",
            "EPOCHS",
            str(epochs),
        ]
        command += [a for k, v in SMALL.items() for a in ("-p", k, str(v))]  # fmt: skip
        command += ["-p", "MIXED_PRECISION", "float32"]  # forced: "auto" varies by machine
        procs.append((subprocess.Popen(command, cwd=ROOT, env=_env(TF_CONFIG=json.dumps(config)),
                                       stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    return procs


def _wait_for_workers(procs, timeout=600):
    """Wait until both workers exit, or one fails (its peer would wait for it forever: kill
    it), or ``timeout`` seconds pass. Returns the return codes (None: killed)."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            codes = [proc.poll() for proc, _ in procs]
            if None not in codes or any(code not in (None, 0) for code in codes):
                break
            time.sleep(1)
        return [proc.poll() for proc, _ in procs]
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                # papermill's kernel too: it runs in a session of its own, and left alone it
                # would wait for its peer forever, holding the run's lock on OUTPUT_DIR.
                with contextlib.suppress(psutil.NoSuchProcess):
                    for child in psutil.Process(proc.pid).children(recursive=True):
                        child.kill()
                proc.kill()
                proc.wait()
            log.close()


def _two_workers(tmp_path, archive, epochs, tag):
    """Run the two-worker cluster to the end; assert both workers succeeded.

    The ports are free when chosen but TensorFlow binds them seconds later (papermill, the
    kernel and TensorFlow start first): another process may take one meanwhile, and that
    worker stops before training (cu.choose_strategy: "cannot be taken here"; TensorFlow, in
    the instant after that check: "Could not start gRPC server"). Then one more pair of ports
    is tried, as conftest.start_demo does for the demo.
    """
    clash = ("cannot be taken here", "Could not start gRPC server")
    for _attempt in (1, 2):
        codes = _wait_for_workers(_start_workers(tmp_path, archive, epochs, tag))
        logs = [(tmp_path / f"{tag}-worker{i}.log").read_text(errors="replace") for i in (0, 1)]
        if not any(words in log for log in logs for words in clash):
            break
    tails = "".join(f"\n--- worker {i} (exit {c}):\n{log[-3000:]}"
                    for i, (c, log) in enumerate(zip(codes, logs, strict=True)))  # fmt: skip
    assert codes == [0, 0], f"the two workers did not both succeed:{tails}"


@pytest.mark.slow
def test_simple_notebook_as_two_workers_writes_results_once_and_resumes(small_archive, tmp_path):
    _two_workers(tmp_path, small_archive, epochs=1, tag="first")
    results = tmp_path / "results"
    files = sorted(str(p.relative_to(results)) for p in results.rglob("*") if p.is_file())
    run_files = ["best.weights.h5", "last.weights.h5", "log.csv", "state.json"]
    assert files == sorted(
        ["simple_cnn.json", "simple_cnn.keras", "simple_cnn.card.md"]  # the chief, once
        + [f"figures/simple_cnn_{n}.png" for n in ("samples", "augmentation", "curves",
           "superclass_confusion", "mistakes", "photo_prediction", "reliability", "grad_cam",
           "photo_grad_cam")]
        + [".locks/simple_image_clasifier/run.lock",  # the run locks (cu.own_output_dir)
           ".locks/simple_image_clasifier/worker-1/run.lock"]
        + [f"simple_cnn/{f}" for f in run_files]  # every worker's own checkpoints
        + [f"simple_cnn/worker-1/{f}" for f in run_files]
    )  # fmt: skip
    _two_workers(tmp_path, small_archive, epochs=2, tag="resumed")
    chief = json.loads((results / "simple_cnn" / "state.json").read_text())
    other = json.loads((results / "simple_cnn" / "worker-1" / "state.json").read_text())
    for state in (chief, other):
        assert (state["initial_epoch"], state["epoch"], state["step"]) == (1, 2, 20)
    assert chief["history"]["loss"] == other["history"]["loss"]  # all-reduced: one run
    models = [cu.build_simple_cnn() for _ in range(2)]
    for model, folder in zip(models, ("", "worker-1"), strict=True):
        model.load_weights(results / "simple_cnn" / folder / "last.weights.h5")
    assert len(models[0].weights) == 30  # 4 conv, 4 BN (2 trainable, 2 moving), 3 dense
    # Gradients are all-reduced; BatchNorm's moving statistics, each worker's own while an
    # epoch trains, are the chief's on every worker before validation: so all workers
    # validate, and save, the very same weights.
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    record = json.loads((results / "simple_cnn.json").read_text())
    assert record["epochs"] == 2 and record["history"]["loss"] == chief["history"]["loss"]
    # The reported validation accuracy is that of the chief's best.weights.h5.
    assert record["val_top1"] == round(chief["best"], 6) == round(other["best"], 6)
    assert record["precision"] == chief["plan"]["model"]["dtype_policy"] == "float32"
    assert "Resuming from" in (tmp_path / "resumed-1.ipynb").read_text()
