"""Results that can be trusted: independent random streams, exact resume, run plans, epochs
that commit together, monitors with a mode, and provenance of every reported number."""

import json

import keras
import numpy as np
import pytest
import synthetic_cifar
from conftest import AtBatch, ctrl_c, labelled_images

import cifar_utils as cu
import cifar_utils.checkpoints
import cifar_utils.data
import cifar_utils.files

N_TRAIN, BATCH = 200, 32
STEPS = -(-N_TRAIN // BATCH)


@pytest.fixture(scope="module")
def arrays():
    return labelled_images(N_TRAIN, 100)


def dropout_model(lr=0.05, momentum=0.9, rate=0.3, loss="categorical_crossentropy"):
    """A small BatchNorm + Dropout CNN (Dropout draws random masks: part of what must repeat),
    initialised from seed 0 (a resumed run restarts from the same weights)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Conv2D(8, 3, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(rate),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(100, activation="softmax", dtype="float32"),  # also when mixed
        ]
    )
    cu.fast_cpu_training(model)  # as the notebooks train it, on a CPU
    model.compile(keras.optimizers.SGD(lr, momentum=momentum), loss, metrics=["accuracy"])
    return model


def pipelines(arrays, seed=1, rotation=15):
    (x, y), (xv, yv) = arrays
    augment = cu.augmentation_layers(flip=True, shift=0.1, rotation_degrees=rotation, seed=seed)
    train = cu.make_dataset(x, y, batch_size=BATCH, training=True, augment=augment, seed=seed)
    return train, cu.make_dataset(xv, yv, batch_size=BATCH, training=False)


# --------------------------------------------------------------- random streams


def _coordinate_image(size=32):
    """Channel 0 holds each pixel's column / 31, channel 1 its row / 31: a map of positions."""
    cols, rows = np.meshgrid(np.arange(size), np.arange(size))
    return np.stack([cols, rows, np.full_like(cols, size // 2)], -1).astype(np.float32) / 31


def _draws(batch):
    """Per image: flipped (0/1), rotation angle (degrees), shift x and y (pixels).

    Every output pixel p shows the input position s(p) = M p + t; the layers apply flip,
    shift, then rotation, so M = F R(-angle) with F the flip: det(M) < 0 when flipped.
    Fitted on the central 16x16 pixels, away from the filled borders.
    """
    rows, cols = np.mgrid[8:24, 8:24]
    design = np.stack([cols.ravel(), rows.ravel(), np.ones(256)], 1)
    out = []
    for image in np.asarray(batch):
        src = image[8:24, 8:24, :2].reshape(-1, 2) * 31
        (a, d), (b, e), (c, f) = np.linalg.lstsq(design, src, rcond=None)[0]
        det = a * e - b * d
        angle = np.degrees(np.arctan2(np.sign(det) * b, e))
        centre_x, centre_y = a * 15.5 + b * 15.5 + c, d * 15.5 + e * 15.5 + f
        if det < 0:
            centre_x = 31 - centre_x
        out.append([float(det < 0), angle, centre_x - 15.5, centre_y - 15.5])
    return np.array(out)


def _assert_independent(draws, names):
    corr = np.corrcoef(draws.T)
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            # 2,048 draws: |r| of independent streams stays below 0.1 (about 4.5 sigma).
            assert abs(corr[i, j]) < 0.1, f"{names[i]} and {names[j]} correlate: {corr[i, j]:.2f}"
    flipped, tilted = draws[:, 0] == 1, draws[:, 1] > 0
    assert 0.4 < tilted[flipped].mean() < 0.6 and 0.4 < tilted[~flipped].mean() < 0.6
    assert 0.4 < flipped.mean() < 0.6


def test_augmentation_draws_are_independent_of_each_other():
    names = ["flip", "rotation", "shift x", "shift y"]
    layers = cu.augmentation_layers(flip=True, shift=0.1, rotation_degrees=15, seed=42)
    copies = np.repeat(_coordinate_image()[None], 2048, axis=0)
    # Called directly (as the previews do): each layer draws from its own seed.
    direct = _draws(layers(copies, training=True))
    _assert_independent(direct, names)
    assert np.abs(direct[:, 1]).max() <= 15.5 and np.abs(direct[:, 2:]).max() <= 3.3
    assert direct[:, 1].std() > 7 and direct[:, 2].std() > 1.5  # the draws do vary
    # Inside the training pipeline (per-batch seeds), across batches and epochs.
    labels = np.zeros(len(copies), np.int64)
    ds = cu.make_dataset(
        (copies * 255).round().astype(np.uint8),
        labels,
        batch_size=256,
        training=True,
        augment=layers,
        seed=42,
    )
    piped = np.concatenate([_draws(b) for b, _ in ds.from_epoch(0, 1)])
    _assert_independent(piped, names)
    other_epoch = np.concatenate([_draws(b) for b, _ in ds.from_epoch(1, 2)])
    assert np.abs(np.corrcoef(piped[:, 1], other_epoch[:, 1])[0, 1]) < 0.1


def test_albumentations_draws_anew_for_every_batch():
    image = synthetic_cifar.make_images(np.array([7]), seed=0)
    same = np.repeat(image, 256, axis=0)  # one image, 256 times: only augmentation differs
    ds = cu.make_dataset(
        same,
        np.zeros(256, np.int64),
        batch_size=64,
        training=True,
        seed=3,
        batch_transform=cu.albumentations_batch_transform,
    )
    batches = [b.numpy() for b, _ in ds.from_epoch(0, 1)]
    assert not any(np.array_equal(batches[0], b) for b in batches[1:])
    distinct = {im.tobytes() for b in batches for im in b}
    # Measured 139 of 256 (unshifted copies repeat: flip and shift have p 0.5); when every
    # batch of an epoch drew the same, there were 43.
    assert len(distinct) > 100


def test_each_random_source_has_its_own_seed():
    seeds = {
        cu.derive_seed(42, *name)
        for name in [
            ("shuffle",),
            ("augment", 0),
            ("augment", 1),
            ("augment", 2),
            ("batch_transform",),
            ("epochs",),
        ]
    }
    assert len(seeds) == 6 and all(0 <= s < 2**31 for s in seeds)
    assert cu.derive_seed(42, "shuffle") == cu.derive_seed(42, "shuffle")
    assert cu.derive_seed(42, "shuffle") != cu.derive_seed(43, "shuffle")
    configs = [
        la.get_config()["seed"] for la in cu.augmentation_layers(rotation_degrees=15, seed=7).layers
    ]
    assert len(set(configs)) == 3  # three layers, three streams


def test_epochs_are_fixed_by_seed_epoch_and_batch(arrays):
    train, _ = pipelines(arrays)
    again, _ = pipelines(arrays)
    assert train.steps_per_epoch == STEPS
    epochs = [[b.numpy() for b, _ in train.from_epoch(e, e + 1)] for e in range(3)]
    later = [b.numpy() for b, _ in again.from_epoch(1, 3)]
    for a, b in zip(epochs[1] + epochs[2], later, strict=True):
        np.testing.assert_array_equal(a, b)  # epoch 2 is epoch 2, whoever asks and when
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # a new order every epoch
    (x, y), _ = arrays
    order = [
        [
            tuple(b.numpy().argmax(1))
            for _, b in cu.make_dataset(x, y, batch_size=BATCH, training=True, seed=1).from_epoch(
                e, e + 1
            )
        ]
        for e in range(2)
    ]
    assert order[0] != order[1] and sorted(sum(order[0], ())) == sorted(y.tolist())


# ------------------------------------------------------------------ exact resume


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"], indirect=True)
def test_a_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path, arrays, policy):
    def run(folder, **kwargs):
        cu.seed_everything(0)  # a new process: same seed, fresh model and pipelines
        train, val = pipelines(arrays)
        return cu.train(dropout_model(), train, val, epochs=3, run_dir=folder, verbose=0, **kwargs)

    whole = run(tmp_path / "whole")
    assert whole.plan["model"]["dtype_policy"] == policy
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", callbacks=[AtBatch(1, 2, ctrl_c)])  # stopped after epoch 1
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["epoch"] == 1
    resumed = run(tmp_path / "cut")
    assert resumed.initial_epoch == 1
    assert resumed.history == whole.history  # every metric of every epoch, exactly
    assert resumed.step == whole.step == 3 * STEPS
    fresh, other = dropout_model(), dropout_model()
    fresh.load_weights(tmp_path / "whole" / "last.weights.h5")
    other.load_weights(tmp_path / "cut" / "last.weights.h5")
    for a, b in zip(fresh.get_weights(), other.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    again = run(tmp_path / "again", resume=False)  # the same seed on the same machine
    assert again.history == whole.history


@pytest.mark.slow
def test_resume_under_another_precision_is_refused_naming_it(tmp_path, arrays, policy):
    train, val = pipelines(arrays)
    cu.train(dropout_model(), train, val, epochs=1, run_dir=tmp_path, verbose=0)  # float32
    keras.mixed_precision.set_global_policy("mixed_bfloat16")  # MIXED_PRECISION changed
    with pytest.raises(cu.ResumeError) as err:
        cu.train(dropout_model(), train, val, epochs=2, run_dir=tmp_path, verbose=0)
    message = str(err.value)
    assert "model.dtype_policy: 'float32' then, 'mixed_bfloat16' now" in message
    assert 'that run trained under float32; set MIXED_PRECISION = "float32" to resume it' in (
        message
    )
    assert "Start over with RESUME=False" in message
    assert json.loads((tmp_path / "state.json").read_text())["epoch"] == 1  # left as it was


# --------------------------------------------------------------------- run plans


@pytest.mark.slow
def test_resume_refuses_what_changes_a_checkpoint_meaning(tmp_path, arrays):
    def run(epochs=1, lr=None, momentum=0.9, seed=1, rotation=15, plan=None):
        train, val = pipelines(arrays, seed=seed, rotation=rotation)
        model = dropout_model(momentum=momentum)
        schedule = cu.exponential_decay(N_TRAIN, BATCH, epochs, initial_lr=lr or 0.1)
        model.compile(keras.optimizers.SGD(schedule, momentum=momentum), "categorical_crossentropy")
        plan = {"image_size": 32, "weights": None} if plan is None else plan
        return cu.train(model, train, val, epochs=epochs, run_dir=tmp_path, plan=plan, verbose=0)

    run(epochs=1)
    # The layers' own seeds do not drive the pipeline's draws: no difference in meaning.
    train, val = pipelines(arrays)
    assert "seed" not in json.dumps(cu.run_plan(dropout_model(), train)["data"]["augmentation"])
    for change, differs in [
        (dict(lr=0.05), "learning_rate.config.initial_learning_rate: 0.1 then, 0.05 now"),
        (dict(momentum=0.5), "optimizer.momentum: 0.9 then, 0.5 now"),
        (dict(seed=2), "data.seed: 1 then, 2 now"),
        (dict(rotation=10), "data.augmentation"),
        (dict(plan={"image_size": 224, "weights": None}), "image_size: 32 then, 224 now"),
        (
            dict(plan={"image_size": 32, "weights": "imagenet"}),
            "weights: None then, 'imagenet' now",
        ),
    ]:
        with pytest.raises(ValueError, match="another plan") as err:
            run(**change)
        assert differs in str(err.value), str(err.value)
        assert "RESUME=False" in str(err.value)
    # More epochs: allowed, and the warning says how the schedule's rate jumps: the 1-epoch
    # plan ended at 0.001, the 2-epoch plan gives 0.01 at that step (the middle).
    with pytest.warns(UserWarning, match="planned for 1 epochs, this run asks for 2") as warned:
        state = run(epochs=2)
    assert (state.initial_epoch, state.epoch) == (1, 2)
    message = str(warned[0].message)
    assert f"at the restored step {STEPS} it gives 0.01, where the old plan gave 0.001" in message


@pytest.mark.slow
def test_resume_refuses_another_network_loss_monitor_or_start(tmp_path, arrays):
    def run(folder, model=None, epochs=1, **kwargs):
        train, val = pipelines(arrays)
        return cu.train(
            model or dropout_model(), train, val, epochs=epochs, run_dir=folder, verbose=0, **kwargs
        )

    run(tmp_path / "a")
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=0.5)
    for kwargs, differs in [
        (dict(model=dropout_model(rate=0.9)), "model.layers.002 Dropout"),
        (dict(model=dropout_model(loss=smoothed)), "model.loss"),
        (dict(monitor="val_loss"), "training.mode: 'max' then, 'min' now"),
        (dict(epoch_offset=3), "training.epoch_offset: 0 then, 3 now"),
    ]:
        with pytest.raises(ValueError, match="another plan") as err:
            run(tmp_path / "a", epochs=2, **kwargs)
        assert differs in str(err.value)
    # Two phases: the second resumes only from the first phase it grew from.
    head = dropout_model()
    run(tmp_path / "head", head)
    run(tmp_path / "fine", head, epoch_offset=1)  # continues from the head's weights
    longer = dropout_model()
    run(tmp_path / "head", longer, epochs=2)  # the head now trains another epoch ...
    with pytest.raises(ValueError, match="model.start_weights.*an earlier phase"):
        run(tmp_path / "fine", longer, epochs=2, epoch_offset=2)  # ... so phase 2 is stale
    # The phase's epochs continue the data stream: no batch of the head phase again.
    train, val = pipelines(arrays)
    calls, original = [], train.from_epoch
    train.from_epoch = lambda first, last: calls.append((first, last)) or original(first, last)
    cu.train(
        dropout_model(), train, val, epochs=1, run_dir=tmp_path / "b", epoch_offset=2, verbose=0
    )
    assert calls == [(2, 3)]


# ------------------------------------------------------------ commits and monitors


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_an_epoch_commits_together(tmp_path, arrays, monkeypatch):
    def run(epochs):
        train, val = pipelines(arrays)
        return cu.train(
            dropout_model(), train, val, epochs=epochs, run_dir=tmp_path, monitor="loss", verbose=0
        )

    run(1)
    after_1 = _bytes(tmp_path)
    real_write = cu.write_json

    def cut_before_state(path, obj):
        if path.name == "state.json":
            raise OSError("power cut")
        return real_write(path, obj)

    monkeypatch.setattr(cifar_utils.files, "write_json", cut_before_state)
    with pytest.raises(OSError, match="power cut"):
        run(2)
    # Epoch 2's checkpoints were staged, not in place: best and last are still epoch 1's.
    assert {k: v for k, v in _bytes(tmp_path).items() if not k.startswith(".epoch-")} == after_1
    assert sorted(p.name for p in tmp_path.glob(".epoch-*")) == [
        ".epoch-00002.best.weights.h5",
        ".epoch-00002.last.weights.h5",
    ]
    monkeypatch.setattr(cifar_utils.files, "write_json", real_write)
    real_settle = cifar_utils.checkpoints.settle_checkpoints
    calls = []

    def cut_after_state(run_dir, epoch):
        calls.append(epoch)
        if len(calls) == 2:  # the commit's own settle (the first is the resume's)
            raise OSError("power cut")
        return real_settle(run_dir, epoch)

    monkeypatch.setattr(cifar_utils.checkpoints, "settle_checkpoints", cut_after_state)
    with pytest.raises(OSError, match="power cut"):
        run(2)  # the uncommitted epoch 2 was dropped, retrained, state.json committed
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["epoch"] == 2 and state["best_epoch"] == 2
    monkeypatch.setattr(cifar_utils.checkpoints, "settle_checkpoints", real_settle)
    resumed = run(2)  # settles the committed epoch: its checkpoints move into place
    assert resumed.initial_epoch == 2 and not list(tmp_path.glob(".epoch-*"))
    log = cu.read_log(tmp_path)  # the epoch committed but cut before its log row: rewritten
    assert log["epoch"] == [1, 2] and log["loss"] == resumed.history["loss"]
    model = dropout_model()
    model.optimizer.build(model.trainable_variables)
    model.load_weights(tmp_path / "last.weights.h5")
    assert int(model.optimizer.iterations) == 2 * STEPS
    best = dropout_model()
    best.load_weights(tmp_path / "best.weights.h5")
    for a, b in zip(best.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # epoch 2 was the best: same weights
    longer = run(3)  # and the log goes on from the committed epochs
    assert cu.read_log(tmp_path)["loss"] == longer.history["loss"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("monitor", "mode", "pick"),
    [
        ("val_loss", "auto", np.argmin),
        ("val_loss", "min", np.argmin),
        ("loss", "auto", np.argmin),
        ("val_loss", "max", np.argmax),
        ("val_accuracy", "auto", np.argmax),
    ],
)
def test_the_best_checkpoint_follows_the_monitor_mode(tmp_path, arrays, monitor, mode, pick):
    train, val = pipelines(arrays)
    model = dropout_model(lr=0.5, momentum=0.0)  # a bumpy run: the best is not the last
    state = cu.train(
        model, train, val, epochs=4, run_dir=tmp_path, monitor=monitor, mode=mode, verbose=0
    )
    values = state.history[monitor]
    assert state.best_epoch == int(pick(values)) + 1 and state.best == values[pick(values)]
    assert state.mode == ("max" if pick is np.argmax else "min")
    if monitor == "val_loss":  # the file holds that epoch's weights
        best = dropout_model()
        best.load_weights(tmp_path / "best.weights.h5")
        loss = best.evaluate(val, verbose=0)[0]
        assert loss == pytest.approx(state.best, rel=1e-5)


def test_monitor_mode_errors(tmp_path, arrays):
    train, val = pipelines(arrays)
    with pytest.raises(ValueError, match="mode must be"):
        cu.train(dropout_model(), train, val, epochs=1, run_dir=tmp_path, mode="sideways")
    with pytest.raises(ValueError, match="pass mode='min' or 'max'"):
        cu.train(dropout_model(), train, val, epochs=1, run_dir=tmp_path, monitor="val_f00")
    bare = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(100, activation="softmax"),
        ]
    )
    with pytest.raises(ValueError, match="compile the model"):
        cu.train(bare, train, val, epochs=1, run_dir=tmp_path)
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        cu.train(dropout_model(), train, val, epochs=0, run_dir=tmp_path)
    assert not (tmp_path / "state.json").exists()


# -------------------------------------------------------------------- provenance


@pytest.mark.slow
def test_only_the_whole_official_data_makes_a_full_cifar100_result(
    tmp_path, cifar_archive, monkeypatch
):
    """A model trained on noise, scored on arrays of CIFAR-100's sizes, is no CIFAR-100 run."""
    import hashlib

    rng = np.random.default_rng(0)
    model = dropout_model()
    noise = rng.integers(0, 256, (64, 32, 32, 3), np.uint8)
    train = cu.make_dataset(noise, np.arange(64) % 100, batch_size=32, training=True)
    run = cu.train(
        model, train, None, epochs=1, run_dir=tmp_path / "run", monitor="loss", verbose=0
    )
    big = rng.integers(0, 256, (10_000, 32, 32, 3), np.uint8), np.arange(10_000) % 100
    sizes = (big[0][:5000], big[1][:5000])
    out = tmp_path / "results"
    record, _ = cu.evaluate_and_save(
        model,
        run,
        output_dir=out,
        name="noise",
        train_images=45_000,
        val=sizes,
        test=big,
        image_size=32,
    )
    assert record["full_cifar100"] is False  # the sizes alone prove nothing

    (x, y), test, synthetic = cu.load_cifar100(cifar_archive, provenance=True)
    (xt, yt), val = cu.train_val_split(x, y, val_size=100, seed=0)
    record, _ = cu.evaluate_and_save(
        model,
        run,
        output_dir=out,
        name="synthetic",
        train_images=len(xt),
        val=val,
        test=test,
        data=synthetic,
    )
    assert record["full_cifar100"] is False and record["data"]["official"] is False

    # Pretend the generated archive is the official one: whole -> full, TRAIN_LIMIT -> not.
    monkeypatch.setattr(
        cifar_utils.data, "CIFAR100_MD5", hashlib.md5(cifar_archive.read_bytes()).hexdigest()
    )
    *_, official = cu.load_cifar100(cifar_archive, provenance=True)
    params = cu.NotebookParameters(
        {"EPOCHS": 1, "TRAIN_LIMIT": None, "DATA_DIR": "x"},
        {"EPOCHS": 100, "TRAIN_LIMIT": None, "DATA_DIR": None},
    )
    record, _ = cu.evaluate_and_save(
        model,
        run,
        output_dir=out,
        name="simple_cnn",
        train_images=len(xt),
        val=val,
        test=test,
        data=official,
        settings=params,
    )
    assert record["full_cifar100"] is True
    assert record["settings_changed"] == {"EPOCHS": 1, "DATA_DIR": "x"}
    (xl, yl), val = cu.train_val_split(x, y, val_size=100, seed=0, train_limit=1000)
    cu.evaluate_and_save(
        model,
        run,
        output_dir=out,
        name="complex_cnn",
        train_images=len(xl),
        val=val,
        test=test,
        data=official,
    )
    records, skipped = cu.full_runs(out)
    assert [r["model"] for r in records] == ["simple_cnn"]
    why = dict(skipped)
    assert "records no data provenance" in why["noise.json"]
    assert "not the official CIFAR-100 archive" in why["synthetic.json"]
    assert "trained on 1,100 of the 3,000 training images (TRAIN_LIMIT)" in why["complex_cnn.json"]
    table = cu.results_table(out)
    assert "| simple_cnn | 1,156 | 1 |" in table and "| EPOCHS=1 |" in table  # DATA_DIR: no
    assert "| complex_cnn | — |" in table  # only the seed's published figure
