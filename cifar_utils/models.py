"""The three networks (each defined once, in its notebook's cell tagged ``network``), the
EfficientNetB0 base and its ImageNet weights, parameter counts, layer walks, float32 copies.

Every model maps float32 (B, 32, 32, 3) in [0, 1] to float32 (B, 100) probabilities.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

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
    """``build_model(**kwargs)`` of the cell tagged ``network`` in ``notebook`` (path or name).

    Raises:
        FileNotFoundError: no such notebook.
        LookupError: no single cell tagged ``network``, or it defines no ``build_model``.
    """
    # The cell sees only what the notebook's setup cell gives it: keras and cu (this package).
    scope = run_tagged_cell(notebook, NETWORK_TAG, {"keras": keras, "cu": sys.modules[__package__]})
    if not callable(scope.get("build_model")):
        raise LookupError(
            f"{notebook}: its cell tagged '{NETWORK_TAG}' defines no build_model(); the "
            "notebook's network is what that function returns"
        )
    return scope["build_model"](**kwargs)


def build_simple_cnn(**kwargs):
    """The seed's simple network (``simple_image_clasifier.ipynb``; kwargs: ``num_classes=100``).

    For 100 classes 1,777,636 parameters, 1,920 non-trainable: the seed's figures
    (:data:`cifar_utils.published.PARAMS`). About 0.24 GFLOPs per image.
    """
    return build_from_notebook(NETWORK_NOTEBOOKS["simple_cnn"], **kwargs)


def build_complex_cnn(**kwargs):
    """The seed's complex network (``complex_image_clasifier.ipynb``): 12 conv + 2 Dense layers.

    Kwargs ``num_classes`` (100), ``stages``, ``dense_units`` (512), ``l2`` (5e-4). With the
    defaults 15,047,588 parameters, 9,472 non-trainable: the seed notebook's figures.
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
    """Path of EfficientNetB0's no-top ImageNet weights in the Keras cache; downloaded if absent.

    Raises:
        WeightsError: the cached file's sha256 is not :data:`EFFICIENTNET_B0_SHA256`, or the
            download failed; the message says how to install the file by hand.
    """
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir().parent / "models"
    dest = folder / EFFICIENTNET_B0_WEIGHTS
    # The efficientnet package would silently re-download a mismatching file, failing offline.
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
    """EfficientNetB0 without top (``efficientnet`` 1.1.1), weights loaded and checked.

    Input (B, image_size, image_size, 3) normalised by :data:`IMAGENET_MEAN`/:data:`IMAGENET_STD`;
    output (B, image_size / 32, image_size / 32, 1280). 4,049,564 parameters (seed's figure).

    Args:
        weights: ``"imagenet"``, a path to an ``.h5`` of the base's weights, or ``None`` (random).
        image_size: input height and width in pixels (224).

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
    """EfficientNetB0 with a new CIFAR-100 head (``image_classifier_with_transfer_learning.ipynb``).

    Kwargs ``weights`` (as :func:`efficientnet_b0_base`), ``image_size`` (224), ``num_classes``
    (100). For 100 classes 4,177,664 parameters, 42,016 non-trainable, as in the seed.

    Raises:
        WeightsError: as :func:`efficientnet_b0_base`.
    """
    return build_from_notebook(NETWORK_NOTEBOOKS["efficientnet_b0"], **kwargs)


def describe_weights(weights) -> str | None:
    """``WEIGHTS`` for a plan: ``"imagenet"``, ``None``, or a file's ``"sha256:<16 hex>"``."""
    if weights is None or (isinstance(weights, str) and weights == "imagenet"):
        return weights
    path = Path(weights).expanduser()
    return f"sha256:{file_digest(path, 'sha256')[:16]}" if path.is_file() else str(weights)


def set_base_trainable(model, trainable: bool):
    """Freeze or unfreeze ``model``'s EfficientNetB0 base, BatchNorm always frozen; returns it.

    For 100 classes the trainable count becomes 128,100 (frozen) or 4,093,632. Compile again after.
    """
    base = model.get_layer(EFFICIENTNET_BASE)
    # Frozen BatchNorm runs in inference mode in Keras 3 (ImageNet statistics), as keras.io's
    # "Image classification via fine-tuning with EfficientNet" recommends.
    base.trainable = trainable
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model


def load_weights_strictly(model, path) -> str | None:
    """``model.load_weights(path)``; returns why the file does not fit, else ``None``."""
    # Keras only warns "Skipping variable loading" on a mismatch and keeps the old values.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(path)
        except (ValueError, KeyError) as exc:
            return str(exc)
    return next((str(w.message) for w in caught if "Skipping" in str(w.message)), None)


def layer_config(layer, *also_drop) -> dict:
    """``layer``'s config without name, dtype policy, trainable (and ``also_drop``)."""
    drop = ("name", "dtype", "trainable", *also_drop)
    return {k: v for k, v in layer.get_config().items() if k not in drop}


def leaf_layers(model) -> list:
    """All non-model layers of ``model``, nested models flattened, in order."""
    leaves, stack = [], list(model.layers)
    while stack:
        layer = stack.pop(0)
        if hasattr(layer, "layers"):
            stack[:0] = layer.layers
        else:
            leaves.append(layer)
    return leaves


def switch_layers_on_cpu(model, keras_class, matches, method: str, make) -> list[str]:
    """Replace ``method`` (e.g. ``"call"``) of each ``keras_class`` leaf layer that ``matches``.

    Only layers of exactly ``keras_class`` are switched: a subclass may override ``method``,
    and its own stays. The layer's own method is kept as ``_keras_<method>`` (a layer that
    has one is skipped: switched already); ``make(layer)`` returns the replacement, an
    instance attribute, so the layer's class, config and weights, and what a save writes,
    are unchanged.

    Returns:
        Names of the layers switched, in order; ``[]`` when a GPU is visible (the
        replacements were measured on CPUs only).
    """
    if tf.config.list_physical_devices("GPU"):
        return []
    saved, switched = f"_keras_{method}", []
    for layer in leaf_layers(model):
        if type(layer) is keras_class and not hasattr(layer, saved) and matches(layer):
            setattr(layer, saved, getattr(layer, method))
            setattr(layer, method, make(layer))
            switched.append(layer.name)
    return switched


def float32_config(layer) -> dict:
    """``layer``'s config, with a float32 dtype policy where it has a mixed one."""
    config = layer.get_config()
    if layer.dtype_policy.name.startswith("mixed_"):  # computes in bfloat16 or float16
        config["dtype"] = layer.dtype_policy.variable_dtype  # float32, as its weights
    return config


def float32_copy(model):
    """``model`` if it computes in float32, else a float32 copy with its weights (as exported)."""
    # an InputLayer computes nothing (a clone's keeps the policy it was made under)
    computing = [
        layer for layer in leaf_layers(model) if not isinstance(layer, keras.layers.InputLayer)
    ]
    if not any(layer.dtype_policy.name.startswith("mixed_") for layer in computing):
        return model
    twin = keras.models.clone_model(
        model,
        clone_function=lambda layer: type(layer).from_config(float32_config(layer)),
        recursive=True,
    )
    twin.set_weights(model.get_weights())
    return twin
