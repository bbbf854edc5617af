"""Every figure of the notebooks and ``curves`` (matplotlib); saved atomically if given ``path``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .calibration import ECE_BINS, expected_calibration_error, reliability_bins
from .checks import check_label_pair, check_labels
from .data import COARSE_LABEL_NAMES, FINE_LABEL_NAMES
from .devices import is_chief
from .evaluation import to_superclass
from .explain import explain_photo, feature_map_grid, grad_cam, overlay_heatmap
from .files import atomic_path
from .photos import load_image, model_image_size, predict_image


def _finish(fig, path):
    """Save ``fig`` to ``path`` atomically if given (chief only); return ``fig``."""
    if path is not None and is_chief():
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix[1:] or "png", dpi=100, bbox_inches="tight")
    return fig


def plot_samples(x, y, label_names=FINE_LABEL_NAMES, n: int = 25, seed: int = 0, path=None):
    """Grid of ``n`` random images (uint8 (N, H, W, 3)) titled with their label names."""
    import matplotlib.pyplot as plt

    idx = np.random.default_rng(seed).choice(len(x), size=min(n, len(x)), replace=False)
    cols = int(np.ceil(np.sqrt(len(idx))))
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, i in zip(np.ravel(axes), idx, strict=False):
        ax.imshow(x[i])
        ax.set_title(label_names[int(y[i])], fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)


def plot_augmentation(image, augment, n: int = 7, path=None):
    """A uint8 image (H, W, 3) beside ``n`` outputs of ``augment`` (float32 in [0, 1])."""
    import matplotlib.pyplot as plt

    batch = np.repeat(image[None].astype(np.float32) / 255.0, n, axis=0)
    out = np.clip(np.asarray(augment(batch, training=True)), 0, 1)
    fig, axes = plt.subplots(1, n + 1, figsize=(1.6 * (n + 1), 1.9))
    axes[0].imshow(image)
    axes[0].set_title("original", fontsize=8)
    for i, ax in enumerate(axes[1:]):
        ax.imshow(out[i])
        ax.set_title(f"augmented {i + 1}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    return _finish(fig, path)


def plot_history(history: dict, title: str = "", path=None, phases=()):
    """Training curves: accuracy and loss (train vs validation), and the learning rate if present.

    Args:
        history: metric name -> per-epoch list (``state["history"]`` or :func:`read_log`);
            an ``epoch`` list (1-based) places the points.
        phases: ``[{"name", "first_epoch"}, ...]``, each marked by a dashed line.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = ["accuracy", "loss"] + (["learning_rate"] if history.get("learning_rate") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8))
    last = 1
    for ax, metric in zip(axes, panels, strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "validation")):
            values = history.get(key)
            if values:
                epochs = history.get("epoch") or np.arange(1, len(values) + 1)
                ax.plot(epochs, values, marker=".", label=label)
                last = max(last, int(epochs[-1]))
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.grid(alpha=0.3)
        if metric == "learning_rate":
            ax.set_yscale("log")
            ax.set_ylabel("learning rate")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_ylabel(metric)
            ax.legend()
    for ax in axes:
        ax.set_xlim(0.5, last + 0.5)
        for name, start in ((p["name"], p["first_epoch"]) for p in phases):
            ax.axvline(start - 0.5, color="gray", linestyle="--", linewidth=1)
            left = start - 0.5 < (last + 1) / 2  # label on the side with more room
            ax.text(
                start - 0.5,
                0.98,
                f" {name} ",
                ha="left" if left else "right",
                va="top",
                fontsize=8,
                transform=ax.get_xaxis_transform(),
                clip_on=True,
            )
    fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, path)


def plot_series_history(histories: list[dict], labels=(), title: str = "", path=None):
    """A series of runs' curves overlaid: each thin, their mean bold, a band of ± 1 sample std.

    Args:
        histories: per run, as :func:`plot_history`; the mean covers the epochs all runs have.
        labels: a legend label per run (e.g. ``"SEED 42"``).

    Raises:
        ValueError: no history.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not histories:
        raise ValueError("A series needs at least one run's history")
    labels = list(labels) or [f"run {i + 1}" for i in range(len(histories))]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        for key, split, colour in ((metric, "train", "C0"), (f"val_{metric}", "validation", "C1")):
            runs = [np.asarray(h[key], dtype=float) for h in histories if h.get(key)]
            if not runs:
                continue
            for values in runs:
                ax.plot(np.arange(1, len(values) + 1), values, color=colour, alpha=0.3,
                        linewidth=0.8)  # fmt: skip
            common = np.stack([r[: min(map(len, runs))] for r in runs])
            epochs = np.arange(1, common.shape[1] + 1)
            mean = common.mean(axis=0)
            ax.plot(epochs, mean, color=colour, linewidth=2, label=f"{split} (mean of {len(runs)})")
            if len(runs) > 1:
                std = common.std(axis=0, ddof=1)
                ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="both", useOffset=False)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title} ({', '.join(labels)}; band: ± 1 sample standard deviation)")
    fig.tight_layout()
    return _finish(fig, path)


def plot_superclass_confusion(y_true, y_pred, normalize: str | None = "true", path=None):
    """Confusion matrix over the 20 superclasses of fine labels, int (N,) in [0, 99].

    ``normalize="true"``: rows as shares of each true superclass; ``None``: counts.
    """
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    y_true, y_pred = check_label_pair(y_true, y_pred, 100)
    fig, ax = plt.subplots(figsize=(10, 9))
    ConfusionMatrixDisplay.from_predictions(
        to_superclass(y_true),
        to_superclass(y_pred),
        labels=np.arange(20),
        display_labels=COARSE_LABEL_NAMES,
        normalize=normalize,
        include_values=False,
        xticks_rotation="vertical",
        ax=ax,
    )
    ax.set_title("Superclass confusion" + (" (share of each true superclass)" if normalize else ""))
    fig.tight_layout()
    return _finish(fig, path)


def plot_misclassified(x, y_true, probs, n: int = 16, label_names=FINE_LABEL_NAMES, path=None):
    """Grid of the ``n`` most confident mistakes, titled true / predicted (p).

    Args:
        x: uint8 (N, H, W, 3); y_true: int (N,); probs: float (N, C).

    Raises:
        ValueError: mismatched lengths, or no image is misclassified.
    """
    import matplotlib.pyplot as plt

    probs = np.asarray(probs)
    y_true = check_labels(y_true, len(label_names), "y_true")
    if not len(x) == len(y_true) == len(probs):
        raise ValueError(f"x ({len(x)}), y_true ({len(y_true)}) and probs ({len(probs)}) differ")
    y_pred = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    if not len(wrong):
        raise ValueError("No image is misclassified: nothing to show")
    idx = wrong[np.argsort(-confidence[wrong], kind="stable")][:n]
    cols = int(np.ceil(np.sqrt(len(idx))))
    rows = int(np.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.0 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx, strict=False):
        ax.imshow(x[i])
        ax.set_title(
            f"true: {label_names[y_true[i]]}\npred: {label_names[y_pred[i]]} ({confidence[i]:.2f})",
            fontsize=7,
        )
    fig.suptitle("Most confident mistakes")
    fig.tight_layout()
    return _finish(fig, path)


def plot_prediction(model, path_or_array, top_k: int = 5, path=None):
    """The photo beside a bar chart of the model's ``top_k`` classes (:func:`predict_image`)."""
    import matplotlib.pyplot as plt

    image = load_image(path_or_array)
    top = predict_image(model, image, top_k=top_k)
    fig, (ax_img, ax_bar) = plt.subplots(
        1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [1, 1.3]}
    )
    ax_img.imshow(image)
    ax_img.axis("off")
    height, width = model_image_size(model)
    ax_img.set_title(f"{image.shape[1]}x{image.shape[0]} photo, seen at {width}x{height}")
    _draw_top_k(ax_bar, top)
    fig.tight_layout()
    return _finish(fig, path)


def _draw_top_k(ax, top) -> None:
    """Horizontal bars of ``top``, ``[(class name, probability), ...]``."""
    names, values = zip(*top, strict=True)
    ax.barh(np.arange(len(top)), values)
    ax.set_yticks(np.arange(len(top)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability")
    for i, v in enumerate(values):
        ax.text(min(v + 0.01, 0.9), i, f"{v:.2f}", va="center", fontsize=8)
    ax.set_title(f"top-{len(top)} of 100 classes")


def plot_grad_cam(
    model, x, y_true, probs, n_right: int = 4, n_wrong: int = 4, label_names=FINE_LABEL_NAMES,
    seed: int = 0, path=None,
):  # fmt: skip
    """Images over their Grad-CAM heatmaps: ``n_right`` random, then the surest mistakes.

    Args:
        x: uint8 (N, H, W, 3) at the model's input size; y_true: int (N,); probs: float (N, C).

    Raises:
        ValueError: mismatched lengths, or nothing to show.
    """
    import matplotlib.pyplot as plt

    probs = np.asarray(probs)
    y_true = check_labels(y_true, len(label_names), "y_true")
    if not len(x) == len(y_true) == len(probs):
        raise ValueError(f"x ({len(x)}), y_true ({len(y_true)}) and probs ({len(probs)}) differ")
    y_pred, confidence = probs.argmax(axis=1), probs.max(axis=1)
    right, wrong = np.flatnonzero(y_pred == y_true), np.flatnonzero(y_pred != y_true)
    right = np.random.default_rng(seed).permutation(right)[:n_right]
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:n_wrong]
    idx = np.concatenate([right, wrong]).astype(int)
    if not len(idx):
        raise ValueError("no images to show: ask for n_right or n_wrong >= 1")
    heat = grad_cam(model, x[idx], class_index=y_pred[idx])
    fig, axes = plt.subplots(2, len(idx), figsize=(1.9 * len(idx), 4.4), squeeze=False)
    for col, i in enumerate(idx):
        axes[0, col].imshow(x[i])
        axes[1, col].imshow(overlay_heatmap(x[i], heat[col]))
        verdict = "right" if y_pred[i] == y_true[i] else "wrong"
        axes[0, col].set_title(
            f"{verdict}\npred: {label_names[y_pred[i]]} ({confidence[i]:.2f})\n"
            f"true: {label_names[y_true[i]]}",
            fontsize=7,
        )
    for ax in axes.ravel():
        ax.axis("off")
    grid = feature_map_grid(model)
    fig.suptitle(
        f"Grad-CAM of the predicted class ({grid['layer']}: {grid['cells'][0]}x"
        f"{grid['cells'][1]} cells, {grid['spacing'][0]:.3g} pixels apart)",
        fontsize=9,
    )
    fig.tight_layout()
    return _finish(fig, path)


def plot_photo_grad_cam(model, path_or_array, top_k: int = 5, path=None):
    """A photo, its top-1 Grad-CAM heatmap and its ``top_k`` classes (``predict --explain``)."""
    import matplotlib.pyplot as plt

    photo, heat = explain_photo(model, path_or_array)
    top = predict_image(model, photo, top_k=top_k)
    fig, (ax_img, ax_cam, ax_bar) = plt.subplots(
        1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [1, 1, 1.3]}
    )
    ax_img.imshow(photo)
    height, width = model_image_size(model)
    ax_img.set_title(f"{photo.shape[1]}x{photo.shape[0]} photo, seen at {width}x{height}")
    ax_cam.imshow(overlay_heatmap(photo, heat))
    ax_cam.set_title(f"Grad-CAM: {top[0][0]}")
    for ax in (ax_img, ax_cam):
        ax.axis("off")
    _draw_top_k(ax_bar, top)
    fig.tight_layout()
    return _finish(fig, path)


def plot_reliability(y_true, probs, calibrated_probs=None, bins: int = ECE_BINS, path=None):
    """Reliability diagram and ECE: ``y_true`` int (N,), ``probs`` (and calibrated) float (N, C)."""
    import matplotlib.pyplot as plt

    panels = [("before temperature scaling" if calibrated_probs is not None else "", probs)]
    if calibrated_probs is not None:
        panels.append(("after temperature scaling", calibrated_probs))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (label, p) in zip(axes[0], panels, strict=True):
        table = reliability_bins(y_true, p, bins)
        left, width = table["edges"][:-1], 1 / bins
        ax.bar(left, np.nan_to_num(table["accuracy"]), width, align="edge",
               edgecolor="black", label="accuracy")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-1 confidence")
        ax.set_ylabel("accuracy")
        ece = expected_calibration_error(y_true, p, bins)
        ax.set_title(f"{label}\nECE {ece:.4f} ({bins} bins)".strip(), fontsize=9)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _finish(fig, path)
