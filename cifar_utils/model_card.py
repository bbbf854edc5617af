"""Model cards: what an exported model is, made only from its run's results record.

:func:`card_facts` picks the facts from a record (and a series' spread, when the run is
one of several seeds); :func:`card_markdown` writes them as Markdown. :func:`export_model`
keeps the facts in the ``.keras`` file's metadata and writes the card beside it, so the
``predict --info`` command prints the very same text from the file alone.
"""

from __future__ import annotations

from pathlib import Path

from .published import TEST_TOP1
from .report import RUN_ONLY_PARAMETERS, format_spread, why_not_full

#: The test figures a card gives for its own run: (record key, label).
CARD_FIGURES = (
    ("exported_test_top1", "Test top-1 of this file (computing in float32)"),
    ("exported_test_top5", "Test top-5 of this file (computing in float32)"),
    ("test_top1", "Test top-1 of the model as trained"),
    ("test_top5", "Test top-5 of the model as trained"),
    ("test_superclass_top1", "Test superclass top-1 (20 coarse classes)"),
    ("test_ece", "Test expected calibration error of the model as trained (15 bins)"),
    ("test_ece_calibrated", "Test expected calibration error of this file (temperature-scaled)"),
    ("test_tta_top1", "Test top-1 of the model as trained with flip test-time augmentation"),
)


def card_path(model_path) -> Path:
    """Where the card of ``model_path`` goes: ``results/simple_cnn.keras`` ->
    ``results/simple_cnn.card.md``."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.card.md")


def card_facts(record: dict, series: dict | None = None) -> dict:
    """The facts of a model card, JSON-able, from a run's results record alone.

    Args:
        record: the dict :func:`evaluate_and_save` wrote (``OUTPUT_DIR/<model>.json``).
        series: :func:`series_summary` of the series the run belongs to (runs differing
            only in ``SEED``), or ``None`` for a run on its own.

    Returns:
        ``model``, ``not_cifar100`` (``None`` when the data were the official archive,
        else why not), ``not_full`` (why the run is no full CIFAR-100 run, or ``None``),
        ``data`` (md5, the check made, the archive's image counts), ``params``,
        ``training`` (epochs, best epoch, seconds, precision, hardware, batch size, seed,
        images, settings that differ from the notebook's defaults, weights, finished),
        ``figures`` (the keys of :data:`CARD_FIGURES` the record holds, floats in [0, 1]),
        ``temperature`` (folded into the file's softmax, or ``None``),
        ``series`` and ``published_test_top1`` (the seed's figure, or ``None``).

    Raises:
        ValueError: ``record`` is no model's results record (no ``model`` or no test top-1).
    """
    if not isinstance(record, dict) or "model" not in record or "test_top1" not in record:
        raise ValueError(
            "A model card needs the run's results record (OUTPUT_DIR/<model>.json, as "
            "evaluate_and_save returns it), with 'model' and 'test_top1'"
        )
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    why = why_not_full(record)
    official = bool(data.get("official"))
    settings = record.get("settings") or {}
    changed = record.get("settings_changed") or {}
    return {
        "model": record["model"],
        "not_cifar100": None if official else (data.get("check") or "no data provenance"),
        "not_full": why,
        "data": {k: data.get(k) for k in ("md5", "check", "train_images", "test_images")},
        "params": record.get("params"),
        "training": {
            "epochs": record.get("epochs"),
            "best_epoch": record.get("best_epoch"),
            "seconds": record.get("seconds"),
            "precision": record.get("precision"),
            "hardware": record.get("hardware"),
            "batch_size": record.get("batch_size"),
            "seed": settings.get("SEED", changed.get("SEED")),
            "train_images": record.get("train_images"),
            "val_images": record.get("val_images"),
            "test_images": record.get("test_images"),
            "weights": record.get("weights"),
            "settings_changed": {
                k: v for k, v in sorted(changed.items()) if k not in RUN_ONLY_PARAMETERS
            },
            "finished": record.get("finished"),
        },
        "figures": {k: record[k] for k, _ in CARD_FIGURES if record.get(k) is not None},
        "temperature": record.get("temperature"),
        "series": series,
        "published_test_top1": TEST_TOP1.get(record["model"]),
    }


def _first_line(facts: dict) -> str:
    model = facts["model"]
    if facts["not_cifar100"]:
        return (
            f"# {model}: NOT trained on CIFAR-100 ({facts['not_cifar100']}); "
            "its figures say nothing about CIFAR-100"
        )
    if facts["not_full"]:
        return f"# {model}: a quick run on part of CIFAR-100, not a full run ({facts['not_full']})"
    return f"# {model}: a CIFAR-100 classifier (a full run on the official archive)"


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "not recorded"


def card_markdown(facts: dict) -> str:
    """The Markdown card of :func:`card_facts`: the same text wherever it is printed.

    The first line says whether the model was trained on all of official CIFAR-100, on
    part of it, or on other data (then: NOT trained on CIFAR-100).
    """
    lines = [_first_line(facts), ""]
    lines += _model_and_data(facts) + _training(facts) + _figures(facts) + _MEANING
    return "\n".join(lines) + "\n"


def _model_and_data(facts: dict) -> list[str]:
    training, params = facts["training"], facts["params"]
    counts = params if isinstance(params, dict) else {"total": params}
    return [
        "## Model",
        "",
        f"- Network: `{facts['model']}`; parameters: {_count(counts.get('total'))} "
        f"(trainable {_count(counts.get('trainable'))}, non-trainable "
        f"{_count(counts.get('non_trainable'))}).",
        "- Input: float32 RGB images (B, 32, 32, 3) with values in [0, 1] (pixels / 255). "
        "Output: (B, 100) probabilities over the 100 CIFAR-100 fine classes; the class "
        "names travel inside the .keras file (`class_names.json`).",
        f"- Trained in {training['precision'] or 'an unrecorded precision'}; the file "
        "computes in float32.",
        *(
            [
                f"- Temperature-scaled: the class scores before the softmax are divided by "
                f"{facts['temperature']:.4f}, fitted on the validation images (Guo et al. "
                "2017); the ranking of the classes, so every top-k, is the model's own."
            ]
            if facts.get("temperature")
            else []
        ),
        "",
        "## Data",
        "",
        "- "
        + (
            f"NOT the official CIFAR-100 archive: {facts['not_cifar100']}."
            if facts["not_cifar100"]
            else f"The official CIFAR-100 archive ({facts['data']['check']})."
        ),
        f"- Trained on {_count(training['train_images'])} images, model selection on "
        f"{_count(training['val_images'])} held-out training images, tested on "
        f"{_count(training['test_images'])} test images (the archive has "
        f"{_count(facts['data']['train_images'])} training and "
        f"{_count(facts['data']['test_images'])} test images).",
        "",
    ]


def _training(facts: dict) -> list[str]:
    training = facts["training"]
    return [
        "## Training",
        "",
        f"- Epochs: {training['epochs']} (best validation top-1 at epoch "
        f"{training['best_epoch']}); training time {training['seconds']} s on "
        f"{training['hardware'] or 'unrecorded hardware'}.",
        f"- SEED {training['seed']}; batch size {training['batch_size']}"
        + (f"; start weights {training['weights']}" if training["weights"] else "")
        + "; settings that differ from the notebook's defaults: "
        + (", ".join(f"{k}={v}" for k, v in training["settings_changed"].items()) or "none")
        + f". Finished {training['finished']}.",
        "",
    ]


def _figures(facts: dict) -> list[str]:
    lines = ["## Test figures", ""]
    lines += [
        f"- {label}: {facts['figures'][key]:.4f}"
        for key, label in CARD_FIGURES
        if key in facts["figures"]
    ]
    series = facts.get("series")
    if series and series["n"] > 1:
        lines += [
            "",
            f"This run is one of a series of {series['n']} runs with the same settings and "
            f"SEEDs {', '.join(map(str, series['seeds']))}; over the series (mean ± sample "
            "standard deviation, n):",
            "",
        ]
        labels = dict(CARD_FIGURES)
        lines += [
            f"- {labels.get(key, key).replace(' of the model as trained', '')}: "
            f"{format_spread(m['mean'], m['std'], m['n'])}"
            for key, m in series["metrics"].items()
        ]
    else:
        lines += ["", "A single run: no spread over seeds is known for these figures."]
    if facts["published_test_top1"] is not None:
        lines.append(
            f"\nThe seed project published a test top-1 of {facts['published_test_top1']:.3f} "
            "for this network (one run; not measured here)."
        )
    return lines


_MEANING = [
    "",
    "## What the numbers mean",
    "",
    "- Top-1: the share of the test images whose most probable class is the true one; "
    "top-5: whose true class is among the 5 most probable; superclass top-1: the same "
    "over the 20 coarse classes. Chance is 0.01, 0.05 and 0.05.",
    "- The test images were scored once, after the best epoch was picked on the "
    "validation images. Runs with another SEED differ: a single figure is one draw.",
    "",
    "## What this model cannot do",
    "",
    "- It knows only the 100 CIFAR-100 classes: any other picture still gets one of them.",
    "- It sees 32x32 images: a photo is shrunk to 32x32 first, losing detail.",
    "- It was trained and tested on no other data; figures on other images are unknown.",
]
