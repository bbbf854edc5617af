"""Series of runs: one notebook run headless once per ``SEED`` (papermill), resumable.

See docs/series.md.
"""

from __future__ import annotations

import ast
import json
import time
from pathlib import Path

from .export import write_card
from .files import write_json
from .model_card import card_facts
from .notebooks import notebook_path
from .parameters import check_parameters, notebook_defaults
from .report import SERIES_FILE, format_spread, group_series, series_summary

#: Notebook parameters that may name a file or folder.
PATH_PARAMETERS = ("DATA_DIR", "PHOTO", "WEIGHTS")


def _is_path(value) -> bool:
    return isinstance(value, str) and Path(value).expanduser().exists()


def seed_list(seeds: int | list[int], first: int) -> list[int]:
    """The seeds of a series: a count (3: ``first`` to ``first + 2``) or the seeds themselves.

    Raises:
        ValueError: no seed, a seed outside [0, 2**32), or one given twice.
    """
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"--seeds {seeds}: a series needs at least one run (e.g. --seeds 3)")
        seeds = [first + i for i in range(seeds)]
    if not seeds:
        raise ValueError("No seeds: a series needs at least one run (e.g. --seeds 3)")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds} names a seed twice: each run needs its own seed")
    if not all(isinstance(s, int) and 0 <= s < 2**32 for s in seeds):
        raise ValueError(f"--seeds {seeds}: each seed must be a whole number in [0, 2**32)")
    return list(seeds)


def notebook_model_name(notebook) -> str:
    """The ``NAME = "..."`` a notebook assigns; ValueError if none."""
    import nbformat

    cells = nbformat.read(notebook_path(notebook), as_version=4).cells
    for cell in (c for c in cells if c.cell_type == "code"):
        for node in ast.walk(ast.parse(cell.source)):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "NAME" for t in node.targets
            ):
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    return node.value.value
    raise ValueError(
        f"{notebook} assigns no NAME = '...': it is not one of this project's notebooks"
    )


def _check_folder(folder: Path, manifest: dict) -> dict:
    """The folder's manifest merged with this request; ValueError if it holds anything else."""
    path = folder / SERIES_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{path} is not valid JSON: fix or remove it") from None
        for field in ("notebook", "parameters"):
            if old.get(field) != manifest[field]:
                raise ValueError(
                    f"'{folder}' holds a series with {field} {old.get(field)!r}, not "
                    f"{manifest[field]!r}: runs with other settings never pool. Continue "
                    "that series with its own settings, or give another -p OUTPUT_DIR"
                )
        seeds = old["seeds"] + [s for s in manifest["seeds"] if s not in old["seeds"]]
        return {**old, "seeds": seeds}
    if folder.exists() and any(folder.iterdir()):
        held = ", ".join(sorted(p.name for p in folder.iterdir())[:5])
        raise ValueError(
            f"'{folder}' already holds other files or runs ({held}) and no {SERIES_FILE}: "
            "a series needs a folder of its own. Give another -p OUTPUT_DIR"
        )
    return manifest


def _check_run_folder(run_dir: Path, model: str) -> dict | None:
    """The results record of a finished run in ``run_dir`` or ``None``; ValueError if foreign."""
    record = None
    for path in sorted(run_dir.glob("*.json")):
        try:
            found = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path} is truncated or no JSON ({exc}): remove the folder '{run_dir}' to "
                "run that seed again"
            ) from None
        if not isinstance(found, dict) or found.get("model") != model:
            name = found.get("model") if isinstance(found, dict) else None
            raise ValueError(
                f"{path} holds the results of {name!r}, not of {model!r}: that folder "
                "belongs to another notebook's run. Give another -p OUTPUT_DIR"
            )
        record = found
    return record


def run_series(
    notebook, seeds: int | list[int], parameters: dict, log_output: bool = False, log=print
):
    """Run ``notebook`` headless once per seed, each in ``OUTPUT_DIR/seed-<n>/``; resumable.

    Args:
        notebook: e.g. ``"simple_image_clasifier.ipynb"``.
        seeds: a count or the seeds (:func:`seed_list`); a count starts at ``SEED``.
        parameters: notebook parameters; ``OUTPUT_DIR`` is the series folder.
        log_output: show each run's notebook output. log: where progress lines go.

    Returns:
        :func:`series_summary` of the series.

    Raises:
        FileNotFoundError: no such notebook.
        ValueError: bad seeds or parameters; a folder holding anything else; a run that
            stopped on an error (run again to resume).
    """
    path = notebook_path(notebook)
    if path.suffix != ".ipynb" or not path.is_file():
        raise FileNotFoundError(f"No notebook at '{notebook}' (e.g. simple_image_clasifier.ipynb)")
    model = notebook_model_name(path)
    folder, parameters, manifest = _plan_series(path, model, seeds, parameters)
    records = {s: _check_run_folder(folder / f"seed-{s}", model) for s in manifest["seeds"]}
    done = {s for s in manifest["seeds"] if str(s) in manifest["done"] and records[s]}
    write_json(folder / SERIES_FILE, manifest)
    log(
        f"Series of {model} ({path.name}): SEEDs {', '.join(map(str, manifest['seeds']))} in "
        f"'{folder}'" + (f"; {len(done)} run(s) finished earlier" if done else "")
    )
    total = len(manifest["seeds"])
    for i, seed in enumerate(manifest["seeds"], 1):
        if seed in done:
            log(f"[{i}/{total}] SEED {seed}: finished earlier "
                f"(test top-1 {records[seed]['test_top1']:.3f})")  # fmt: skip
            continue
        start = time.monotonic()
        records[seed] = _run_one(path, folder / f"seed-{seed}", model, parameters, seed, log_output)
        manifest["done"][str(seed)] = {"wall_seconds": round(time.monotonic() - start, 1)}
        write_json(folder / SERIES_FILE, manifest)
        walls = [d["wall_seconds"] for d in manifest["done"].values()]
        left = total - i
        eta = f"; {left} run(s) left, about {left * sum(walls) / len(walls) / 60:.1f} min" + (
            f" (the mean of {len(walls)} run(s))"
        )
        log(
            f"[{i}/{total}] SEED {seed}: test top-1 {records[seed]['test_top1']:.3f}, "
            f"{manifest['done'][str(seed)]['wall_seconds']:.0f} s" + (eta if left else "")
        )
    return _summarise(folder, model, manifest["seeds"], records, log)


def _plan_series(path: Path, model: str, seeds, parameters: dict) -> tuple[Path, dict, dict]:
    """The series folder, shared parameters and manifest, all checked before any run."""
    defaults = notebook_defaults(path)
    # The notebook runs in its own folder: a path given relative to here must stay valid.
    parameters = {
        k: str(Path(v).resolve()) if k in PATH_PARAMETERS and _is_path(v) else v
        for k, v in parameters.items()
    }
    chosen = seed_list(seeds, parameters.pop("SEED", defaults["SEED"]))
    folder = Path(parameters.pop("OUTPUT_DIR", f"{defaults['OUTPUT_DIR']}/{model}-series"))
    folder = folder.expanduser().resolve()
    for seed in chosen:  # typos and bad values stop the series before any run
        check_parameters({**parameters, "SEED": seed, "OUTPUT_DIR": str(folder)}, path)
    manifest = _check_folder(
        folder, {"notebook": path.name, "model": model, "parameters": parameters,
                 "seeds": chosen, "done": {}},
    )  # fmt: skip
    return folder, parameters, manifest


def _run_one(path: Path, run_dir: Path, model: str, parameters: dict, seed: int, log_output):
    """Run the notebook once with ``SEED = seed`` into ``run_dir``; its results record."""
    import papermill

    run_dir.mkdir(parents=True, exist_ok=True)  # papermill writes the executed notebook there
    try:
        papermill.execute_notebook(
            str(path),
            str(run_dir / path.name),
            parameters={**parameters, "SEED": seed, "OUTPUT_DIR": str(run_dir)},
            cwd=str(path.parent),
            kernel_name="python3",
            progress_bar=False,
            log_output=log_output,
        )
    except papermill.PapermillExecutionError as exc:
        raise ValueError(
            f"The run with SEED {seed} stopped: {exc.ename}: {exc.evalue.splitlines()[0]} "
            f"(see {run_dir / path.name}). Start the same command again to resume it"
        ) from None
    record = _check_run_folder(run_dir, model)
    if record is None:
        raise ValueError(f"The run with SEED {seed} wrote no {model}.json in '{run_dir}'")
    return record


def _summarise(folder: Path, model: str, seeds: list, records: dict, log) -> dict:
    """The series' spread (:func:`series_summary`), logged and written into each run's card."""
    groups = group_series([(folder / f"seed-{s}" / f"{model}.json", records[s]) for s in seeds])
    if len(groups) != 1:  # the notebook checks its data: another archive, say
        raise ValueError(f"The runs in '{folder}' do not pool into one series: see `report --all`")
    summary = series_summary(groups[0])
    for seed in seeds:
        keras_file = folder / f"seed-{seed}" / f"{model}.keras"
        if keras_file.is_file():
            write_card(keras_file, card_facts(records[seed], summary))
    figures = ", ".join(
        f"{key} {format_spread(m['mean'], m['std'], m['n'])}"
        for key, m in summary["metrics"].items()
    )
    log(f"{model} over SEEDs {', '.join(map(str, summary['seeds']))}: {figures}")
    return summary
