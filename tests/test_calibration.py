"""Calibration (ECE, NLL, temperature scaling, its export) and flip test-time augmentation."""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import cifar_utils as cu


def _overconfident(n: int, classes: int = 10, sharpen: float = 3.0, seed: int = 0):
    """Labels drawn from softmax(z) and the probabilities softmax(sharpen * z) of a model
    that is ``sharpen`` times too sure of itself: (labels, true probs, overconfident probs)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in true])
    sharp = np.exp(sharpen * z) / np.exp(sharpen * z).sum(1, keepdims=True)
    return labels, true, sharp


def test_ece_of_hand_made_probabilities():
    # Perfectly calibrated: in each bin the share right equals the confidence.
    probs = np.array([[0.9, 0.1]] * 10 + [[0.3, 0.7]] * 10)
    labels = np.array([0] * 9 + [1] + [1] * 7 + [0] * 3)
    assert cu.expected_calibration_error(labels, probs) == pytest.approx(0, abs=1e-12)
    # Every confidence 1.0, 60% right: the gap is 0.4.
    sure = np.eye(5)[np.zeros(10, int)]
    assert cu.expected_calibration_error(np.array([0] * 6 + [1] * 4), sure) == pytest.approx(0.4)
    # Two bins: 0.55 confident at 1/2 right (gap 0.05), 0.95 at 1/2 right (gap 0.45).
    mixed = np.array([[0.55, 0.45], [0.55, 0.45], [0.95, 0.05], [0.95, 0.05]])
    assert cu.expected_calibration_error([0, 1, 0, 1], mixed) == pytest.approx(0.25)
    table = cu.reliability_bins([0, 1, 0, 1], mixed)
    assert table["count"].sum() == 4 and table["count"][8] == 2 and table["count"][14] == 2
    assert len(table["edges"]) == cu.ECE_BINS + 1 == 16


def test_a_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    # Bins are (b/3, (b+1)/3]: confidence 1.0 is in the last bin, 2/3 in (1/3, 2/3].
    probs = np.array([[1.0, 0.0], [2 / 3, 1 / 3]])
    table = cu.reliability_bins([0, 0], probs, bins=3)
    assert list(table["count"]) == [0, 1, 1]


def test_nll_matches_its_definition():
    labels, true, _ = _overconfident(200)
    expected = -np.mean(np.log(true[np.arange(200), labels]))
    assert cu.negative_log_likelihood(labels, true) == pytest.approx(expected, rel=1e-9)
    # A class never among the labels still counts (labels= all columns), and 0 is clipped.
    assert cu.negative_log_likelihood([0], [[0.0, 1.0, 0.0]]) == pytest.approx(36.04, abs=0.01)


def test_temperature_undoes_overconfidence_and_changes_no_prediction():
    labels, _, sharp = _overconfident(2000)
    temperature = cu.fit_temperature(labels[:1000], sharp[:1000])
    assert temperature == pytest.approx(3.0, rel=0.15)  # the sharpening it was made with
    calibrated = cu.apply_temperature(sharp, temperature)
    assert cu.negative_log_likelihood(labels[:1000], calibrated[:1000]) < (
        cu.negative_log_likelihood(labels[:1000], sharp[:1000]) - 0.2
    )
    assert cu.expected_calibration_error(labels[1000:], calibrated[1000:]) < 0.5 * (
        cu.expected_calibration_error(labels[1000:], sharp[1000:])
    )
    assert (calibrated.argmax(1) == sharp.argmax(1)).all()
    assert (np.argsort(-calibrated, 1)[:, :5] == np.argsort(-sharp, 1)[:, :5]).all()
    assert np.allclose(calibrated.sum(1), 1)
    summary = cu.calibration_summary(labels[:1000], sharp[:1000], labels[1000:], sharp[1000:])
    assert summary["temperature"] == round(temperature, 6)
    assert summary["test_nll_calibrated"] < summary["test_nll"]
    assert summary["test_ece_calibrated"] < summary["test_ece"]
    assert summary["val_nll_calibrated"] < summary["val_nll"]
    json.dumps(summary)


def test_a_fit_blind_to_underflowed_rows_says_so():
    labels, _, sharp = _overconfident(200)
    wrong = sharp.copy()
    wrong[:20] = 0.0
    wrong[np.arange(20), (labels[:20] + 1) % wrong.shape[1]] = 1.0  # sure and wrong: p(true) 0
    with pytest.warns(UserWarning, match="20 of 200 validation images give their true class"):
        cu.fit_temperature(labels, wrong)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none lost: no warning
        cu.fit_temperature(labels, sharp)


def test_a_fit_that_ends_at_the_range_says_so():
    # Always right, by a hair (0.11 against 0.099): sharper is better even at the lowest T.
    always_right = np.full((100, 10), 0.89 / 9)
    always_right[:, 0] = 0.11
    with pytest.warns(UserWarning, match=r"sits at the end of the range \(0.05, 20.0\)"):
        assert cu.fit_temperature(np.zeros(100, int), always_right) == pytest.approx(0.05, 1e-2)
    # Right no more often than chance but sure of it: flatter is always better.
    labels = np.arange(100) % 10
    with pytest.warns(UserWarning, match="sits at the end of the range"):
        assert cu.fit_temperature(labels, always_right) == pytest.approx(20, rel=1e-2)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: cu.expected_calibration_error([0, 1], [[0.5, 0.6], [0.5, 0.5]]), "summing to 1"),
        (lambda: cu.expected_calibration_error([0, 2], [[0.5, 0.5], [0.5, 0.5]]), "outside"),
        (lambda: cu.expected_calibration_error([0], [[0.5, 0.5], [0.5, 0.5]]), "1 labels for 2"),
        (lambda: cu.reliability_bins([0], [[1.0, 0.0]], bins=0), "bins must be an int"),
        (lambda: cu.apply_temperature([[1.0, 0.0]], 0), "finite number > 0"),
        (lambda: cu.apply_temperature([[1.0, 0.0]], float("nan")), "finite number > 0"),
        (lambda: cu.apply_temperature([[np.nan, 1.0]], 2), "finite"),
    ],
)
def test_bad_input_gets_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def _small_classifier(classes: int = 10):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    init = keras.initializers.RandomNormal(0, 3, seed=0)
    outputs = keras.layers.Dense(classes, activation="softmax", kernel_initializer=init)(h)
    return keras.Model(inputs, outputs)


def test_the_exported_model_applies_the_temperature_without_this_package(tmp_path):
    model = _small_classifier(100)
    x = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    probs = cu.predict_proba(model, x)
    calibrated = cu.with_temperature(model, 2.5)
    expected = cu.apply_temperature(probs, 2.5)
    assert np.allclose(cu.predict_proba(calibrated, x), expected, atol=1e-6)
    assert np.allclose(cu.predict_proba(model, x), probs)  # the model is left as it was
    # Scores divided by T: the same Grad-CAM heatmaps (each is divided by its maximum).
    assert np.abs(cu.grad_cam(calibrated, x) - cu.grad_cam(model, x)).max() < 1e-5
    path = cu.export_model(calibrated, tmp_path / "calibrated.keras", temperature=2.5)
    np.save(tmp_path / "x.npy", x.astype(np.float32) / 255)
    code = (
        "import sys, keras, numpy as np\n"
        f"model = keras.saving.load_model({str(path)!r}, compile=False)\n"
        "np.save('p.npy', model.predict(np.load('x.npy'), verbose=0))\n"
        "assert not any(m.startswith(('cifar_utils', 'efficientnet')) for m in sys.modules)\n"
    )  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = np.load(tmp_path / "p.npy")
    assert np.allclose(loaded, expected, atol=1e-6)
    assert (loaded.argmax(1) == probs.argmax(1)).all()
    assert cu.load_exported_model(path)[2] == {"temperature": 2.5}


def test_with_temperature_refuses_a_model_without_a_softmax_head():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    with pytest.raises(ValueError, match="Dense layer with softmax"):
        cu.with_temperature(model, 2.0)
    with pytest.raises(ValueError, match="number > 0"):
        cu.with_temperature(_small_classifier(), "2")


def test_flip_tta_changes_nothing_on_mirror_symmetric_images():
    model = _small_classifier()
    half = np.random.default_rng(2).integers(0, 256, (12, 32, 16, 3), dtype=np.uint8)
    symmetric = np.concatenate([half, half[:, :, ::-1]], axis=2)
    probs = cu.predict_proba(model, symmetric)
    tta = cu.flip_tta_proba(model, symmetric)
    assert np.allclose(tta, probs, atol=1e-6)
    labels = np.arange(12) % 10
    summary = cu.tta_summary(labels, probs, tta)
    assert summary["test_tta_right_to_wrong"] == summary["test_tta_wrong_to_right"] == 0
    assert summary["test_tta_top1"] == pytest.approx(cu.top_k_accuracy(labels, probs, 1), abs=1e-6)


def test_flip_tta_counts_what_it_turned():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))  # a dense layer on the pixels: the mirror often differs
    init = keras.initializers.RandomNormal(0, 0.1, seed=0)
    outputs = keras.layers.Dense(10, "softmax", kernel_initializer=init)(
        keras.layers.Flatten()(inputs)
    )
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(3).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    probs = cu.predict_proba(model, x)
    mirrored = cu.predict_proba(model, x[:, :, ::-1])
    tta = cu.flip_tta_proba(model, x)
    assert np.allclose(tta, (probs + mirrored) / 2, atol=1e-6)
    labels = mirrored.argmax(1)  # the mirror is right everywhere
    summary = cu.tta_summary(labels, probs, tta)
    before, after = probs.argmax(1) == labels, tta.argmax(1) == labels
    assert summary["test_tta_wrong_to_right"] == int(np.sum(~before & after)) > 0
    assert summary["test_tta_right_to_wrong"] == 0


def test_reliability_diagram(tmp_path):
    labels, _, sharp = _overconfident(500)
    calibrated = cu.apply_temperature(sharp, cu.fit_temperature(labels, sharp))
    fig = cu.plot_reliability(labels, sharp, calibrated, path=tmp_path / "reliability.png")
    before, after = (cu.expected_calibration_error(labels, p) for p in (sharp, calibrated))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [f"before temperature scaling\nECE {before:.4f} (15 bins)",
                      f"after temperature scaling\nECE {after:.4f} (15 bins)"]  # fmt: skip
    heights = [bar.get_height() for bar in fig.axes[0].patches]
    table = cu.reliability_bins(labels, sharp)
    assert heights == pytest.approx(np.nan_to_num(table["accuracy"]).tolist())
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert cu.plot_reliability(labels, sharp).axes[0].get_title() == f"ECE {before:.4f} (15 bins)"
