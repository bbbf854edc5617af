"""Results files: ``evaluate_and_save``, the README's comparison table, the hardware line.

Used by each notebook's "Test accuracy" step and the ``report`` command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import data as dataset  # dataset.CIFAR100_MD5 read at call time (tests change it)
from .devices import cpu_info, is_chief
from .evaluation import evaluation_summary, predict_proba
from .files import atomic_path, write_json
from .models import float32_copy, parameter_counts
from .published import TEST_TOP1, TRAINING_SECONDS


def write_results(output_dir, name: str, **fields) -> Path:
    """Write ``output_dir/<name>.json`` (atomically): ``fields`` plus the model name and a
    timestamp. Only the chief of a multi-worker run writes (:func:`is_chief`).

    Returns:
        The file's path (also on a worker that wrote nothing).
    """
    record = {"model": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
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


def exported_scores(model, x, y) -> dict:
    """``exported_test_top1``/``_top5``: the weights computing in float32, as the exported
    ``.keras`` file does (equal to the model's own for a float32 run)."""
    scores, _ = score_model(float32_copy(model), x, y, "exported_test")
    return {k: scores[k] for k in ("exported_test_top1", "exported_test_top5")}


def run_record(run, model, *, train_images: int, scores: dict, data=None, settings=None) -> dict:
    """The results record of a trained, scored run (without writing it).

    Args:
        run: the :class:`RunState` of :func:`train` or :func:`join_runs`.
        model: the scored model: its dtype policy and ``jit_compile`` (XLA as Keras used
            it, not as asked) are recorded.
        train_images: images trained on (int).
        scores: the merged :func:`score_model` and :func:`exported_scores` dicts.
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
        "epochs": run.epoch,
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

    Args:
        model: the trained model (its weights become ``best.weights.h5``).
        run, train_images, data, settings: as for :func:`run_record`.
        output_dir, name: the record goes to ``output_dir/<name>.json``.
        val, test: ``(x uint8 (N, 32, 32, 3), y int (N,))`` pairs.
        extra: more JSON-able fields (batch size, weights source, ...).

    Returns:
        ``(record, test_probs)``: the record written and float32 ``(N, 100)`` probabilities.

    Raises:
        NotProbabilities: the model's outputs are no probabilities (a diverged model).
    """
    model.load_weights(Path(run.run_dir) / "best.weights.h5")
    val_scores, _ = score_model(model, *val, "val")
    test_scores, test_probs = score_model(model, *test, "test")
    scores = {**val_scores, **test_scores, **exported_scores(model, *test)}
    record = run_record(run, model, train_images=train_images, scores=scores, data=data,
                        settings=settings)  # fmt: skip
    write_results(output_dir, name, **record, **extra)
    return record | extra, test_probs


def markdown_table(rows: list[dict], columns=None) -> str:
    """A GitHub markdown table of ``rows`` (dicts); ``columns`` picks and orders the keys.

    ``columns`` is a list of keys, or of ``(key, header)`` pairs; default: the first row's
    keys. Floats print with 3 decimals, missing values as an em dash. (pandas'
    ``DataFrame.to_markdown`` does this with pandas and tabulate, which the project does not
    otherwise need.)
    """
    if columns is None:
        columns = list(rows[0]) if rows else []
    columns = [c if isinstance(c, tuple) else (c, c) for c in columns]

    def cell(value):
        if value is None:
            return "—"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value).replace("|", "\\|")

    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


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


RESULTS_START = "<!-- results:start -->"
RESULTS_END = "<!-- results:end -->"


def total_params(params) -> int | None:
    """The total parameter count from a results file's ``params`` field: the dict of
    :func:`cifar_utils.models.parameter_counts` (its ``total``) or, in older files, an int.
    ``None`` when it is neither (missing, or not a whole number)."""
    total = params.get("total") if isinstance(params, dict) else params
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def _format_seconds(seconds) -> str | None:
    if seconds is None:
        return None
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _why_not_full(record) -> str | None:
    """Why a results record may not stand in the README table; ``None`` if it may."""
    if not isinstance(record, dict) or "model" not in record:
        return "not a model's results file (no 'model' field)"
    if "val_top1" not in record and "test_top1" not in record:
        return "holds no val_top1 or test_top1"
    data = record.get("data")
    if not isinstance(data, dict):
        return "records no data provenance, so nothing shows it ran on CIFAR-100"
    if not data.get("official") or data.get("md5") != dataset.CIFAR100_MD5:
        return f"not the official CIFAR-100 archive ({data.get('check', 'md5 not checked')})"
    seen = record.get("train_images", 0) + record.get("val_images", 0)
    if seen != data.get("train_images"):
        return (
            f"trained on {seen:,} of the {data.get('train_images'):,} training images (TRAIN_LIMIT)"
        )
    if record.get("test_images") != data.get("test_images"):
        return f"tested on {record.get('test_images')} of {data.get('test_images')} test images"
    if record.get("full_cifar100") is not True:
        return "not marked full_cifar100"
    return None


def full_runs(results_dir="results") -> tuple[list[dict], list[tuple[str, str]]]:
    """The results records of runs on all of official CIFAR-100 in ``results_dir``.

    A record counts when it has ``"model"``, a ``val_top1`` or ``test_top1``, data
    provenance showing the official archive (md5 :data:`CIFAR100_MD5`, see
    :func:`data_provenance`) and image counts showing all of its training and test images
    were used (no ``TRAIN_LIMIT``), and ``"full_cifar100": true`` (written by
    :func:`evaluate_and_save`). Nothing else reaches the README table.

    Returns:
        ``(records, skipped)``: the dicts of the ``*.json`` files that count, and
        ``(file name, why it does not count)`` for every other ``.json`` file (quick runs,
        runs on other data such as the generated archive, ``benchmark.json``).

    Raises:
        ValueError: a ``.json`` file in ``results_dir`` is not valid JSON.
    """
    records, skipped = [], []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
        why = _why_not_full(record)
        if why:
            skipped.append((path.name, why))
        else:
            records.append(record)
    return records, skipped


#: Notebook parameters that say where files go or how to watch a run, not what is trained.
RUN_ONLY_PARAMETERS = ("DATA_DIR", "OUTPUT_DIR", "RESUME", "TENSORBOARD", "PHOTO")


def _settings_cell(record: dict) -> str | None:
    changed = record.get("settings_changed") or {}
    shown = [f"{k}={v}" for k, v in sorted(changed.items()) if k not in RUN_ONLY_PARAMETERS]
    return ", ".join(shown) if shown else "defaults"


def results_table(results_dir="results") -> str:
    """Markdown table comparing the full CIFAR-100 runs recorded in ``results_dir/*.json``.

    Only records that :func:`full_runs` accepts count. Columns come from their fields:
    ``params`` (int, or the dict of :func:`parameter_counts`), ``epochs``, ``seconds``
    (training wall time), ``val_top1``, ``val_top5``, ``test_top1``, ``test_top5``,
    ``hardware`` (see :func:`describe_hardware`), and the notebook settings that differ
    from its defaults (``settings_changed``, without where files went: "defaults" if
    none); a missing field shows as an em dash. One more column gives the seed's
    published test top-1 and training time (:mod:`cifar_utils.published`), clearly labelled;
    models with a
    published figure but no run get a row with only that figure.

    Raises:
        ValueError: a ``.json`` file in ``results_dir`` is not valid JSON.
    """
    rows = {}
    for record in full_runs(results_dir)[0]:
        params = total_params(record.get("params"))
        rows[record["model"]] = {
            "model": record["model"],
            "params": f"{params:,}" if params is not None else None,
            "epochs": record.get("epochs"),
            "time": _format_seconds(record.get("seconds")),
            **{k: record.get(k) for k in ("val_top1", "val_top5", "test_top1", "test_top5")},
            "hardware": record.get("hardware"),
            "settings": _settings_cell(record),
        }
    for model in TEST_TOP1:
        rows.setdefault(model, {"model": model})
    for row in rows.values():
        if row["model"] in TEST_TOP1:
            seconds = TRAINING_SECONDS[row["model"]]
            row["published"] = f"{TEST_TOP1[row['model']]:.3f} (about {_format_seconds(seconds)})"
    columns = [
        ("model", "Model"),
        ("params", "Params"),
        ("epochs", "Epochs"),
        ("time", "Train time"),
        ("val_top1", "Val top-1"),
        ("val_top5", "Val top-5"),
        ("test_top1", "Test top-1"),
        ("test_top5", "Test top-5"),
        ("hardware", "Hardware"),
        ("settings", "Settings (not the notebook's defaults)"),
        ("published", "Seed's published test top-1 and training time (not measured here)"),
    ]
    return markdown_table(list(rows.values()), columns)


def update_readme_results(results_dir="results", readme="README.md") -> str:
    """Write :func:`results_table` into ``readme`` between the results markers.

    Only the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` changes
    (the file is rewritten atomically); everything else is kept byte for byte.

    Returns:
        The table written.

    Raises:
        FileNotFoundError: no ``readme``.
        ValueError: the markers are missing, repeated or out of order.
    """
    readme = Path(readme)
    with open(readme, encoding="utf-8", newline="") as f:  # line ends kept as they are
        text = f.read()
    if text.count(RESULTS_START) != 1 or text.count(RESULTS_END) != 1:
        raise ValueError(
            f"{readme} must hold the lines '{RESULTS_START}' and '{RESULTS_END}' exactly once "
            "each (found them "
            f"{text.count(RESULTS_START)} and {text.count(RESULTS_END)} times); add them where "
            "the results table belongs"
        )
    start = text.index(RESULTS_START) + len(RESULTS_START)
    end = text.index(RESULTS_END)
    if end < start:
        raise ValueError(f"In {readme}, '{RESULTS_END}' comes before '{RESULTS_START}'")
    table = results_table(results_dir)
    with atomic_path(readme) as tmp:
        end_of_line = "\r\n" if "\r\n" in text else "\n"
        block = end_of_line + table.replace("\n", end_of_line) + end_of_line
        tmp.write_text(text[:start] + block + text[end:], encoding="utf-8", newline="")
    return table
