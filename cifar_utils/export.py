"""Export: a ``.keras`` file plain Keras loads (class names inside), and a SavedModel.

Used by each notebook's "Save the model" step, the ``predict`` and ``export`` commands and
the web demo.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import keras
import numpy as np

from .checks import check_model_file, check_new_folder
from .data import FINE_LABEL_NAMES
from .devices import is_chief
from .files import atomic_path
from .model_card import card_facts, card_markdown, card_path
from .models import float32_config, float32_copy
from .photos import model_image_size

#: Members that :func:`export_model` adds to a ``.keras`` zip (and :func:`export_saved_model`
#: to a SavedModel's ``assets.extra/``): the JSON list of class names, one per output unit,
#: and a JSON object of metadata.
CLASS_NAMES_MEMBER = "class_names.json"
METADATA_MEMBER = "export_metadata.json"


def _plain_keras_layer(layer):
    """``clone_function`` for :func:`export_model`: ``layer`` rebuilt from Keras built-ins only.

    A layer under a mixed dtype policy (``mixed_bfloat16``, ``mixed_float16``) becomes a
    float32 one (its variables are float32 already), so the file computes in float32 on
    every machine, also those without fast bfloat16 or float16.
    A subclass of ``Dropout`` (such as the ``efficientnet`` package's ``FixedDropout``,
    identical at inference) becomes a plain ``Dropout`` of the same rate; a custom activation
    function becomes the Keras built-in of the same name (the package's ``swish`` -> Keras'
    ``swish``); any other custom layer is refused.
    """
    config = float32_config(layer)
    activation = getattr(layer, "activation", None)
    if callable(activation) and not isinstance(keras.activations.serialize(activation), str):
        name = getattr(activation, "__name__", repr(activation))
        try:
            builtin = keras.activations.get(name)
        except ValueError:
            builtin = None
        if builtin is None or not isinstance(keras.activations.serialize(builtin), str):
            raise ValueError(
                f"Layer '{layer.name}' uses the custom activation {name!r}, which Keras "
                "cannot load without your code; rebuild it with a built-in activation"
            )
        config["activation"] = keras.activations.serialize(builtin)
    cls = type(layer)
    if not cls.__module__.startswith("keras."):
        if not isinstance(layer, keras.layers.Dropout):
            raise ValueError(
                f"Layer '{layer.name}' is a {cls.__module__}.{cls.__name__}, not a Keras "
                "built-in: a file holding it cannot be loaded without that code"
            )
        cls = keras.layers.Dropout
    return cls.from_config(config)


def export_model(model, path, /, class_names=FINE_LABEL_NAMES, record=None, **metadata) -> Path:
    """Save ``model`` whole to a ``.keras`` file that plain Keras loads, with its class names.

    The file holds Keras built-in layers only, computes in float32 whatever precision
    ``model`` trained in, carries no optimizer state, and is written atomically by the chief
    of a multi-worker run only. Inside the zip, ``class_names.json`` holds the class names and
    ``export_metadata.json`` the ``metadata`` (docs/using-your-model.md shows how to read them).

    Args:
        model: a built single-input image classifier; input float32 (B, H, W, 3) in [0, 1]
            (uint8 pixels / 255, as :func:`predict_proba` feeds it), output (B, C).
        path: the ``.keras`` file to write (its folder is created).
        class_names: C names, in output order.
        record: the run's results record, or ``None``. Given it, the metadata also hold
            ``card`` (:func:`card_facts`) and the Markdown model card is written beside the
            file (:func:`card_path`: ``simple_cnn.keras`` -> ``simple_cnn.card.md``).
        metadata: JSON-able extra fields, e.g. ``model="simple_cnn", test_top1=0.48``
            (``model`` and ``path`` are positional-only, so these names are free).

    Returns:
        ``path`` as a Path.

    Raises:
        ValueError: ``path`` does not end in ``.keras``; ``class_names`` does not match the
            model's outputs; ``metadata`` is not JSON-able; the model holds a custom layer
            or activation that has no Keras equivalent; the copy's outputs differ; ``record``
            is no results record.
    """
    path = Path(path)
    if record is not None:
        metadata["card"] = card_facts(record)
    if path.suffix != ".keras":
        raise ValueError(f"Export to a '.keras' file (e.g. '{path.stem}.keras'), not '{path}'")
    names = [str(n) for n in class_names]
    if len(names) != model.output_shape[-1]:
        raise ValueError(
            f"{len(names)} class names for a model with {model.output_shape[-1]} outputs"
        )
    try:
        metadata_json = json.dumps(metadata)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata must be JSON-able (str, number, list, dict): {exc}") from None
    plain = _plain_copy(model)
    if not is_chief():
        return path  # a multi-worker run: the chief writes the file
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        plain.save(tmp)
        with zipfile.ZipFile(tmp, "a") as archive:
            archive.writestr(CLASS_NAMES_MEMBER, json.dumps(names))
            archive.writestr(METADATA_MEMBER, metadata_json)
    if record is not None:
        _write_card_file(path, metadata["card"])
    return path


def _plain_copy(model):
    """``model`` rebuilt from Keras built-ins (:func:`_plain_keras_layer`), uncompiled, with its
    weights; raises ValueError when its outputs differ from ``model``'s in float32."""
    # The efficientnet package's FixedDropout and swish become their Keras equivalents, and
    # fast_small_conv_gradients is not carried over: plain Keras loads the file anywhere.
    plain = keras.models.clone_model(model, clone_function=_plain_keras_layer, recursive=True)
    # clone_model copies the compile settings (the notebooks' custom top-5 metric, which plain
    # Keras cannot load): the same layers as a fresh, uncompiled model.
    plain = keras.Model(plain.input, plain.output, name=plain.name)
    plain.set_weights(model.get_weights())
    height, width = model_image_size(model)
    probe = np.random.default_rng(0).random((2, height, width, 3), dtype=np.float32)
    reference = float32_copy(model)  # a mixed-precision model's layers as float32 ones
    outputs = [np.asarray(m(probe, training=False)) for m in (plain, reference)]  # BN stats kept
    gap = float(np.max(np.abs(outputs[0] - outputs[1])))
    if gap >= 1e-5:
        raise ValueError(f"The exported copy's outputs differ from the model's by {gap:.3g}")
    return plain


def _write_card_file(path: Path, facts: dict) -> None:
    with atomic_path(card_path(path)) as tmp:
        tmp.write_text(card_markdown(facts), encoding="utf-8")


def write_card(path, facts: dict) -> Path:
    """Put new card facts into the ``.keras`` file at ``path`` and rewrite its card.

    Used when a run's card gains its series' spread (``python -m cifar_utils repeat``).
    The file's other members are copied unchanged into a new zip that replaces it
    atomically (the zip format cannot replace a member in place); the metadata keep
    their other fields.

    Args:
        path: a ``.keras`` file :func:`export_model` wrote.
        facts: :func:`card_facts` (e.g. with ``series`` filled in).

    Returns:
        The card's path (:func:`card_path`).

    Raises:
        FileNotFoundError, ValueError: see :func:`check_model_file`; not a zip archive.
    """
    path = check_model_file(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"'{path}' is not a .keras file (no zip archive): no card written")
    with zipfile.ZipFile(path) as old:
        names = old.namelist()
        metadata = json.loads(old.read(METADATA_MEMBER)) if METADATA_MEMBER in names else {}
        with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as new:
            for info in old.infolist():
                if info.filename != METADATA_MEMBER:
                    new.writestr(info, old.read(info))
            new.writestr(METADATA_MEMBER, json.dumps({**metadata, "card": facts}))
    _write_card_file(path, facts)
    return card_path(path)


def load_exported_model(path) -> tuple:
    """Load a CIFAR-100 model file; returns ``(model, class_names, metadata)``.

    Reads a ``.keras`` file from :func:`export_model` (class names and metadata from inside
    it) or any other whole-model Keras file (``model.save``: then the names are
    :data:`FINE_LABEL_NAMES` and the metadata ``{}``). The model is loaded uncompiled.

    Returns:
        The Keras model (input float32 (B, H, W, 3) in [0, 1], output (B, 100)
        probabilities), the list of its 100 class names, and the metadata dict.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a Keras model file, or the model does not output
            100 classes.
    """
    path = check_model_file(path)
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ValueError(
            f"'{path}' is truncated or not a Keras model file: a .keras file is a zip archive "
            "and this one is not (a copy or download cut short?). Give the .keras file a "
            "notebook wrote at its end (OUTPUT_DIR/<model>.keras, e.g. results/simple_cnn.keras)"
        )
    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a file it cannot read
        detail = (str(exc).strip().splitlines() or [""])[0]  # whole: a cut sentence misleads
        raise ValueError(
            f"'{path}' is not a Keras model file that plain Keras can load "
            f"({type(exc).__name__}: {detail}). Give the .keras file a notebook wrote "
            "at its end (OUTPUT_DIR/<model>.keras, e.g. results/simple_cnn.keras)"
        ) from None
    outputs = model.output_shape
    if not isinstance(outputs, tuple) or outputs[-1] != 100:
        raise ValueError(
            f"'{path}' holds a model with output shape {outputs}; a CIFAR-100 classifier "
            "outputs 100 class probabilities (B, 100)"
        )
    names, metadata = list(FINE_LABEL_NAMES), {}
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            members = set(archive.namelist())
            if CLASS_NAMES_MEMBER in members:
                names = json.loads(archive.read(CLASS_NAMES_MEMBER))
            if METADATA_MEMBER in members:
                metadata = json.loads(archive.read(METADATA_MEMBER))
    if len(names) != 100:
        raise ValueError(f"'{path}' holds {len(names)} class names, not 100")
    return model, names, metadata


def export_saved_model(model_path, out_dir) -> Path:
    """Write the model in ``model_path`` as a TensorFlow SavedModel folder, for TF Serving.

    Uses Keras' ``model.export(out_dir, format="tf_saved_model")``: the serving signature
    ``serve`` takes float32 (B, H, W, 3) in [0, 1] and returns (B, 100) probabilities
    (``tf.saved_model.load(out_dir).serve(x)``). The class names and metadata go to
    ``out_dir/assets.extra/`` (the files of :data:`CLASS_NAMES_MEMBER` and
    :data:`METADATA_MEMBER`). Written into a temporary folder beside ``out_dir`` that is
    renamed when complete.

    Raises:
        FileNotFoundError, ValueError: see :func:`load_exported_model`.
        FileExistsError: ``out_dir`` exists and is not an empty folder.
    """
    out = check_new_folder(out_dir)
    model, names, metadata = load_exported_model(model_path)
    with atomic_path(out, folder=True) as tmp:
        model.export(str(tmp), format="tf_saved_model", verbose=False)
        extra = tmp / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / CLASS_NAMES_MEMBER).write_text(json.dumps(names))
        (extra / METADATA_MEMBER).write_text(json.dumps(metadata))
        if "card" in metadata:
            (extra / "model_card.md").write_text(card_markdown(metadata["card"]), encoding="utf-8")
    return out
