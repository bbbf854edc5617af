"""Results files: a run scored (``evaluate_and_save``) and recorded with its hardware line.

Used by each notebook's "Test accuracy" step; ``report`` reads the files back.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from .calibration import (
    calibration_summary,
    expected_calibration_error,
    flip_tta_proba,
    negative_log_likelihood,
    tta_summary,
    with_temperature,
)
from .devices import cpu_info, is_chief
from .evaluation import evaluation_summary, predict_proba
from .files import write_json
from .models import float32_copy, parameter_counts
from .plans import network_digest


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_results(output_dir, name: str, **fields) -> Path:
    """Write ``output_dir/<name>.json`` (atomically): ``fields`` plus the model name and a
    timestamp. Only the chief of a multi-worker run writes (:func:`is_chief`).

    Returns:
        The file's path (also on a worker that wrote nothing).
    """
    record = {"model": name, "finished": _now(), **fields}  # fields may give "finished"
    path = Path(output_dir) / f"{name}.json"
    return write_json(path, record) if is_chief() else path


def score_model(model, x, y, split: str = "test") -> tuple[dict, np.ndarray]:
    """Score ``model`` (its weights as they are) on one split.

    Args:
        model: a model with probability outputs.
        x: uint8 images ``(N, 32, 32, 3)``; y: int fine labels ``(N,)`` in [0, 99].
        split: the key prefix, e.g. ``"val"`` or ``"test"``.

    Returns:
        ``(scores, probs)``: :func:`evaluation_summary` (``{split}_top1``, ... floats in
        [0, 1]) and the float32 probabilities ``(N, 100)``.

    Raises:
        NotProbabilities: the outputs are no probabilities (a diverged model).
    """
    probs = predict_proba(model, x)
    return evaluation_summary(y, probs, split), probs


def calibration_scores(model, val_probs, y_val, test, test_probs) -> dict:
    """Temperature scaling and flip test-time augmentation, for the results record.

    The temperature is fitted on the validation set (:func:`calibration_summary`); the
    calibrated test figures and ``exported_test_top1``/``_top5`` are those of the file the
    notebook exports: ``with_temperature(model, T)`` computing in float32, scored again.
    Flip TTA is scored on ``model`` as it is (beside the plain figures, never instead).

    Args:
        model: the scored model; val_probs, test_probs: its float32 probabilities (N, 100);
            y_val: int labels (N,); test: ``(x uint8 (N, 32, 32, 3), y int (N,))``.

    Returns:
        ``temperature``, ``val_nll``, ``val_nll_calibrated``, ``test_ece``, ``test_nll``,
        ``test_ece_calibrated``, ``test_nll_calibrated`` (floats; ECE in [0, 1]),
        ``exported_test_top1``/``_top5`` and :func:`tta_summary`'s ``test_tta_*``.

    Raises:
        ValueError: the model does not end in a softmax Dense layer (:func:`with_temperature`).
    """
    x_test, y_test = test
    figures = calibration_summary(y_val, val_probs, y_test, test_probs)
    calibrated = float32_copy(with_temperature(model, figures["temperature"]))
    scores, probs = score_model(calibrated, x_test, y_test, "exported_test")
    figures.update(
        test_ece_calibrated=round(expected_calibration_error(y_test, probs), 6),
        test_nll_calibrated=round(negative_log_likelihood(y_test, probs), 6),
        exported_test_top1=scores["exported_test_top1"],
        exported_test_top5=scores["exported_test_top5"],
    )
    return figures | tta_summary(y_test, test_probs, flip_tta_proba(model, x_test))


def run_record(run, model, *, train_images: int, scores: dict, data=None, settings=None) -> dict:
    """The results record of a trained, scored run (without writing it).

    Args:
        run: the :class:`RunState` of :func:`train` or :func:`join_runs`.
        model: the scored model: its dtype policy and ``jit_compile`` (XLA as Keras used
            it, not as asked) are recorded.
        train_images: images trained on (int).
        scores: the merged :func:`score_model` and :func:`calibration_scores` dicts.
        data: the provenance from ``load_cifar100(..., provenance=True)``. ``full_cifar100``
            only for the official archive, all its training images (train + validation)
            and all its test images; without ``data``: never.
        settings: the notebook's checked parameters (:func:`check_parameters`).

    Returns:
        The record: parameter counts, phases, epochs, seconds, best epoch, hardware,
        ``precision``, ``xla``, provenance, settings, the scores and the history.
    """
    params = run.params or parameter_counts(model)
    seen = (train_images + scores.get("val_images", 0), scores.get("test_images"))
    whole = data is not None and seen == (data.get("train_images"), data.get("test_images"))
    return {
        "params": params,
        "phases": run.phases
        or [{"name": "train", "epochs": run.epoch, "trainable_params": params["trainable"]}],
        "network": network_digest(model),  # an edited network cell is another network
        "epochs": run.epoch,
        "replanned_from": run.replanned_from,  # EPOCHS changed while resuming
        "best_epoch": run.best_epoch,
        "seconds": round(run.seconds, 1),
        "hardware": describe_hardware(),
        "precision": model.dtype_policy.name,
        "xla": bool(model.jit_compile),
        "train_images": train_images,
        "full_cifar100": bool(whole and data.get("official")),
        "data": data,
        "settings": dict(settings) if settings is not None else None,
        "settings_changed": settings.changed() if hasattr(settings, "changed") else None,
        **scores,
        "history": run.history,
    }


def evaluate_and_save(
    model,
    run,
    *,
    output_dir,
    name: str,
    train_images: int,
    val,
    test,
    data=None,
    settings=None,
    **extra,
) -> tuple[dict, np.ndarray]:
    """Load ``run``'s best checkpoint, score it on ``val`` and ``test``, write the record.

    The record also holds the temperature fitted on ``val``, the test calibration before
    and after it, and flip TTA (:func:`calibration_scores`).

    Args:
        model: the trained model (its weights become ``best.weights.h5``).
        run, train_images, data, settings: as for :func:`run_record`.
        output_dir, name: the record goes to ``output_dir/<name>.json``.
        val, test: ``(x uint8 (N, 32, 32, 3), y int (N,))`` pairs.
        extra: more JSON-able fields (batch size, weights source, ...).

    Returns:
        ``(record, test_probs)``: the record as written (what :func:`export_model` takes as
        ``record=``) and float32 ``(N, 100)`` probabilities.

    Raises:
        NotProbabilities: the model's outputs are no probabilities (a diverged model).
    """
    model.load_weights(Path(run.run_dir) / "best.weights.h5")
    val_scores, val_probs = score_model(model, *val, "val")
    test_scores, test_probs = score_model(model, *test, "test")
    extra_scores = calibration_scores(model, val_probs, val[1], test, test_probs)
    scores = {**val_scores, **test_scores, **extra_scores}
    record = run_record(run, model, train_images=train_images, scores=scores, data=data,
                        settings=settings)  # fmt: skip
    record = {"model": name, "finished": _now(), **record, **extra}
    write_results(output_dir, name, **record)
    return record, test_probs


def describe_hardware() -> str:
    """One line naming this machine's CPU (model, logical cores) and visible GPUs.

    E.g. ``"AMD EPYC (2 logical CPUs); GPU: NVIDIA H200"``. GPU names come from
    ``tf.config.experimental.get_device_details``; the CPU model from ``/proc/cpuinfo``
    (Linux) or ``platform.processor()``. Store it in results files (``hardware=...``).
    """
    cpu = cpu_info()
    text = f"{cpu['model']} ({cpu['cores']} logical CPUs)"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names = [
            tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus
        ]
        text += "; GPU: " + ", ".join(names)
    return text
