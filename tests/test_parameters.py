"""The notebooks' parameters as a checked contract (cu.check_parameters)."""

import json
import re

import pytest
from conftest import ROOT, run_notebook

import cifar_utils as cu

NOTEBOOKS = {
    "simple_image_clasifier.ipynb": "simple_cnn",
    "complex_image_clasifier.ipynb": "complex_cnn",
    "image_classifier_with_transfer_learning.ipynb": "efficientnet_b0",
}


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_defaults_come_from_the_parameters_cell_and_pass(notebook):
    defaults = cu.notebook_defaults(notebook)
    shared = {"EPOCHS" if "transfer" not in notebook else "FINETUNE_EPOCHS", "BATCH_SIZE",
              "TRAIN_LIMIT", "VAL_SIZE", "DATA_DIR", "SEED", "DETERMINISTIC", "OUTPUT_DIR",
              "RESUME", "TENSORBOARD", "MIXED_PRECISION", "XLA", "PHOTO"}  # fmt: skip
    assert shared <= set(defaults) and "IMAGES_DIR" not in defaults
    assert defaults["PHOTO"] is None and defaults["TENSORBOARD"] is False
    checked = cu.check_parameters(dict(defaults), notebook)
    assert dict(checked) == defaults and checked.changed() == {}


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_the_notebook_text_names_only_its_own_parameters(notebook):
    """A parameter named in a markdown cell exists (the text once named one removed)."""
    cells = json.loads((ROOT / notebook).read_text())["cells"]
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    named = set(re.findall(r"`([A-Z][A-Z0-9_]{2,})", text)) - {"TF_CONFIG"}  # an env variable
    assert named and named <= set(cu.notebook_defaults(notebook))


def _problems(namespace, notebook="simple_image_clasifier.ipynb"):
    with pytest.raises(cu.ParameterError) as err:
        cu.check_parameters(namespace, notebook)
    return str(err.value)


def test_unknown_names_are_refused_with_the_closest_known_one():
    defaults = cu.notebook_defaults("simple_image_clasifier.ipynb")
    message = _problems({**defaults, "EPOCH": 2, "epochs": 3, "IMAGES_DIR": "x"})
    assert "EPOCH: no such parameter; did you mean EPOCHS?" in message
    assert "epochs: no such parameter; did you mean EPOCHS?" in message
    assert "IMAGES_DIR: no such parameter" in message  # a parameter of an older version
    # Names a later cell of the notebook assigns (re-running the setup cell) are no typo.
    fine = {**defaults, "NAME": "simple_cnn", "GLOBAL_BATCH": 128, "model": object(), "_": 1}
    assert cu.check_parameters(fine, "simple_image_clasifier.ipynb")["EPOCHS"] == 100


@pytest.mark.parametrize(
    ("name", "value", "must"),
    [
        ("EPOCHS", 0, "an int >= 1"),
        ("EPOCHS", 2.5, "an int >= 1"),
        ("BATCH_SIZE", 0, "an int >= 1"),
        ("BATCH_SIZE", True, "an int >= 1"),
        ("SEED", -1, "an int in [0, 2**32)"),
        ("XLA", "yes", 'True, False or "auto"'),
        ("RESUME", "False", "True or False"),
        ("DETERMINISTIC", 1, "True or False"),
        ("MIXED_PRECISION", None, '"auto" (from the hardware), True or "float16"'),
        ("MIXED_PRECISION", "bf16", '"bfloat16", or False or "float32"'),
        ("MIXED_PRECISION", 1, '"auto" (from the hardware)'),
        ("PHOTO", "/no/such/photo.jpg", "an image file Pillow reads"),
        ("PHOTO", __file__, "an image file Pillow reads"),  # a file, but no image
        ("DATA_DIR", "/no/such/folder", "an existing file or folder"),
        ("OUTPUT_DIR", "", "a folder path"),
    ],
)
def test_bad_values_name_the_parameter(name, value, must):
    defaults = cu.notebook_defaults("simple_image_clasifier.ipynb")
    message = _problems({**defaults, name: value})
    assert f"{name} = {value!r}: must be " in message and must in message


@pytest.mark.parametrize(
    ("sizes", "line"),
    [
        ({"VAL_SIZE": 50}, "VAL_SIZE = 50: CIFAR-100 has 50,000 training images in 100 classes; "
                           "VAL_SIZE must be an int between 100 (one image per class) and 49,900"),
        ({"VAL_SIZE": 500.0}, "VAL_SIZE = 500.0: CIFAR-100 has 50,000 training images"),
        ({"TRAIN_LIMIT": 48_000}, "TRAIN_LIMIT = 48000: CIFAR-100 has 50,000 training images, "
                                  "45,000 left to train on after VAL_SIZE = 5,000; TRAIN_LIMIT "
                                  "must be None (all of them) or an int between 100 (one image "
                                  "per class) and 45,000"),
        ({"TRAIN_LIMIT": 10}, "TRAIN_LIMIT = 10: CIFAR-100 has 50,000 training images, 45,000"),
        ({"TRAIN_LIMIT": 200, "BATCH_SIZE": 256}, "BATCH_SIZE = 256: more than the 200 training "
                                                  "images, so every epoch would be a single, "
                                                  "smaller step. BATCH_SIZE must be at most 200"),
        ({"VAL_SIZE": 49_900, "BATCH_SIZE": 101}, "BATCH_SIZE = 101: more than the 100 training"),
    ],
)  # fmt: skip
def test_sizes_must_fit_cifar100_before_it_is_loaded(sizes, line):
    defaults = cu.notebook_defaults("simple_image_clasifier.ipynb")
    assert f"\n  {line}" in _problems({**defaults, **sizes})


def test_batch_size_must_fit_the_training_images_of_the_data_loaded():
    defaults = cu.notebook_defaults("simple_image_clasifier.ipynb")
    params = cu.check_parameters({**defaults, "BATCH_SIZE": 128}, "simple_image_clasifier.ipynb")
    params.check_batch_size(128)  # one full step an epoch
    params.check_batch_size(256, replicas=2)
    for train_images, replicas, message in [
        (100, 1, "BATCH_SIZE = 128: more than the 100 training images, so every epoch would be a "
                 "single, smaller step. BATCH_SIZE must be at most 100, or TRAIN_LIMIT and "
                 "VAL_SIZE must leave more images to train on"),
        (200, 2, "BATCH_SIZE = 128 x 2 replicas = 256 a step: more than the 200 training images, "
                 "so every epoch would be a single, smaller step. BATCH_SIZE must be at most 100 "
                 "per replica"),
    ]:  # fmt: skip
        with pytest.raises(cu.ParameterError) as err:
            params.check_batch_size(train_images, replicas)
        assert str(err.value).startswith(message)


def test_transfer_parameters():
    nb = "image_classifier_with_transfer_learning.ipynb"
    defaults = cu.notebook_defaults(nb)
    for name, value, must in [
        ("HEAD_LR", 0, "a number > 0"),
        ("FINETUNE_LR", float("nan"), "a number > 0"),
        ("HEAD_EPOCHS", 0, "an int >= 1"),
        ("IMAGE_SIZE", 16, "an int in [32, 1024]"),
        ("WEIGHTS", "imagenett", '"imagenet", None (random weights) or the path'),
    ]:
        assert f"{name} = {value!r}: must be {must}" in _problems({**defaults, name: value}, nb)
    ok = cu.check_parameters({**defaults, "WEIGHTS": None, "IMAGE_SIZE": 32}, nb)
    assert ok.changed() == {"WEIGHTS": None, "IMAGE_SIZE": 32}


@pytest.mark.slow
def test_a_notebook_stops_at_once_on_bad_parameters_and_writes_nothing(tmp_path):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as err:
        run_notebook(
            "complex_image_clasifier.ipynb",
            tmp_path,
            EPOCH=2,
            BATCH_SIZE=0,
            PHOTO=str(tmp_path / "my.jpg"),
        )
    message = str(err.value)
    assert "ParameterError" in message
    assert "cifar_utils/" not in message  # the message alone, no traceback through the module
    for line in (
        "EPOCH: no such parameter; did you mean EPOCHS?",
        "BATCH_SIZE = 0: must be an int >= 1",
        "PHOTO = ",
    ):
        assert line in message
    assert not (tmp_path / "results").exists()  # nothing read or written
    executed = json.loads((tmp_path / "executed-complex_image_clasifier.ipynb").read_text())
    ran = [c for c in executed["cells"] if c["cell_type"] == "code" and c.get("outputs")]
    assert len(ran) == 1 and "check_parameters" in "".join(ran[0]["source"])


@pytest.mark.slow
def test_a_notebook_names_a_val_size_too_large_for_the_data_loaded(cifar_archive, tmp_path):
    """The generated archive has 3,000 training images: VAL_SIZE = 4000 passes the check
    against CIFAR-100 and is refused once the data are loaded, in one line."""
    import papermill

    with pytest.raises(papermill.PapermillExecutionError) as err:
        run_notebook(
            "simple_image_clasifier.ipynb", tmp_path, DATA_DIR=str(cifar_archive), VAL_SIZE=4000
        )
    assert err.value.ename == "ParameterError"
    assert err.value.evalue.startswith(
        "VAL_SIZE = 4000: this data has 3,000 training images in 100 classes; VAL_SIZE must be "
        "an int between 100 (one image per class) and 2,900"
    )
    assert err.value.traceback == [f"ParameterError: {err.value.evalue}"]  # the message alone
    assert not (tmp_path / "results" / "simple_cnn").exists()  # no training started


def test_mixed_precision_takes_exactly_its_six_values():
    for nb in NOTEBOOKS:
        assert cu.notebook_defaults(nb)["MIXED_PRECISION"] == "auto"
    nb = "simple_image_clasifier.ipynb"
    defaults = cu.notebook_defaults(nb)
    for value in ("auto", True, False, "float16", "bfloat16", "float32"):
        checked = cu.check_parameters({**defaults, "MIXED_PRECISION": value}, nb)
        assert checked["MIXED_PRECISION"] == value
    for value in ("Auto", "mixed_bfloat16", 0, 16, "fp16"):
        message = _problems({**defaults, "MIXED_PRECISION": value})
        assert f"MIXED_PRECISION = {value!r}: must be" in message
