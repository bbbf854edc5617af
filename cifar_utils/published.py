"""Every figure the seed project published (its Spanish README, ``shared/SEED.md``), in one place.

Nothing here is measured by this project; where the seed is silent, the choices live in the
notebooks' cells.
"""

#: The simple network's layer table as the seed printed it, row by row: (Keras layer class,
#: output shape without the batch axis, parameters). 18 rows; no Activation rows (the ReLUs
#: are inside the Conv2D and Dense layers).
SIMPLE_CNN_LAYERS = (
    ("Conv2D", (30, 30, 64), 1_792),
    ("Dropout", (30, 30, 64), 0),
    ("BatchNormalization", (30, 30, 64), 256),
    ("Conv2D", (28, 28, 128), 73_856),
    ("MaxPooling2D", (14, 14, 128), 0),
    ("Dropout", (14, 14, 128), 0),
    ("BatchNormalization", (14, 14, 128), 512),
    ("Conv2D", (12, 12, 256), 295_168),
    ("MaxPooling2D", (6, 6, 256), 0),
    ("Dropout", (6, 6, 256), 0),
    ("BatchNormalization", (6, 6, 256), 1_024),
    ("Conv2D", (4, 4, 512), 1_180_160),
    ("BatchNormalization", (4, 4, 512), 2_048),
    ("GlobalAveragePooling2D", (512,), 0),
    ("Dropout", (512,), 0),
    ("Dense", (256,), 131_328),
    ("Dense", (256,), 65_792),
    ("Dense", (100,), 25_700),
)

#: The transfer network's layer table: the EfficientNetB0 base (a Keras ``Functional``
#: model named ``efficientnet-b0``, 224x224 input), then its head.
TRANSFER_LAYERS = (
    ("Functional", (7, 7, 1280), 4_049_564),
    ("GlobalAveragePooling2D", (1280,), 0),
    ("Dropout", (1280,), 0),
    ("Dense", (100,), 128_100),
)

#: Parameter counts of each network, keyed by the results files' ``model`` name.
PARAMS = {
    "simple_cnn": {"total": 1_777_636, "trainable": 1_775_716, "non_trainable": 1_920},
    "complex_cnn": {"total": 15_047_588, "trainable": 15_038_116, "non_trainable": 9_472},
    "efficientnet_b0": {"total": 4_177_664, "trainable": 4_135_648, "non_trainable": 42_016},
}

#: The seed's published test top-1 accuracies.
TEST_TOP1 = {"simple_cnn": 0.483, "complex_cnn": 0.629, "efficientnet_b0": 0.797}

#: The seed's training times ("aproximadamente"), in seconds; its hardware is not given.
TRAINING_SECONDS = {"simple_cnn": 80 * 60, "complex_cnn": 5 * 3600, "efficientnet_b0": 40 * 60}

#: Layer counts the seed gives for the complex network (it prints no layer table).
COMPLEX_CONV_LAYERS = 12
COMPLEX_DENSE_LAYERS = 2

#: Optimizers: class name and settings. The transfer section names none.
OPTIMIZERS = {
    "simple_cnn": {"class": "Adam", "learning_rate": 1e-3},
    "complex_cnn": {"class": "SGD", "learning_rate": 0.1, "momentum": 0.9,
                    "schedule": "ExponentialDecay"},
}  # fmt: skip

#: Augmentation: the Keras settings of the two CNNs (``augmentation_layers`` arguments) and
#: the albumentations transforms of the transfer network (transform -> the seed's value).
AUGMENTATION = {
    "simple_cnn": {"flip": True, "shift": 0.1},
    "complex_cnn": {"flip": True, "shift": 0.1, "rotation_degrees": 15},
    "efficientnet_b0": {"HorizontalFlip": True, "width_shift": 0.5, "GridDistortion": 0.2,
                        "ElasticTransform": 0.2},
}  # fmt: skip

#: The transfer network's head dropout rate and its base's ImageNet input size.
TRANSFER_DROPOUT = 0.2
TRANSFER_IMAGE_SIZE = 224
