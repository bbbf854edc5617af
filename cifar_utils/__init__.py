"""Shared helpers for the CIFAR-100 classifier notebooks, imported as ``cu``.

One module per job, each importing only the ones listed before it:

==============  ==========================================================================
``errors``      the error classes (their messages say what to fix)
``files``       atomic writes, file digests, JSON files
``notebooks``   finding the notebooks, running a cell found by its tag
``checks``      checks of images, labels and counts shared by the modules below
``published``   every figure the seed project published (layer tables, counts, settings)
``data``        CIFAR-100: finding, downloading and reading the archive, label names, split
``models``      the three networks (from the notebooks), EfficientNetB0, parameter counts
``augment``     Keras augmentation layers, per-batch seeds, albumentations
``pipelines``   ``make_dataset``: the ``tf.data`` pipelines
``devices``     the CPU, strategies over devices and workers, which process is chief
``runlock``     one run of a notebook at a time per output folder (``own_output_dir``)
``numerics``    seeds and op determinism, precision (dtype policy), XLA
``small_conv``  a faster CPU input gradient for convolutions with tiny outputs
``cpu_layers``  fused BatchNorm, cheaper Dropout masks: faster CPU training
``metrics``     top-k hits with one tie rule, the compiled metrics
``divergence``  NaN/inf and probability checks of a model's state and outputs
``checkpoints`` the run state, checkpoint files, their commit and restore, the CSV log
``callbacks``   small Keras callbacks: divergence guard, replica alignment, epoch commit
``plans``       run plans: what a checkpoint means, how two plans differ
``training``    ``train`` (``model.fit`` with those callbacks and resume); schedules
``evaluation``  top-k, per class and superclass, reports, most confused pairs
``calibration`` ECE, NLL, temperature scaling (also folded into a model), flip TTA
``photos``      reading photos, ``predict_image``, the sample photos
``explain``     Grad-CAM heatmaps placed at their receptive fields, overlays
``results``     scoring a run, its results file
``report``      the README table from the results files (spread over seeds)
``parameters``  the notebooks' parameter check
``model_card``  the Markdown card of an exported model, from its results record
``export``      ``.keras`` export and loading, SavedModel
``series``      series of runs over seeds (papermill), resumable
``plots``       every figure
``cli``         ``python -m cifar_utils {report,curves,export,predict,repeat}``
==============  ==========================================================================

Every public name below is available as ``cu.<name>``; a module is imported the first time
one of its names is used, so ``python -m cifar_utils --help`` answers without starting
TensorFlow. Conventions, unless a function says otherwise: images are uint8 NHWC
``(N, 32, 32, 3)`` in [0, 255] as loaded, and the pipelines hand the models float32 in
[0, 1]; labels are int64 ``(N,)`` in [0, 99] (fine) or [0, 19] (coarse).
"""

import importlib

#: module -> the public names it gives ``cu``.
_PUBLIC = {
    "errors": (
        "CifarDataError", "WeightsError", "TrainingDiverged", "ResumeError",
        "NotProbabilities", "ParameterError", "OutputDirInUse",
    ),
    "files": ("write_json",),
    "notebooks": ("notebook_path", "run_tagged_cell"),
    "published": (
        "SIMPLE_CNN_LAYERS", "TRANSFER_LAYERS", "PARAMS", "TEST_TOP1", "TRAINING_SECONDS",
        "COMPLEX_CONV_LAYERS", "COMPLEX_DENSE_LAYERS", "OPTIMIZERS", "AUGMENTATION",
        "TRANSFER_DROPOUT", "TRANSFER_IMAGE_SIZE",
    ),
    "data": (
        "CIFAR100_URL", "CIFAR100_MD5", "ARCHIVE_NAME", "FOLDER_NAME", "COARSE_LABEL_NAMES",
        "FINE_LABEL_NAMES", "FINE_TO_COARSE", "default_cache_dir", "locate_cifar100",
        "load_cifar100", "data_provenance", "train_val_split", "data_fingerprint",
    ),
    "models": (
        "NETWORK_NOTEBOOKS", "build_from_notebook", "build_simple_cnn", "build_complex_cnn",
        "parameter_counts", "EFFICIENTNET_B0_WEIGHTS", "EFFICIENTNET_B0_URL",
        "EFFICIENTNET_B0_SHA256", "IMAGENET_MEAN", "IMAGENET_STD", "EFFICIENTNET_BASE",
        "efficientnet_b0_weights_file", "efficientnet_b0_base", "build_efficientnet_b0",
        "describe_weights", "set_base_trainable", "float32_copy",
    ),
    "augment": (
        "derive_seed", "augmentation_layers", "albumentations_transform", "albumentations_batch",
        "albumentations_batch_transform",
    ),
    "pipelines": ("TrainingData", "make_dataset", "steps_per_epoch"),
    "devices": (
        "is_chief", "worker_run_dir", "to_numpy", "choose_strategy", "global_batch_size",
    ),
    "runlock": ("lock_path", "own_output_dir"),
    "numerics": (
        "seed_everything", "choose_precision", "configure_precision", "xla_decision",
        "resolve_jit_compile", "CPU_FLOAT32_NETWORKS",
    ),
    "small_conv": ("fast_small_conv_gradients",),
    "cpu_layers": ("fast_cpu_training", "fuse_batch_norm", "fast_dropout"),
    "metrics": ("top_k_hits", "compile_metrics"),
    "divergence": ("check_probabilities", "nonfinite_variables", "training_state_problem"),
    "checkpoints": (
        "RunState", "read_state", "check_checkpoint_path", "save_checkpoint", "read_log",
        "recorded_precision",
    ),
    "callbacks": ("LogLearningRate", "AlignReplicas", "DivergenceGuard", "EpochCommit",
                  "CommittedCSVLogger"),
    "plans": ("run_plan",),
    "training": (
        "TrainingInterrupted", "load_best", "join_runs", "train", "exponential_decay",
    ),
    "evaluation": (
        "predict_proba", "top_k_accuracy", "per_class_accuracy", "to_superclass",
        "superclass_accuracy", "classification_report", "evaluation_summary", "most_confused",
    ),
    "calibration": (
        "ECE_BINS", "TEMPERATURE_RANGE", "reliability_bins", "expected_calibration_error",
        "negative_log_likelihood", "apply_temperature", "fit_temperature",
        "calibration_summary", "with_temperature", "flip_tta_proba", "tta_summary",
    ),
    "photos": (
        "PHOTO_FORMATS", "MAX_JPEG_SCANS", "load_image", "predict_image", "SAMPLE_PHOTOS",
        "sample_photo",
    ),
    "explain": (
        "feature_map_layer", "feature_map_grid", "grad_cam", "explain_photo", "overlay_heatmap",
    ),
    "results": (
        "write_results", "score_model", "calibration_scores", "run_record", "evaluate_and_save",
        "describe_hardware",
    ),
    "report": (
        "markdown_table", "total_params", "RESULTS_START", "RESULTS_END", "full_runs",
        "RUN_ONLY_PARAMETERS", "results_table", "update_readme_results", "SERIES_FILE",
        "results_files", "read_results", "why_not_full", "SPREAD_METRICS", "OPTIONAL_METRICS",
        "run_seed",
        "series_key", "group_series", "spread", "format_spread", "series_summary", "why_apart",
        "not_pooled", "spread_table",
    ),
    "parameters": ("NotebookParameters", "notebook_defaults", "check_parameters"),
    "model_card": ("CARD_FIGURES", "card_path", "card_facts", "card_markdown"),
    "export": (
        "CLASS_NAMES_MEMBER", "METADATA_MEMBER", "export_model", "write_card",
        "load_exported_model", "export_saved_model",
    ),
    "series": ("PATH_PARAMETERS", "seed_list", "notebook_model_name", "run_series"),
    "plots": (
        "plot_samples", "plot_augmentation", "plot_history", "plot_series_history",
        "plot_superclass_confusion", "plot_misclassified", "plot_prediction", "plot_grad_cam",
        "plot_photo_grad_cam", "plot_reliability",
    ),
    "cli": ("main",),
}  # fmt: skip
_OWNER = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = list(_OWNER)


def __getattr__(name: str):
    """``cu.<name>``: the public name from the module that owns it (imported on first use)."""
    if name not in _OWNER:
        raise AttributeError(f"module 'cifar_utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_OWNER[name]}", __name__), name)
    globals()[name] = value  # the next look-up is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
