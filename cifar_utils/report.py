"""The README's comparison table: results files read back, runs pooled over seeds (mean ±
sample standard deviation), and why two runs are not pooled. Used by the ``report`` command.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import data as dataset  # dataset.CIFAR100_MD5 read at call time (tests change it)
from .files import atomic_path
from .published import TEST_TOP1, TRAINING_SECONDS


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


def why_not_full(record) -> str | None:
    """Why a results record may not stand in the README table; ``None`` if it may.

    Args:
        record: a parsed results file (any JSON value).

    Returns:
        ``None`` for a run on all of official CIFAR-100 (see :func:`full_runs`), else the
        first reason found, in words (e.g. ``"trained on 1,100 of the 3,000 training
        images (TRAIN_LIMIT)"``).
    """
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


#: The file a series of runs (``python -m cifar_utils repeat``) keeps in its folder, beside
#: one ``seed-<n>/`` folder per run; the report reads the results files in those folders.
SERIES_FILE = "series.json"


def results_files(results_dir="results") -> list[Path]:
    """The results files the report reads: ``results_dir/*.json`` and, for every series
    folder under ``results_dir`` (one holding :data:`SERIES_FILE`), its ``seed-*/*.json``.

    Returns:
        The paths, sorted within each folder; ``[]`` when ``results_dir`` does not exist.
    """
    root = Path(results_dir)
    files = [p for p in sorted(root.glob("*.json")) if p.name != SERIES_FILE]
    for manifest in sorted(root.rglob(SERIES_FILE)):
        files += sorted(manifest.parent.glob("seed-*/*.json"))
    return files


def read_results(results_dir="results") -> list[tuple[Path, dict, str | None]]:
    """Every file of :func:`results_files` with its record and why it is no full run.

    Returns:
        ``(path, record, why)`` per file: ``why`` is ``None`` for a run on all of official
        CIFAR-100 (see :func:`full_runs`), else the reason in words.

    Raises:
        ValueError: a file is not valid JSON (a run cut while writing it, say), naming it.
    """
    found = []
    for path in results_files(results_dir):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); fix or remove it") from None
        found.append((path, record, why_not_full(record)))
    return found


def full_runs(results_dir="results") -> tuple[list[dict], list[tuple[str, str]]]:
    """The results records of runs on all of official CIFAR-100 in ``results_dir``.

    A record counts when it has ``"model"``, a ``val_top1`` or ``test_top1``, data
    provenance showing the official archive (md5 :data:`CIFAR100_MD5`, see
    :func:`data_provenance`) and image counts showing all of its training and test images
    were used (no ``TRAIN_LIMIT``), and ``"full_cifar100": true`` (written by
    :func:`evaluate_and_save`). Nothing else reaches the README table. The files read are
    those of :func:`results_files` (series runs included).

    Returns:
        ``(records, skipped)``: the dicts of the ``*.json`` files that count, and
        ``(file name, why it does not count)`` for every other ``.json`` file (quick runs,
        runs on other data such as the generated archive, ``benchmark.json``); a series
        run's file is named by its path below ``results_dir``.

    Raises:
        ValueError: a ``.json`` file in ``results_dir`` is not valid JSON.
    """
    records, skipped = [], []
    for path, record, why in read_results(results_dir):
        if why:
            skipped.append((path.relative_to(results_dir).as_posix(), why))
        else:
            records.append(record)
    return records, skipped


#: Notebook parameters that say where files go or how to watch a run, not what is trained.
RUN_ONLY_PARAMETERS = ("DATA_DIR", "OUTPUT_DIR", "RESUME", "TENSORBOARD", "PHOTO")

#: The test figures given as mean ± spread over a series: (record key, column header).
SPREAD_METRICS = (
    ("test_top1", "Test top-1"),
    ("test_top5", "Test top-5"),
    ("test_superclass_top1", "Test superclass top-1"),
    ("test_ece", "Test ECE"),
    ("test_tta_top1", "Test top-1 with flip TTA"),
)
#: Of those, the columns a table shows only when some record holds them (older runs
#: recorded no calibration or TTA).
OPTIONAL_METRICS = ("test_ece", "test_tta_top1")


def _settings_cell(record: dict) -> str | None:
    changed = record.get("settings_changed") or {}
    shown = [
        f"{k}={v}"
        for k, v in sorted(changed.items())
        if k not in RUN_ONLY_PARAMETERS and k != "SEED"  # SEED: the table's own column
    ]
    return ", ".join(shown) if shown else "defaults"


def run_seed(record: dict) -> int | None:
    """The ``SEED`` a results record's run used (from its ``settings``), or ``None``."""
    for field in ("settings", "settings_changed"):
        seed = (record.get(field) or {}).get("SEED")
        if seed is not None:
            return seed
    return None


def series_key(record: dict) -> dict:
    """What must be equal for runs to pool into one series: all but their ``SEED``.

    Returns:
        ``{"model", "network", "epochs", "replanned_from", "alone", "settings", "data_md5",
        "precision", "test_images"}``: the network's name and architecture digest, the epochs
        trained and any earlier plans (``EPOCHS`` changed on resume), the run's identity when
        it recorded no settings (then it never pools), the settings without ``SEED`` and
        :data:`RUN_ONLY_PARAMETERS` (older files: ``settings_changed``), the archive's md5,
        the precision and the number of test images.
    """
    settings = record.get("settings")
    settings = record.get("settings_changed") if settings is None else settings
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    return {
        "model": record.get("model"),
        "network": record.get("network"),
        "epochs": record.get("epochs"),
        "replanned_from": record.get("replanned_from") or [],
        "alone": None if settings is not None else id(record),  # nothing to pool it by
        "settings": {
            k: v
            for k, v in sorted((settings or {}).items())
            if k != "SEED" and k not in RUN_ONLY_PARAMETERS
        },
        "data_md5": data.get("md5"),
        "precision": record.get("precision"),
        "test_images": record.get("test_images"),
    }


def _seed_order(entry) -> tuple:
    """Sort key of a ``(path, record)`` pair: by seed, runs without one last."""
    seed = run_seed(entry[1])
    return seed is None, seed or 0, str(entry[0])


def group_series(entries) -> list[dict]:
    """Pool results records into series: runs whose :func:`series_key` is equal.

    Args:
        entries: ``(path, record)`` pairs, e.g. from :func:`read_results`.

    Returns:
        One dict per series, in order of first appearance: ``key`` (:func:`series_key`),
        ``records`` and ``paths`` (sorted by ``SEED``), ``seeds`` (ints, or ``None`` for a
        record without one), and ``repeated``: paths left out because another file of the
        series holds the same ``SEED`` (the same run twice; the later ``finished`` counts
        once, so a copy never shrinks the spread).
    """
    groups = {}
    for path, record in entries:
        key = series_key(record)
        text = json.dumps(key, sort_keys=True, default=str)
        group = groups.setdefault(text, {"key": key, "by_seed": {}, "repeated": []})
        seed = run_seed(record)
        slot = seed if seed is not None else ("no seed", str(path))
        if slot in group["by_seed"]:
            old_path, old = group["by_seed"][slot]
            newer = str(record.get("finished", "")) >= str(old.get("finished", ""))
            group["repeated"].append(old_path if newer else path)
            if not newer:
                continue
        group["by_seed"][slot] = (path, record)
    series = []
    for group in groups.values():
        runs = sorted(group.pop("by_seed").values(), key=_seed_order)
        group.update(
            paths=[p for p, _ in runs],
            records=[r for _, r in runs],
            seeds=[run_seed(r) for _, r in runs],
        )
        series.append(group)
    return series


def spread(values) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (``ddof=1``; ``None`` for one value) and count.

    Args:
        values: numbers; ``None`` entries (a record without the metric) are left out.

    Returns:
        ``(mean, std, n)``; ``(None, None, 0)`` when no value is left.
    """
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(values):
        return None, None, 0
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return float(np.mean(values)), std, len(values)


def format_spread(mean, std, n: int) -> str | None:
    """``"0.490 ± 0.010 (n = 3)"``; one run: ``"0.483 (n = 1)"``; no value: ``None``."""
    if not n:
        return None
    return f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "") + f" (n = {n})"


def series_summary(series: dict) -> dict:
    """The figures of one series (:func:`group_series`), as the table and the card show them.

    Returns:
        ``{"model", "n", "seeds", "metrics": {key: {"mean", "std", "n", "values"}}}`` for
        each key of :data:`SPREAD_METRICS` some record holds (values in [0, 1], in the
        order of ``seeds``; ``std`` the sample standard deviation, ``None`` for one run).
    """
    metrics = {}
    for key, _ in SPREAD_METRICS:
        values = [r.get(key) for r in series["records"]]
        if any(v is not None for v in values):
            mean, std, n = spread(values)
            metrics[key] = {"mean": mean, "std": std, "n": n, "values": values}
    return {
        "model": series["key"]["model"],
        "n": len(series["records"]),
        "seeds": series["seeds"],
        "metrics": metrics,
    }


def why_apart(a: dict, b: dict) -> str:
    """Why two series of the same network do not pool: what differs in their keys.

    ``a`` and ``b`` are :func:`series_key` dicts; e.g. ``"EPOCHS: 1 vs 2"``.
    """
    differ = []
    names = sorted(set(a["settings"]) | set(b["settings"]))
    for name in names:
        if a["settings"].get(name) != b["settings"].get(name):
            differ.append(f"{name}: {a['settings'].get(name)!r} vs {b['settings'].get(name)!r}")
    for field, label in (("network", "network"), ("epochs", "epochs trained"),
                         ("replanned_from", "EPOCHS changed while resuming, from"),
                         ("data_md5", "data md5"), ("precision", "precision"),
                         ("test_images", "test images"),
                         ("alone", "no settings recorded")):  # fmt: skip
        if a[field] != b[field]:
            differ.append(f"{label}: {a[field]!r} vs {b[field]!r}")
    return "; ".join(differ)


def not_pooled(groups: list[dict]) -> list[str]:
    """For each two series (:func:`group_series`) of the same network, a line saying why
    their runs do not pool, e.g. ``"simple_cnn: seeds 42, 43 and seeds 42 not pooled
    (EPOCHS: 1 vs 2)"``."""
    lines = []
    for i, a in enumerate(groups):
        for b in groups[i + 1 :]:
            if a["key"]["model"] == b["key"]["model"]:
                seeds = [", ".join(map(str, g["seeds"])) for g in (a, b)]
                lines.append(
                    f"{a['key']['model']}: seeds {seeds[0]} and seeds {seeds[1]} not pooled "
                    f"({why_apart(a['key'], b['key'])})"
                )
    return lines


def _series_row(series: dict) -> dict:
    records = series["records"]
    first = records[0]
    params = total_params(first.get("params"))
    epochs = sorted({r.get("epochs") for r in records if r.get("epochs") is not None})
    summary = series_summary(series)
    hardware = sorted({r.get("hardware") for r in records if r.get("hardware")})
    known = [s for s in series["seeds"] if s is not None]
    return {
        "model": first["model"],
        "params": f"{params:,}" if params is not None else None,
        "epochs": ", ".join(map(str, epochs)) or None,
        "time": _format_seconds(spread([r.get("seconds") for r in records])[0]),
        **{k: format_spread(m["mean"], m["std"], m["n"]) for k, m in summary["metrics"].items()},
        "seeds": ", ".join(map(str, known)) if known else None,
        "hardware": "; ".join(hardware) or None,
        "settings": _settings_cell(first),
    }


def _published_cell(model: str) -> str:
    return f"{TEST_TOP1[model]:.3f} (about {_format_seconds(TRAINING_SECONDS[model])})"


def spread_table(groups: list[dict], published: bool = True, why: dict | None = None) -> str:
    """Markdown table of series (:func:`group_series`): one row each, figures as mean ±
    sample standard deviation over its runs with n (:func:`format_spread`).

    Args:
        groups: the series to show.
        published: add the seed's published test top-1 and training time column
            (:mod:`cifar_utils.published`), and a row with only that figure for each
            network no series has.
        why: series index -> why it is not in the README table; adds that column.
    """
    rows = [_series_row(g) for g in groups]
    if published:
        shown = {row["model"] for row in rows}
        rows += [{"model": m} for m in TEST_TOP1 if m not in shown]
        for row in rows:
            if row["model"] in TEST_TOP1:
                row["published"] = _published_cell(row["model"])
    if why is not None:
        for i, row in enumerate(rows[: len(groups)]):
            row["why"] = why.get(i)
    present = {k for row in rows for k in row}
    columns = [
        ("model", "Model"),
        ("params", "Params"),
        ("epochs", "Epochs"),
        ("time", "Train time (mean)"),
        *[
            (k, f"{header} (mean ± sd, n)")
            for k, header in SPREAD_METRICS
            if k in present or k not in OPTIONAL_METRICS
        ],
        ("seeds", "Seeds"),
        ("hardware", "Hardware"),
        ("settings", "Settings (not the notebook's defaults)"),
    ]
    if published:
        columns.append(
            (
                "published",
                "Seed's published test top-1 and training time (one run, not measured here)",
            )
        )
    if why is not None:
        columns.append(("why", "Not in the README table because"))
    return markdown_table(rows, columns)


def results_table(results_dir="results") -> str:
    """Markdown table comparing the full CIFAR-100 runs recorded in ``results_dir``.

    Only records that :func:`full_runs` accepts count; runs of the same network and
    settings that differ only in ``SEED`` pool into one row (:func:`group_series`), a
    single run being a series of one. Columns: ``params`` (total), ``epochs``, mean
    training time, then for each of :data:`SPREAD_METRICS` some run holds: the mean ±
    sample standard deviation and n over the series (``"0.490 ± 0.010 (n = 3)"``; one
    run: ``"0.483 (n = 1)"``), the seeds, ``hardware`` (see :func:`describe_hardware`), the
    notebook settings that differ from its defaults (``settings_changed``, without where
    files went: "defaults" if none; ``SEED`` among them where it differs), and the seed's
    published test top-1 and training time (:mod:`cifar_utils.published`), clearly
    labelled; networks with a published figure but no run get a row with only that
    figure. A missing field shows as an em dash.

    Raises:
        ValueError: a ``.json`` file in ``results_dir`` is not valid JSON.
    """
    full = [(path, record) for path, record, why in read_results(results_dir) if why is None]
    return spread_table(group_series(full))


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
