"""The generic training glue: checkpoints, resume, interruption, divergence (field cases 4, 9)."""

import functools
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import AtBatch, ctrl_c, labelled_images, small_datasets

import cifar_utils as cu

N_TRAIN, BATCH = 200, 32
STEPS = -(-N_TRAIN // BATCH)  # 7 optimizer steps per epoch


def tiny_model(lr=None, epochs=2):
    """A small BatchNorm CNN compiled with SGD 0.9 and the seed's exponential decay."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(100, activation="softmax"),
        ]
    )
    rate = lr if lr is not None else cu.exponential_decay(N_TRAIN, BATCH, epochs)
    model.compile(
        keras.optimizers.SGD(rate, momentum=0.9), "categorical_crossentropy", metrics=["accuracy"]
    )
    return model


@pytest.fixture(scope="module")
def data():
    return small_datasets(N_TRAIN, 100, BATCH)


class Probe(keras.callbacks.Callback):
    """Records the optimizer step, learning rate and a weight when training begins."""

    def on_train_begin(self, logs=None):
        opt = self.model.optimizer
        self.step = int(opt.iterations)
        self.lr = float(keras.ops.convert_to_numpy(opt.learning_rate))
        self.kernel = np.array(self.model.layers[0].kernel)


@pytest.mark.slow
def test_resume_continues_epoch_optimizer_step_schedule_and_history(tmp_path, data):
    train_ds, val_ds = data
    first = tiny_model()
    s1 = cu.train(first, train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    assert s1.epoch == 1 and s1.step == STEPS and s1.initial_epoch == 0
    kernel_after_1 = np.array(first.layers[0].kernel)

    probe = Probe()
    fresh = tiny_model()  # a new model and optimizer object, as after a kernel restart
    s2 = cu.train(fresh, train_ds, val_ds, epochs=2, run_dir=tmp_path, callbacks=[probe], verbose=0)
    assert s2.initial_epoch == 1  # starts at epoch 2
    assert probe.step == STEPS  # optimizer step restored
    np.testing.assert_array_equal(probe.kernel, kernel_after_1)  # weights restored
    schedule = cu.exponential_decay(N_TRAIN, BATCH, 2)
    assert probe.lr == pytest.approx(float(schedule(STEPS)))  # the schedule continues
    assert probe.lr < 0.1
    assert s2.epoch == 2 and s2.step == 2 * STEPS
    assert len(s2.history["loss"]) == len(s2.history["val_accuracy"]) == 2
    assert s2.history["loss"][0] == s1.history["loss"][0]
    lrs = s2.history["learning_rate"]
    assert lrs == pytest.approx([float(schedule(STEPS)), float(schedule(2 * STEPS))])
    assert lrs[1] == pytest.approx(1e-3)  # the planned final rate, reached at the last step
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 2
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 2


@pytest.mark.slow
def test_interrupted_run_resumes_from_last_complete_epoch(tmp_path, data):
    train_ds, val_ds = data
    with pytest.raises(KeyboardInterrupt):
        cu.train(
            tiny_model(), train_ds, val_ds, epochs=2, run_dir=tmp_path,
            callbacks=[AtBatch(1, 3, ctrl_c)], verbose=0,
        )  # fmt: skip
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 1
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    probe = Probe()
    state = cu.train(
        tiny_model(), train_ds, val_ds, epochs=2, run_dir=tmp_path, callbacks=[probe], verbose=0
    )
    assert (state.initial_epoch, probe.step, state.step) == (1, STEPS, 2 * STEPS)
    assert len(state.history["accuracy"]) == 2


@pytest.mark.slow
def test_resume_false_starts_fresh(tmp_path, data, capsys):
    train_ds, val_ds = data
    cu.train(tiny_model(), train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)
    capsys.readouterr()
    probe = Probe()
    state = cu.train(
        tiny_model(), train_ds, val_ds, epochs=1, run_dir=tmp_path, resume=False,
        callbacks=[probe], verbose=0,
    )  # fmt: skip
    assert (state.initial_epoch, probe.step, state.step) == (0, 0, STEPS)
    assert probe.lr == pytest.approx(0.1)
    assert len(state.history["loss"]) == 1
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 1 + 1
    said = capsys.readouterr().out
    assert f"Starting over in {tmp_path} (resume=False): its run of 2 epoch(s)" in said


@pytest.mark.slow
def test_tensorboard_logs_under_run_dir(tmp_path, data):
    train_ds, val_ds = data
    run = functools.partial(
        cu.train, tiny_model(), train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0
    )
    run(tensorboard=True)
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert {p.parent.name for p in events} == {"train", "validation"}


@pytest.mark.slow
def test_resume_with_another_model_is_refused(tmp_path, data):
    train_ds, val_ds = data
    cu.train(tiny_model(), train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    other = cu.build_simple_cnn()
    other.compile(keras.optimizers.SGD(0.1), "categorical_crossentropy")
    with pytest.raises(ValueError, match="RESUME=False"):
        cu.train(other, train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)


@pytest.mark.slow
def test_resume_refuses_another_plan_and_warns_about_other_epochs(tmp_path, data, capsys):
    train_ds, val_ds = data
    plan = {"data": "abc123", "batch_size": BATCH}
    run = functools.partial(cu.train, train_ds=train_ds, val_ds=val_ds, run_dir=tmp_path, verbose=0)
    run(tiny_model(), epochs=1, plan=plan)
    # Other data (e.g. a regenerated archive or another TRAIN_LIMIT): old checkpoints refused.
    with pytest.raises(
        ValueError, match=r"another plan: data: 'abc123' then, 'def456' now.*RESUME=False"
    ):
        run(tiny_model(), epochs=2, plan={**plan, "data": "def456"})
    # A finished run trains nothing and says so, instead of passing old scores for new ones.
    state = run(tiny_model(), epochs=1, plan=plan)
    assert "already has 1 epoch(s), EPOCHS=1: nothing to train" in capsys.readouterr().out
    assert (state.initial_epoch, state.epoch) == (1, 1)
    # More epochs than planned: continues, with a warning about the schedule.
    with pytest.warns(UserWarning, match="planned for 1 epochs, this run asks for 2"):
        state = run(tiny_model(), epochs=2, plan=plan)
    assert (state.initial_epoch, state.epoch, state.epochs) == (1, 2, 2)


def test_data_fingerprint_tells_training_sets_apart():
    x = np.zeros((4, 32, 32, 3), np.uint8)
    y = np.arange(4)
    assert cu.data_fingerprint(x, y) == cu.data_fingerprint(x.copy(), y.copy())
    assert len(cu.data_fingerprint(x, y)) == 12
    x2 = x.copy()
    x2[0, 0, 0, 0] = 1
    assert cu.data_fingerprint(x2, y) != cu.data_fingerprint(x, y)
    assert cu.data_fingerprint(x, y[::-1]) != cu.data_fingerprint(x, y)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = tiny_model()
    path = cu.save_checkpoint(model, tmp_path / "last.weights.h5")
    before = path.read_bytes()
    state_path = cu.write_json(tmp_path / "state.json", {"epoch": 1})

    def crash_midway(target, *args, **kwargs):
        with open(target, "wb") as f:
            f.write(b"\x89HDF half a file")  # what a crash mid-save leaves behind
        raise OSError("disk full")

    model.layers[0].kernel.assign(model.layers[0].kernel + 1.0)
    monkeypatch.setattr(model, "save_weights", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        cu.save_checkpoint(model, path)
    monkeypatch.setattr(json, "dumps", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cu.write_json(state_path, {"epoch": 2})

    assert path.read_bytes() == before
    assert json.loads(state_path.read_text()) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.weights.h5", "state.json"]
    tiny_model().load_weights(path)  # still a whole, loadable file


def test_field_case_4_hdf5_refused_keras_suffixes_accepted(tmp_path):
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        cu.check_checkpoint_path(tmp_path / "model.hdf5")
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        cu.save_checkpoint(model, tmp_path / "model.hdf5")
    with pytest.raises(ValueError, match=r"\.keras"):  # a whole model goes to .keras only
        cu.export_model(model, tmp_path / "model.hdf5")
    assert not list(tmp_path.iterdir())  # nothing written
    # The refusal is Keras' own: ModelCheckpoint rejects .hdf5 in both modes.
    for weights_only in (True, False):
        with pytest.raises(ValueError, match="must end in"):
            keras.callbacks.ModelCheckpoint(tmp_path / "m.hdf5", save_weights_only=weights_only)
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        model.save_weights(tmp_path / "w.hdf5")  # Keras refuses it too
    path = cu.save_checkpoint(model, tmp_path / "model.weights.h5")
    fresh = tiny_model()
    fresh.load_weights(path)
    for a, b in zip(fresh.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_steps_per_epoch_and_schedule_errors():
    assert cu.steps_per_epoch(45_000, 128) == 352  # field case 9
    assert cu.steps_per_epoch(50_000, 128) == 391
    assert cu.steps_per_epoch(256, 128) == 2
    with pytest.raises(ValueError, match="batch_size"):
        cu.steps_per_epoch(100, 0)
    with pytest.raises(ValueError, match="epochs"):
        cu.exponential_decay(100, 10, 0)
    with pytest.raises(ValueError, match="final_lr"):
        cu.exponential_decay(100, 10, 5, initial_lr=0.1, final_lr=0.2)


@pytest.mark.slow
def test_a_checkpoint_that_does_not_belong_to_its_state_is_refused(tmp_path, data):
    train_ds, val_ds = data
    cu.train(tiny_model(), train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    state_after_1 = (tmp_path / "state.json").read_text()
    cu.train(tiny_model(), train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)
    # As if state.json had been put back by hand from epoch 1 beside epoch 2's weights.
    (tmp_path / "state.json").write_text(state_after_1)
    with pytest.raises(ValueError, match=r"step 14 but state.json at step 7: they do not belong"):
        cu.train(tiny_model(), train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)


SIGINT_SCRIPT = """
import os, signal, sys
sys.path.insert(0, "tests")
import keras
from conftest import small_datasets
import cifar_utils as cu

class SigintAt(keras.callbacks.Callback):  # what Ctrl-C (or papermill's interrupt) sends
    def on_train_batch_begin(self, batch, logs=None):
        if self.model.optimizer.iterations.numpy() == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGINT)

keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(4, 3),
                          keras.layers.GlobalAveragePooling2D(),
                          keras.layers.Dense(100, activation="softmax")])
model.compile("sgd", "categorical_crossentropy")
train, val = small_datasets(64, 32, 32)
state = cu.train(model, train, val, epochs=3, run_dir=sys.argv[1], callbacks=[SigintAt()],
                 verbose=0)
print(f"done: epochs {state.initial_epoch + 1}-{state.epoch}")
"""


@pytest.mark.slow
def test_ctrl_c_says_where_the_run_stopped_and_the_same_command_resumes(tmp_path):
    def run(stop_at_step):
        return subprocess.run(
            [sys.executable, "-c", SIGINT_SCRIPT, str(tmp_path), str(stop_at_step)],
            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )  # fmt: skip

    stopped = run(3)  # 2 steps an epoch: the signal comes in epoch 2
    assert stopped.returncode != 0
    said = stopped.stdout + stopped.stderr
    assert "Training stopped after epoch 1 (the last epoch saved in" in said
    assert "run the same command again to resume it" in said
    # On the process's own stderr as a line of its own: papermill, stopped by the same Ctrl-C,
    # shows the kernel's stderr in the terminal but not the notebook's last output.
    assert any(line.startswith("Training stopped after epoch 1") for line in
               stopped.stderr.splitlines())  # fmt: skip
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 1
    resumed = run(-1)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {tmp_path} after epoch 1." in resumed.stdout
    assert "done: epochs 2-3" in resumed.stdout
    # In a notebook IPython shows the one line instead of the traceback through model.fit.
    interrupted = cu.TrainingInterrupted(1, tmp_path)
    assert isinstance(interrupted, KeyboardInterrupt)
    assert interrupted._render_traceback_() == [f"TrainingInterrupted: {interrupted}"]
    assert "nothing was saved yet; run the same command again to start it" in str(
        cu.TrainingInterrupted(0, tmp_path)
    )


@pytest.mark.parametrize("deterministic", [True, False])
def test_xla_is_decided_once_and_recorded_as_keras_used_it(deterministic, capsys):
    from tensorflow.python.framework import config  # the only switch back off

    was = config.is_op_determinism_enabled()
    (config.enable_op_determinism if deterministic else config.disable_op_determinism)()
    try:
        jit = cu.resolve_jit_compile(True)
        said = capsys.readouterr().out
        assert jit is not deterministic
        if deterministic:
            assert "XLA: off (XLA = True, but op determinism (DETERMINISTIC = True)" in said
        else:
            assert said == "XLA: on (XLA = True)\n"
        assert cu.xla_decision("auto") == (
            False,
            'XLA = "auto" on a CPU, where XLA made training slower',
        )  # fmt: skip  (no GPU on the test machines)
        model = tiny_model()
        with warnings.catch_warnings(record=True):  # Keras' own warning when it overrules
            model.compile("sgd", "categorical_crossentropy", jit_compile=True)  # asked: True
        run = cu.RunState("r", 1, {}, epoch=1, best_epoch=1, params=cu.parameter_counts(model))
        record = cu.run_record(run, model, train_images=10, scores={})
        assert record["xla"] is (not deterministic)  # what Keras used, not what was asked
    finally:
        (config.enable_op_determinism if was else config.disable_op_determinism)()


def test_state_json_of_older_runs_is_read_and_a_broken_one_refused(tmp_path):
    old = {"epoch": 2, "history": {"loss": [2.0, 1.5]}, "seconds": 3.5, "step": 14,
           "best": 0.2, "best_epoch": 2, "plan": {"data": None}, "epochs": 5,
           "initial_epoch": 1, "monitor": "val_accuracy", "mode": "max",
           "params": {"total": 1}, "run_dir": "/elsewhere", "seed_states": []}  # fmt: skip
    cu.write_json(tmp_path / "state.json", old)
    state = cu.read_state(tmp_path)  # the dict train wrote before RunState
    assert (state.epoch, state.step, state.best_epoch, state.epochs) == (2, 14, 2, 5)
    assert state.history == {"loss": [2.0, 1.5]} and state.run_dir == str(tmp_path)
    cu.write_json(tmp_path / "state.json", {"epoch": 1, "history": {}})  # the oldest keys only
    assert (cu.read_state(tmp_path).epochs, cu.read_state(tmp_path).plan) == (1, {})
    for broken in ("{not json", "[1, 2]", '{"history": {}}'):
        (tmp_path / "state.json").write_text(broken)
        with pytest.raises(cu.ResumeError, match="is no run state.*RESUME=False"):
            cu.read_state(tmp_path)


def test_a_transformed_training_pipeline_still_trains_but_warns_its_epochs_restart(tmp_path, data):
    train_ds, val_ds = data
    assert isinstance(train_ds, cu.TrainingData) and isinstance(train_ds, tf.data.Dataset)
    mapped = train_ds.map(lambda x, y: (x, y))  # any transformation: a plain dataset
    assert not isinstance(mapped, cu.TrainingData)
    cu.train(tiny_model(), mapped, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    with pytest.warns(UserWarning, match="plain tf.data.Dataset.*restart"):
        state = cu.train(tiny_model(), mapped, val_ds, epochs=2, run_dir=tmp_path, verbose=0)
    assert (state.initial_epoch, state.epoch, state.step) == (1, 2, 2 * STEPS)


def test_a_transformed_pipeline_resumes_only_on_the_data_under_it(tmp_path, data):
    train_ds, val_ds = data
    (x, y), _ = labelled_images(N_TRAIN, 100)
    smooth = train_ds.map(lambda x, y: (x, y * 0.9 + 0.001))  # e.g. label smoothing
    cu.train(tiny_model(), smooth, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    other = cu.make_dataset(x[::-1].copy(), y[::-1].copy(), batch_size=BATCH, training=True)
    with pytest.raises(cu.ResumeError, match="data"):  # another training set under the map
        cu.train(tiny_model(), other.map(lambda x, y: (x, y * 0.9 + 0.001)), val_ds, epochs=2,
                 run_dir=tmp_path, verbose=0)  # fmt: skip


def test_a_run_resumed_with_other_epochs_records_its_earlier_plan(tmp_path, data):
    train_ds, val_ds = data
    cu.train(tiny_model(), train_ds, val_ds, epochs=2, run_dir=tmp_path, verbose=0)
    model = tiny_model()
    with pytest.warns(UserWarning, match="planned for 2 epochs, this run asks for 1"):
        state = cu.train(model, train_ds, val_ds, epochs=1, run_dir=tmp_path, verbose=0)
    assert (state.epoch, state.replanned_from) == (2, [2])  # trained 2, though EPOCHS = 1
    record = cu.run_record(state, model, train_images=N_TRAIN, scores={})
    assert (record["epochs"], record["replanned_from"]) == (2, [2])
    assert record["network"] == cu.run_record(state, tiny_model(), train_images=1, scores={})[
        "network"] != cu.run_record(state, keras.Sequential([keras.Input((4,)),
        keras.layers.Dense(100)]), train_images=1, scores={})["network"]  # fmt: skip


def test_a_batch_transform_with_other_arguments_is_another_plan():
    def darken(images, seed, factor=1.0):
        return images

    def plan(transform):
        return cu.run_plan(tiny_model(), cu.make_dataset(
            np.zeros((8, 32, 32, 3), np.uint8), np.arange(8), batch_size=4, training=True,
            batch_transform=transform))["data"]["augmentation"]  # fmt: skip

    assert plan(cu.albumentations_batch_transform) == [
        {"batch_transform": "albumentations_batch_transform"}
    ]
    bright, dark = (functools.partial(darken, factor=f) for f in (1.0, 0.2))
    assert plan(bright) != plan(dark)
    assert plan(lambda images, seed: images) != plan(lambda images, seed: images // 2)


@pytest.mark.slow
def test_the_divergence_guard_works_on_its_own_in_model_fit(data):
    train_ds, _ = data
    model = tiny_model(lr=0.01)

    def poison(model):
        kernel = model.layers[0].kernel
        kernel.assign(np.full(kernel.shape, np.nan, np.float32))

    guard = cu.DivergenceGuard(check_every=1)
    model.fit(train_ds, epochs=3, callbacks=[AtBatch(1, 2, poison), guard], verbose=0)
    epoch, where, what = guard.diverged
    # With oneDNN the loss can stay finite; the state check (every batch here) catches it.
    assert (epoch, where) in ((2, "batch 3"), (2, "batch 3 (state check)"))
    assert what in ("loss became nan", "loss became inf") or "holds NaN or inf" in what
    assert model.stop_training and int(model.optimizer.iterations) == STEPS + 3
