"""The three networks, EfficientNetB0's ImageNet weights, and what a model is made of.

Used by each notebook's "The model" step. Every model takes float32 ``(B, 32, 32, 3)`` in
[0, 1] and returns float32 ``(B, 100)`` probabilities (the softmax stays float32 under
mixed precision).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import keras
import numpy as np

from .data import default_cache_dir
from .errors import WeightsError
from .files import file_digest
from .published import TRANSFER_DROPOUT, TRANSFER_IMAGE_SIZE

#: Dropout rates of the simple network: after convs 1, 2 and 3 and after the global average
#: pooling. The seed gives none; these are our choice: rising with depth as in the complex
#: network and the usual VGG-style CIFAR recipes (little on the first, widest feature map,
#: whose 64 filters are still generic), and the classic 0.5 before the dense head.
SIMPLE_CNN_DROPOUT = (0.2, 0.3, 0.4, 0.5)


def build_simple_cnn(num_classes: int = 100, input_shape=(32, 32, 3)):
    """The seed's simple network, layer for layer as its table
    (:data:`cifar_utils.published.SIMPLE_CNN_LAYERS`).

    Four 3x3 'valid' convolutions with ReLU inside (64-128-256-512 filters; spatial size
    32 -> 30 -> 28, pool 14 -> 12, pool 6 -> 4): Conv -> Dropout -> BatchNorm; Conv ->
    MaxPool -> Dropout -> BatchNorm; Conv -> MaxPool -> Dropout -> BatchNorm; Conv ->
    BatchNorm; then GlobalAveragePooling -> Dropout -> Dense 256 ReLU -> Dense 256 ReLU ->
    Dense ``num_classes`` softmax (float32 under mixed precision). Dropout rates:
    :data:`SIMPLE_CNN_DROPOUT` (our choice). BatchNorm momentum 0.9 (Keras' default is 0.99),
    so the inference statistics settle within the first epoch; it changes no count.

    For 100 classes: 1,777,636 parameters, 1,775,716 trainable and 1,920 non-trainable
    (BatchNorm moving statistics), the seed's figures (:data:`cifar_utils.published.PARAMS`).
    About 0.24 GFLOPs per image forward.

    Input: float32 (B, 32, 32, 3) in [0, 1]. Output: float32 (B, num_classes) probabilities.
    """
    drop = iter(SIMPLE_CNN_DROPOUT)
    inputs = keras.Input(input_shape, name="image")
    h = inputs
    for i, (width, pool) in enumerate([(64, False), (128, True), (256, True), (512, False)], 1):
        h = keras.layers.Conv2D(width, 3, activation="relu", name=f"conv{i}")(h)
        if pool:
            h = keras.layers.MaxPooling2D(2, name=f"pool{i}")(h)
        if i < 4:
            h = keras.layers.Dropout(next(drop), name=f"drop{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dropout(next(drop), name="drop_gap")(h)
    h = keras.layers.Dense(256, activation="relu", name="dense1")(h)
    h = keras.layers.Dense(256, activation="relu", name="dense2")(h)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(h)
    return keras.Model(inputs, outputs, name="simple_cnn")


def parameter_counts(model) -> dict:
    """``{"total", "trainable", "non_trainable"}`` parameter counts of a built model (ints)."""
    trainable = int(sum(np.prod(v.shape) for v in model.trainable_weights))
    non_trainable = int(sum(np.prod(v.shape) for v in model.non_trainable_weights))
    return {
        "total": trainable + non_trainable,
        "trainable": trainable,
        "non_trainable": non_trainable,
    }


#: Widths of the complex network's twelve 3x3 'same' convolutions.
COMPLEX_CONV_WIDTHS = (64, 64, 128, 384, 384, 384, 384, 384, 512, 512, 512, 512)
#: 1-based conv indices followed by 2x2 max-pooling (32 -> 16 -> 8 -> 4 -> 2 -> 1), mapped to
#: the Dropout rate after that pool.
COMPLEX_POOL_DROPOUT = {2: 0.2, 3: 0.3, 5: 0.3, 8: 0.4, 12: 0.4}


def build_complex_cnn(
    num_classes: int = 100, input_shape=(32, 32, 3), l2: float = 5e-4, width_scale: float = 1.0
):
    """The seed's complex network: 12 conv layers + Dense 512 + Dense ``num_classes``.

    Twelve 3x3 'same' convolutions of widths :data:`COMPLEX_CONV_WIDTHS` (with bias, the
    Keras default), each followed by BatchNorm and ReLU; 2x2 max-pooling and Dropout after
    convs 2, 3, 5, 8 and 12 (:data:`COMPLEX_POOL_DROPOUT`), so 32x32 inputs end at 1x1x512;
    Flatten, Dense 512 + BatchNorm + ReLU + Dropout 0.5, Dense ``num_classes`` softmax.
    ``l2`` is the L2 factor on both dense kernels (the convs are unregularised). BatchNorm
    momentum is 0.9 (as in :func:`build_simple_cnn`), so the inference statistics settle
    within the first epoch.

    For 100 classes: 15,047,588 parameters, 15,038,116 trainable and 9,472 non-trainable
    (the moving mean and variance of the 13 BatchNorm layers: 2 x (4,224 + 512)), the
    figures of the seed notebook. The seed did not print its layer table; these widths
    are one 12-conv design that reproduces all three counts exactly.

    ``width_scale`` multiplies every conv and dense width (at least 1 unit each); the
    counts above hold only for 1.0, smaller values keep the depth for quick CPU checks.

    Input: float32 (B, 32, 32, 3) in [0, 1] (other sizes must be divisible by 32).
    Output: float32 (B, num_classes) probabilities.
    """
    if input_shape[0] % 32 or input_shape[1] % 32:
        raise ValueError(
            f"input_shape {input_shape}: height and width must be multiples of 32 for the "
            "five 2x2 poolings (CIFAR images are 32x32)"
        )

    def scaled(width):
        return max(1, round(width * width_scale))

    reg = keras.regularizers.L2(l2)
    inputs = keras.Input(input_shape, name="image")
    h = inputs
    for i, width in enumerate(COMPLEX_CONV_WIDTHS, start=1):
        h = keras.layers.Conv2D(scaled(width), 3, padding="same", name=f"conv{i}")(h)
        h = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{i}")(h)
        h = keras.layers.Activation("relu", name=f"relu{i}")(h)
        if i in COMPLEX_POOL_DROPOUT:
            h = keras.layers.MaxPooling2D(2, name=f"pool{i}")(h)
            h = keras.layers.Dropout(COMPLEX_POOL_DROPOUT[i], name=f"drop{i}")(h)
    h = keras.layers.Flatten(name="flatten")(h)
    h = keras.layers.Dense(scaled(512), kernel_regularizer=reg, name="dense1")(h)
    h = keras.layers.BatchNormalization(momentum=0.9, name="bn_dense1")(h)
    h = keras.layers.Activation("relu", name="relu_dense1")(h)
    h = keras.layers.Dropout(0.5, name="drop_dense1")(h)
    outputs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_regularizer=reg,
        dtype="float32",  # float32 probabilities under mixed precision
        name="predictions",
    )(h)
    return keras.Model(inputs, outputs, name="complex_cnn")


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
#: Name of the EfficientNetB0 base inside :func:`build_efficientnet_b0`'s model.
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
            "from the base of build_efficientnet_b0"
        )


def build_efficientnet_b0(
    weights="imagenet", num_classes: int = 100, image_size: int = TRANSFER_IMAGE_SIZE
):
    """EfficientNetB0 (``efficientnet`` 1.1.1, no top) with a new head, for 32x32 images.

    Input float32 (B, 32, 32, 3) in [0, 1] (as :func:`make_dataset` gives) -> Resizing to
    ``image_size`` (bilinear, inside the model, so the input pipeline never holds 224x224
    images) -> Normalization with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` (the package's
    own ``preprocess_input``, mode "torch", for [0, 1] input; no weights) -> the base (layer
    :data:`EFFICIENTNET_BASE`) -> GlobalAveragePooling -> Dropout 0.2 -> Dense ``num_classes``
    softmax. For 100 classes: 4,177,664 parameters, 4,135,648 trainable, 42,016 non-trainable
    (BatchNorm moving statistics), the base 4,049,564, as in the seed notebook.

    Args:
        weights: ``"imagenet"`` (the Keras cache, else downloaded; see
            :func:`efficientnet_b0_weights_file`), a path to an ``.h5`` file holding the base's
            weights (the package's no-top file, or a ``.weights.h5`` saved from this base), or
            ``None`` (random initialisation, for quick checks).

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
    inputs = keras.Input((32, 32, 3), name="image")
    h = keras.layers.Resizing(image_size, image_size, name="resize")(inputs)
    h = keras.layers.Normalization(
        mean=IMAGENET_MEAN, variance=np.square(IMAGENET_STD), name="imagenet_normalization"
    )(h)
    h = base(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dropout(TRANSFER_DROPOUT, name="top_dropout")(h)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="predictions"
    )(h)
    return keras.Model(inputs, outputs, name="efficientnet_b0_transfer")


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
