"""The three networks, EfficientNetB0's ImageNet weights, and what a model is made of.

Each network is written once, in its notebook: the code cell tagged ``network`` defines
``build_model``, the layers a reader sees and edits, and what that notebook trains. The
tests, the benchmark and the scripts get that very network with one call
(:func:`build_simple_cnn`, :func:`build_complex_cnn`, :func:`build_efficientnet_b0`), which
runs the cell from the notebook file (:func:`build_from_notebook`): never a second copy.
This module keeps what the three share and what is not the lesson: the EfficientNetB0 base
and its weights file, parameter counts, layer walks, float32 copies.

Every model takes float32 ``(B, 32, 32, 3)`` in [0, 1] and returns float32 ``(B, 100)``
probabilities (the softmax stays float32 under mixed precision).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import keras
import numpy as np

from .data import default_cache_dir
from .errors import WeightsError
from .files import file_digest
from .notebooks import run_tagged_cell

#: The tag of the notebook cell that defines ``build_model``.
NETWORK_TAG = "network"
#: Notebook of each network, keyed by the results files' ``model`` name.
NETWORK_NOTEBOOKS = {
    "simple_cnn": "simple_image_clasifier.ipynb",
    "complex_cnn": "complex_image_clasifier.ipynb",
    "efficientnet_b0": "image_classifier_with_transfer_learning.ipynb",
}


def build_from_notebook(notebook, **kwargs):
    """The network that ``notebook``'s code cell tagged ``network`` defines: its
    ``build_model(**kwargs)``, built under the current dtype policy and strategy scope.

    The cell runs on its own, with the names the notebook's setup cell gives it (``keras``,
    and ``cu``: this package), so an edit in the notebook is what this builds.

    Args:
        notebook: a notebook's path, or its file name in the repository root (beside
            this package), e.g. ``NETWORK_NOTEBOOKS["simple_cnn"]``.
        **kwargs: ``build_model``'s arguments, as its cell documents them.

    Returns:
        keras.Model: what ``build_model`` returns.

    Raises:
        FileNotFoundError: no such notebook; LookupError: no single cell tagged ``network``,
            or it defines no ``build_model`` (the messages name the file and the tag).
    """
    scope = run_tagged_cell(notebook, NETWORK_TAG, {"keras": keras, "cu": sys.modules[__package__]})
    if not callable(scope.get("build_model")):
        raise LookupError(
            f"{notebook}: its cell tagged '{NETWORK_TAG}' defines no build_model(); the "
            "notebook's network is what that function returns"
        )
    return scope["build_model"](**kwargs)


def build_simple_cnn(**kwargs):
    """The seed's simple network, from ``simple_image_clasifier.ipynb`` (its cell tagged
    ``network``; :func:`build_from_notebook`): the 18 rows of the seed's table
    (:data:`cifar_utils.published.SIMPLE_CNN_LAYERS`).

    For 100 classes: 1,777,636 parameters, 1,775,716 trainable and 1,920 non-trainable
    (BatchNorm moving statistics), the seed's figures (:data:`cifar_utils.published.PARAMS`).
    About 0.24 GFLOPs per image forward.

    Args:
        **kwargs: ``build_model``'s: ``num_classes`` (default 100).

    Returns:
        keras.Model ``simple_cnn``: float32 (B, 32, 32, 3) in [0, 1] -> float32
        (B, num_classes) probabilities.
    """
    return build_from_notebook(NETWORK_NOTEBOOKS["simple_cnn"], **kwargs)


def build_complex_cnn(**kwargs):
    """The seed's complex network, from ``complex_image_clasifier.ipynb`` (its cell tagged
    ``network``; :func:`build_from_notebook`): 12 conv layers + Dense 512 + Dense 100.

    For 100 classes: 15,047,588 parameters, 15,038,116 trainable and 9,472 non-trainable
    (the moving mean and variance of the 13 BatchNorm layers), the figures of the seed
    notebook, which printed no layer table (the widths are our choice; the notebook says why).

    Args:
        **kwargs: ``build_model``'s: ``num_classes`` (default 100), ``stages`` (the conv
            widths of each stage and the Dropout after its pooling), ``dense_units`` (512),
            ``l2`` (5e-4). The counts above hold for the defaults only.

    Returns:
        keras.Model ``complex_cnn``: float32 (B, 32, 32, 3) in [0, 1] -> float32
        (B, num_classes) probabilities.
    """
    return build_from_notebook(NETWORK_NOTEBOOKS["complex_cnn"], **kwargs)


def parameter_counts(model) -> dict:
    """``{"total", "trainable", "non_trainable"}`` parameter counts of a built model (ints)."""
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    non_trainable = int(sum(np.prod(v.shape) for v in model.non_trainable_weights))
    return {
        "total": trainable + non_trainable,
        "trainable": trainable,
        "non_trainable": non_trainable,
    }


#: The no-top ImageNet weights that ``efficientnet`` 1.1.1 downloads for EfficientNetB0.
EFFICIENTNET_B0_WEIGHTS = "efficientnet-b0_weights_tf_dim_ordering_tf_kernels_autoaugment_notop.h5"
EFFICIENTNET_B0_URL = (
    "https://github.com/Callidior/keras-applications/releases/download/efficientnet/"
    + EFFICIENTNET_B0_WEIGHTS
)


#: sha256 the package checks (``efficientnet.weights.IMAGENET_WEIGHTS_HASHES``).
EFFICIENTNET_B0_SHA256 = "c1421ad80a9fc67c2cc4000f666aa50789ce39eedb4e06d531b0c593890ccff3"
#: Per-channel RGB mean and standard deviation for images in [0, 1]: what
#: ``efficientnet.tfkeras.preprocess_input`` (keras_applications mode "torch") applies after
#: dividing 0-255 pixels by 255, i.e. the normalisation the package's ImageNet weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Name of the EfficientNetB0 base (:func:`efficientnet_b0_base`) inside the transfer model.
EFFICIENTNET_BASE = "efficientnet-b0"


def _weights_howto(dest: Path) -> str:
    return (
        f"On a machine with internet, download {EFFICIENTNET_B0_URL}, check that its sha256 is "
        f"{EFFICIENTNET_B0_SHA256} (sha256sum), and put it at {dest}, or pass its path as "
        "weights (notebook parameter WEIGHTS)."
    )


def efficientnet_b0_weights_file(*, origin: str = EFFICIENTNET_B0_URL, cache_dir=None) -> Path:
    """Path of EfficientNetB0's no-top ImageNet weights in the Keras cache; download if absent.

    The file is ``cache_dir/`` :data:`EFFICIENTNET_B0_WEIGHTS` (default ``cache_dir``:
    ``$KERAS_HOME/models`` or ``~/.keras/models``, where the ``efficientnet`` package looks).
    A file already there must have the sha256 :data:`EFFICIENTNET_B0_SHA256`: the package
    itself would silently download a mismatching file again, which fails offline.

    Raises:
        WeightsError: the cached file has another sha256 (says what to do), or the download
            from ``origin`` failed (no network, wrong hash), with how to install it by hand.
    """
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "models"
    dest = folder / EFFICIENTNET_B0_WEIGHTS
    if dest.is_file():
        got = file_digest(dest, "sha256")
        if got != EFFICIENTNET_B0_SHA256:
            raise WeightsError(
                f"{dest} has sha256 {got}, not {EFFICIENTNET_B0_SHA256}: it is truncated or "
                "another file (e.g. the with-top weights). The efficientnet package would "
                "silently download it again, which fails offline. Delete or replace it. "
                + _weights_howto(dest)
            )
        return dest
    try:
        path = keras.utils.get_file(
            EFFICIENTNET_B0_WEIGHTS,
            origin,
            cache_subdir=folder.name,
            cache_dir=str(folder.parent),
            file_hash=EFFICIENTNET_B0_SHA256,
        )
    except Exception as exc:  # Keras turns URL errors into a bare Exception
        with contextlib.suppress(FileNotFoundError):
            dest.unlink()  # a download that failed its hash check; nothing was there before
        raise WeightsError(
            f"Could not download the EfficientNetB0 ImageNet weights from {origin} "
            f"({type(exc).__name__}: {exc}). " + _weights_howto(dest)
        ) from None
    return Path(path)


def _load_base_weights(base, path) -> None:
    """Load a weights file into the EfficientNetB0 base, or raise a WeightsError saying why not."""
    import h5py

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"No weights file at '{path}'. WEIGHTS must be 'imagenet', None or the path of a "
            f"file. " + _weights_howto(path.parent / EFFICIENTNET_B0_WEIGHTS)
        )
    if path.suffix != ".h5":
        raise WeightsError(
            f"'{path}' is not an .h5 weights file: pass {EFFICIENTNET_B0_WEIGHTS} or a file "
            "written by save_weights('....weights.h5') from this base"
        )
    if not h5py.is_hdf5(path):
        raise WeightsError(
            f"'{path}' is not a readable HDF5 file (a truncated download or an HTML error page?). "
            + _weights_howto(path.parent / EFFICIENTNET_B0_WEIGHTS)
        )
    problem = load_weights_strictly(base, path)
    if problem:
        problem = problem.strip().splitlines()[0][:300]
        raise WeightsError(
            f"'{path}' does not fit EfficientNetB0 without its top ({problem}). Use the no-top "
            f"file {EFFICIENTNET_B0_WEIGHTS} (sha256 {EFFICIENTNET_B0_SHA256}) or weights saved "
            "from the base of efficientnet_b0_base"
        )


def efficientnet_b0_base(weights="imagenet", image_size: int = 224):
    """EfficientNetB0 without its top (``efficientnet`` 1.1.1), for ``image_size`` inputs,
    with its weights loaded and checked: the base of the transfer notebook's network.

    The model (named :data:`EFFICIENTNET_BASE`) takes (B, image_size, image_size, 3) normalised
    as the package's ``preprocess_input`` does (mode "torch": :data:`IMAGENET_MEAN`,
    :data:`IMAGENET_STD`) and returns (B, image_size / 32, image_size / 32, 1280) features;
    4,049,564 parameters, 42,016 of them BatchNorm moving statistics.

    Args:
        weights: ``"imagenet"`` (the Keras cache, else downloaded; see
            :func:`efficientnet_b0_weights_file`), a path to an ``.h5`` file holding the base's
            weights (the package's no-top file, or a ``.weights.h5`` saved from this base), or
            ``None`` (random initialisation, for quick checks).
        image_size: height and width in pixels of its input (224: ImageNet's).

    Raises:
        WeightsError: weights missing, offline, wrong hash, unreadable or not fitting the base.
    """
    import efficientnet.tfkeras as efn

    base = efn.EfficientNetB0(
        include_top=False, weights=None, input_shape=(image_size, image_size, 3)
    )
    if isinstance(weights, str) and weights == "imagenet":
        _load_base_weights(base, efficientnet_b0_weights_file())
    elif weights is not None:
        _load_base_weights(base, weights)
    return base


def build_efficientnet_b0(**kwargs):
    """EfficientNetB0 with a new head for CIFAR-100, from
    ``image_classifier_with_transfer_learning.ipynb`` (its cell tagged ``network``;
    :func:`build_from_notebook`).

    Resizing and Normalization inside the model (no parameters), the base
    (:func:`efficientnet_b0_base`, layer :data:`EFFICIENTNET_BASE`), GlobalAveragePooling,
    Dropout 0.2, Dense softmax. For 100 classes: 4,177,664 parameters, 4,135,648 trainable,
    42,016 non-trainable (BatchNorm moving statistics), the base 4,049,564, as in the seed.

    Args:
        **kwargs: ``build_model``'s: ``weights`` (as :func:`efficientnet_b0_base`; default
            ``"imagenet"``), ``image_size`` (224), ``num_classes`` (100).

    Returns:
        keras.Model ``efficientnet_b0_transfer``: float32 (B, 32, 32, 3) in [0, 1] -> float32
        (B, num_classes) probabilities.

    Raises:
        WeightsError: as :func:`efficientnet_b0_base`.
    """
    return build_from_notebook(NETWORK_NOTEBOOKS["efficientnet_b0"], **kwargs)


def describe_weights(weights) -> str | None:
    """What a ``WEIGHTS`` value means, for a run's plan: ``"imagenet"``, ``None``, or for a
    file ``"sha256:<first 16 hex digits>"`` of its content (so a copied file is the same)."""
    if weights is None or (isinstance(weights, str) and weights == "imagenet"):
        return weights
    path = Path(weights).expanduser()
    return f"sha256:{file_digest(path, 'sha256')[:16]}" if path.is_file() else str(weights)


def set_base_trainable(model, trainable: bool):
    """Freeze (head phase) or unfreeze (fine-tuning) the EfficientNetB0 base of ``model``.

    BatchNormalization layers stay frozen either way, which in Keras 3 also runs them in
    inference mode (ImageNet statistics), as keras.io's "Image classification via fine-tuning
    with EfficientNet" recommends. For :func:`build_efficientnet_b0` with 100 classes the
    trainable count becomes 128,100 (head) or 4,093,632 (fine-tuning). Compile ``model``
    again afterwards. Returns ``model``.
    """
    base = model.get_layer(EFFICIENTNET_BASE)
    base.trainable = trainable
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model


def load_weights_strictly(model, path) -> str | None:
    """``model.load_weights(path)``; returns why the file does not fit, else ``None``.

    Keras only warns ("Skipping variable loading ...") when a saved layer or optimizer does
    not match and leaves those variables as they were: a silent wrong result. Here that
    warning, like a ValueError/KeyError from a mismatched file, becomes the returned reason.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError) as exc:
            return str(exc)
    return next((str(w.message) for w in caught if "Skipping" in str(w.message)), None)


def layer_config(layer, *also_drop) -> dict:
    """What ``layer`` computes: its config without name, dtype policy, trainable flag (and
    ``also_drop``), so the same layer built again has the same one."""
    drop = ("name", "dtype", "trainable", *also_drop)
    return {k: v for k, v in layer.get_config().items() if k not in drop}


def leaf_layers(model) -> list:
    """All layers of ``model`` that are not models themselves, nested models flattened, in order."""
    leaves, stack = [], list(model.layers)
    while stack:
        layer = stack.pop(0)
        if hasattr(layer, "layers"):
            stack[:0] = layer.layers
        else:
            leaves.append(layer)
    return leaves


def float32_config(layer) -> dict:
    """``layer``'s config, with a float32 dtype policy where it has a mixed one."""
    config = layer.get_config()
    if layer.dtype_policy.name.startswith("mixed_"):  # computes in bfloat16 or float16
        config["dtype"] = layer.dtype_policy.variable_dtype  # float32, as its weights
    return config


def float32_copy(model):
    """``model`` if it computes in float32, else a copy of it (same layer classes and
    weights) computing in float32: what its export (:func:`cifar_utils.export.export_model`)
    computes, on every machine."""
    if not any(layer.dtype_policy.name.startswith("mixed_") for layer in leaf_layers(model)):
        return model
    twin = keras.models.clone_model(
        model,
        clone_function=lambda layer: type(layer).from_config(float32_config(layer)),
        recursive=True,
    )
    twin.set_weights(model.get_weights())
    return twin
