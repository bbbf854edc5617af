"""The command line: ``python -m cifar_utils {report,curves,export,predict,repeat}``.

Arguments are checked before TensorFlow starts (it takes some seconds): the modules that
need it are imported by the command that runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checks import check_model_file, check_new_folder, check_run_folder

#: The phase folders of a two-phase run (the transfer notebook's), in training order.
PHASES = ("head", "finetune")


def _report_command(args) -> int:
    if not Path(args.readme).is_file():  # before TensorFlow starts
        raise FileNotFoundError(
            f"No file '{args.readme}' to write the results table into: --readme names a "
            "Markdown file holding the results markers (default: README.md, run from the "
            "repository's folder)"
        )
    from .report import full_runs, group_series, not_pooled, read_results, update_readme_results

    before = Path(args.readme).read_text(encoding="utf-8")
    table = update_readme_results(args.results_dir, args.readme)
    print(table)
    runs, skipped = full_runs(args.results_dir)
    found = read_results(args.results_dir)
    full = group_series([(path, record) for path, record, why in found if why is None])
    print(
        f"{len(runs)} run(s) on all of CIFAR-100 in '{args.results_dir}', in "
        f"{len(full)} series"
        + ("" if Path(args.results_dir).is_dir() else " (the folder does not exist yet)")
        + "".join(f"\n  not listed: {name}: {why}" for name, why in skipped)
        + "".join(f"\n  {line}" for line in not_pooled(full))
    )
    changed = Path(args.readme).read_text(encoding="utf-8") != before
    print(f"Updated {args.readme}" if changed else f"{args.readme} was already up to date")
    if args.all:
        _print_other_series(found)
    return 0


def _print_other_series(found) -> None:
    """``report --all``: the series of quick or non-CIFAR-100 runs, in a table of their own."""
    from .report import group_series, not_pooled, spread_table

    runs = [(p, r, why) for p, r, why in found if why and isinstance(r, dict) and "test_top1" in r]
    groups = group_series([(p, r) for p, r, _ in runs])
    reasons = {}
    for i, group in enumerate(groups):
        first = group["paths"][0]
        reasons[i] = next(why for p, _, why in runs if p == first)
    print(
        "\nQuick or non-CIFAR-100 runs (NOT in the README table: their figures say nothing "
        "about CIFAR-100; only the spread between seeds of the same settings means something):"
    )
    print(spread_table(groups, published=False, why=reasons) if groups else "(none)")
    for line in not_pooled(groups):
        print(f"  {line}")


def _run_history(run_dir: Path) -> tuple[dict, list, list[Path]]:
    """A run folder's history from its ``log.csv`` (both phases of a two-phase run, one
    after the other): ``(history, phase marks, the logs read)``."""
    from .checkpoints import RunState, read_log
    from .training import join_runs

    phases = [run_dir / name for name in PHASES if (run_dir / name / "log.csv").is_file()]
    if (run_dir / "log.csv").is_file() or not phases:
        return read_log(run_dir), [], [run_dir / "log.csv"]
    runs = {}
    for phase in phases:
        log = read_log(phase)
        epochs = len(log["epoch"])
        runs[phase.name] = RunState(str(phase), epochs, {}, epoch=epochs, history=log)
    joined = join_runs(**runs)
    history = {**joined.history, "epoch": list(range(1, joined.epoch + 1))}
    return history, joined.phases, [phase / "log.csv" for phase in phases]


def _series_runs(folder: Path) -> list[tuple[str, Path]]:
    """The run folders of a series folder: ``(label, seed-<n>/<model>/)``, by seed."""
    found = []
    for seed_dir in folder.glob("seed-*"):
        runs = [  # not figures/, nor the run lock's .locks/
            p for p in seed_dir.iterdir() if p.is_dir() and p.name != "figures" and p.name[0] != "."
        ]
        if seed_dir.name[5:].isdigit() and runs:
            found += [(f"SEED {seed_dir.name[5:]}", run) for run in sorted(runs)]
    return sorted(found, key=lambda pair: int(pair[0].split()[1]))


def _curves_command(args) -> int:
    check_run_folder(args.run_dir)  # before TensorFlow starts
    import matplotlib.pyplot as plt

    from .plots import plot_history, plot_series_history

    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "curves.png"
    series = _series_runs(run_dir) if run_dir.is_dir() else []
    if series:  # a series folder (python -m cifar_utils repeat): its runs overlaid
        histories = [_run_history(run)[0] for _, run in series]
        labels = [label for label, _ in series]
        plt.close(plot_series_history(histories, labels, title=str(run_dir), path=out))
        print(f"Wrote {out}: {len(series)} run(s) of the series, mean and band")
        return 0
    history, marks, logs = _run_history(run_dir)
    plt.close(plot_history(history, title=str(run_dir), path=out, phases=marks))
    print(f"Wrote {out}: {len(history['epoch'])} epoch(s) from {', '.join(map(str, logs))}")
    return 0


def _export_command(args) -> int:
    from .export import export_saved_model

    out = export_saved_model(args.model, args.out)
    print(f"Wrote TensorFlow SavedModel {out} (signature 'serve': float32 images in [0, 1])")
    if (out / "assets.extra" / "model_card.md").is_file():
        print(f"Wrote its model card {out / 'assets.extra' / 'model_card.md'}")
    return 0


def _info_command(args) -> int:
    """``predict --info``: the model card kept in the file's metadata."""
    from .export import load_exported_model
    from .model_card import card_markdown

    _, _, metadata = load_exported_model(args.model)
    if "card" not in metadata:
        raise ValueError(
            f"'{args.model}' holds no model card (it was exported without its run's results "
            "record); its metadata: " + json.dumps(metadata)
        )
    print(card_markdown(metadata["card"]), end="")
    return 0


def _parameter_value(text: str):
    """A ``-p NAME VALUE`` value as papermill's command line reads it: a Python literal
    (``100``, ``1e-3``, ``True``, ``None``), else the text itself (``float32``)."""
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _repeat_command(args) -> int:
    from .series import run_series

    parameters = {name: _parameter_value(value) for name, value in args.parameters}
    run_series(args.notebook, args.seeds, parameters, log_output=args.log_output)
    return 0


def _image_files(arguments) -> tuple[list[Path], list[dict]]:
    """The photos named on the command line, and the folders that hold none.

    A folder stands for its image files (sorted; subfolders are not searched). Entries in
    it that are no image file Pillow reads by suffix are skipped, and stderr says how many
    and what they are, so a folder of HEIC photos or of subfolders is not silently empty.
    A path that does not exist is an error too. Returns ``(files, errors)``: errors as
    ``{"image": path, "error": message}``. Needs no TensorFlow, so such mistakes answer at
    once.
    """
    from PIL import Image

    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    files, errors = [], []
    for argument in map(Path, arguments):
        if not argument.exists():
            message = f"No image file at '{argument}'"
            print(f"error: {message}", file=sys.stderr)
            errors.append({"image": str(argument), "error": message})
            continue
        if not argument.is_dir():
            files.append(argument)
            continue
        entries = sorted(argument.iterdir())
        found = [p for p in entries if p.is_file() and p.suffix.lower() in readable]
        skipped = [p for p in entries if p not in found]
        if skipped:
            kinds = sorted({_entry_kind(p) for p in skipped})
            print(
                f"note: skipped {len(skipped)} entries in '{argument}' that are no image "
                f"files Pillow reads ({', '.join(kinds)})",
                file=sys.stderr,
            )
        if not found:
            message = f"Folder '{argument}' holds no image files (PNG, JPEG, BMP, GIF, ...)"
            print(f"error: {message}", file=sys.stderr)
            errors.append({"image": str(argument), "error": message})
        files += found
    return files, errors


def _entry_kind(path: Path) -> str:
    """What a folder entry is, in a word: "subfolder", "broken link" or its suffix."""
    if path.is_dir():
        return "subfolder"
    if not path.exists():
        return "broken link"
    return path.suffix.lower() or "no suffix"


def _explain_paths(out, images: list[Path], one_photo: bool) -> dict[Path, Path]:
    """Where ``predict --explain OUT.png`` writes each photo's overlay: ``OUT.png`` when the
    command names one photo file (``one_photo``), ``OUT-<photo stem>.png`` for each photo
    otherwise (several, or a folder). Checked before TensorFlow starts.

    Raises:
        ValueError: ``out`` does not end in ``.png`` or is a folder; two photos share a stem
            (both would write the same file); an overlay path is one of the photos, or a file
            or link that exists already (it is never replaced).
    """
    out = Path(out)
    if out.suffix.lower() != ".png" or out.is_dir():
        raise ValueError(f"--explain names the PNG file to write (e.g. overlay.png), not '{out}'")
    if one_photo:
        paths = {images[0]: out}
    else:
        paths = {image: out.with_name(f"{out.stem}-{image.stem}{out.suffix}") for image in images}
    inputs = {image.resolve(): image for image in images}
    taken = {}
    for image, path in paths.items():
        if path in taken:
            raise ValueError(
                f"'{taken[path]}' and '{image}' would both write '{path}': explain photos "
                "with the same name in separate runs"
            )
        taken[path] = image
        if path.resolve() in inputs:
            raise ValueError(
                f"--explain would write over the photo '{inputs[path.resolve()]}': name "
                "another OUT.png"
            )
        if path.exists() or path.is_symlink():  # a link too, even a broken one
            raise ValueError(
                f"--explain would replace '{path}', which exists: delete it or name another OUT.png"
            )
    return paths


def _write_overlay(model, image: Path, path: Path) -> None:
    """The photo with its Grad-CAM heatmap over it, as a PNG of the photo's size."""
    from PIL import Image

    from .explain import explain_photo, overlay_heatmap
    from .files import atomic_path

    overlay = overlay_heatmap(*explain_photo(model, image))
    with atomic_path(path, replace=False) as tmp:  # not even a file that appeared meanwhile
        Image.fromarray(overlay).save(tmp, format="PNG")


def _warn_if_not_full(metadata: dict) -> None:
    """A note on stderr when the model's card says it is no full CIFAR-100 run."""
    card = metadata.get("card")
    why = card.get("not_full") if isinstance(card, dict) else None
    if why:
        print(f"note: this model is no full CIFAR-100 run ({why}); its guesses say little "
              "(predict --info shows its card)", file=sys.stderr)  # fmt: skip


def _predict_command(args) -> int:
    if args.info:
        return _info_command(args)
    if not args.photos:
        raise ValueError("Name photos (or folders of them) to classify, or give --info")
    images, errors = _image_files(args.photos)  # before TensorFlow starts
    one_photo = len(args.photos) == 1 and images == [Path(args.photos[0])]
    overlays = _explain_paths(args.explain, images, one_photo) if args.explain and images else {}
    predictions = []
    if images:
        from .export import load_exported_model
        from .photos import predict_image

        model, names, metadata = load_exported_model(args.model)
        _warn_if_not_full(metadata)
    for image in images:
        try:
            top = predict_image(model, image, top_k=args.top_k, class_names=names)
            if image in overlays:
                _write_overlay(model, image, overlays[image])
        except (FileNotFoundError, FileExistsError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            errors.append({"image": str(image), "error": str(exc)})
            continue
        predictions.append(
            {"image": str(image), "top": [{"class": n, "probability": p} for n, p in top]}
            | ({"explain": str(overlays[image])} if image in overlays else {})
        )
        if not args.json:
            print(str(image))
            for name, probability in top:
                print(f"  {name:<16} {probability:.4f}")
            if image in overlays:
                print(f"  Grad-CAM overlay: {overlays[image]}")
    if args.json:
        document = {"model": str(args.model), "predictions": predictions, "errors": errors}
        print(json.dumps(document, indent=2))
    return 2 if errors else 0


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints its usage too: one line, like the others
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _top_k(text: str) -> int:
    value = int(text) if text.strip().lstrip("-").isdigit() else None
    if value is None or not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100, not {text!r}")
    return value


def _seeds(text: str) -> int | list[int]:
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(
            "give a count of runs (e.g. 3) or seeds separated by commas (e.g. 1,2,3), "
            f"whole numbers >= 0, not {text!r}"
        )
    return int(parts[0]) if len(parts) == 1 else [int(part) for part in parts]


def _add_report_and_curves(commands) -> None:
    report = commands.add_parser(
        "report", help="write the results/*.json comparison table into README.md"
    )
    report.add_argument(
        "--results-dir",
        default="results",
        help="folder of results JSON files (default: %(default)s)",
    )
    report.add_argument(
        "--readme",
        default="README.md",
        help="file holding the results markers (default: %(default)s)",
    )
    report.add_argument(
        "--all",
        action="store_true",
        help="also show series of quick or non-CIFAR-100 runs (never in the README)",
    )
    report.set_defaults(run=_report_command)
    curves = commands.add_parser("curves", help="plot a run's log.csv, also while it trains")
    curves.add_argument(
        "run_dir",
        help="the run folder holding log.csv, e.g. results/simple_cnn, or a series folder "
        "(its runs overlaid: mean and band)",
    )
    curves.add_argument("--out", help="PNG to write (default: RUN_DIR/curves.png)")
    curves.set_defaults(run=_curves_command)


def _add_export_and_predict(commands) -> None:
    export = commands.add_parser("export", help="a .keras model as a SavedModel, for TF Serving")
    export.add_argument("model", help="a .keras file, e.g. results/simple_cnn.keras")
    export.add_argument(
        "--format", choices=["saved_model"], default="saved_model",
        help="the one format there is: TensorFlow SavedModel (default: %(default)s)",
    )  # fmt: skip
    export.add_argument("--out", required=True, help="new folder for the SavedModel")
    export.set_defaults(run=_export_command)
    predict = commands.add_parser("predict", help="classify photos with a .keras model")
    predict.add_argument("--model", required=True, help="e.g. results/simple_cnn.keras")
    predict.add_argument("photos", nargs="*", help="image files, or folders of them")
    predict.add_argument(
        "--top-k", type=_top_k, default=5, help="classes per photo, 1 to 100 (default: %(default)s)"
    )
    predict.add_argument("--json", action="store_true", help="print one JSON document")
    predict.add_argument("--info", action="store_true", help="print the model card it holds")
    predict.add_argument(
        "--explain",
        metavar="OUT.png",
        help="also write each photo with its Grad-CAM heatmap over it, at the photo's size: "
        "OUT.png for one photo, OUT-<photo stem>.png for several or a folder; an existing file "
        "is never replaced (default: none written)",
    )
    predict.set_defaults(run=_predict_command)


def _add_repeat(commands) -> None:
    repeat = commands.add_parser("repeat", help="run a notebook once per SEED: a series")
    repeat.add_argument("notebook", help="e.g. simple_image_clasifier.ipynb")
    repeat.add_argument(
        "--seeds",
        required=True,
        type=_seeds,
        help="how many runs (3: the notebook's SEED and the next ones) or the seeds (1,2,3)",
    )
    repeat.add_argument(
        "-p",
        nargs=2,
        action="append",
        default=[],
        dest="parameters",
        metavar=("NAME", "VALUE"),
        help="a notebook parameter, as papermill's -p; OUTPUT_DIR is the series folder "
        "(default: results/<model>-series)",
    )
    repeat.add_argument("--log-output", action="store_true", help="show each run's output")
    repeat.set_defaults(run=_repeat_command)


def parser() -> argparse.ArgumentParser:
    """The ``python -m cifar_utils`` argument parser: each command's ``--help`` says what it
    does, its arguments and their defaults."""
    top = _Parser(prog="python -m cifar_utils", description="CIFAR-100 notebook helpers")
    commands = top.add_subparsers(dest="command", required=True)
    _add_report_and_curves(commands)
    _add_export_and_predict(commands)
    _add_repeat(commands)
    return top


def main(argv=None) -> int:
    """The command line: ``report``, ``curves``, ``export``, ``predict``, ``repeat``
    (``python -m cifar_utils COMMAND --help`` describes each).

    Args:
        argv: the arguments (without the program name); ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success; on any error, a one-line ``error: ...`` on stderr
        and 2. ``predict`` still classifies the other photos when one cannot be read (or a
        folder holds none), then returns 2. Wrong usage exits (status 2, one line too,
        raised as ``SystemExit``). Arguments, and that the model, photos and README named
        exist, are checked before TensorFlow is imported.
    """
    args = parser().parse_args(argv)
    try:
        if hasattr(args, "model"):
            check_model_file(args.model)
        if args.command == "export":
            check_new_folder(args.out)
        return args.run(args)
    except (ValueError, OSError) as exc:  # FileNotFoundError, FileExistsError among them
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # e.g. the system's python3 instead of the project's
        print(
            f"error: {exc}. Run the commands with the project's Python, "
            "`.venv/bin/python -m cifar_utils ...`, after the README's install",
            file=sys.stderr,
        )
        return 2
