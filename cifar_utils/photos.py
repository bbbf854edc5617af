"""Photos: reading any image file safely as uint8 RGB (H, W, 3), ``predict_image``, samples."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .checks import check_pixels
from .data import FINE_LABEL_NAMES
from .evaluation import predict_proba

#: Most pixels an image file may have when decoded. Decoding takes 3 to 8 bytes a pixel and
#: a few copies (orientation, transparency), so a file that declares more is refused before
#: it is decoded: a 600 KB PNG can declare 13000x13000 pixels (4 GB to decode). Pillow's own
#: limit is 179 million. Large JPEGs are decoded shrunk (:data:`JPEG_DRAFT_SIDE`) first.
MAX_IMAGE_PIXELS = 40_000_000
#: JPEGs are decoded at 1/2, 1/4 or 1/8 scale (Pillow's ``draft``, done by the JPEG decoder
#: itself) as long as the long side stays at least this many pixels (or further, to fit a
#: lower pixel cap), so a 48-megapixel phone photo decodes to about 3 megapixels. The models
#: see 32x32 or 224x224.
JPEG_DRAFT_SIDE = 2048
#: The formats a photo may be in (Pillow's names). Others are never opened: Pillow decodes an
#: ICO's or ICNS's embedded PNG while opening it, before any pixel check (a 684 KB ICO holding
#: a 13000x13000 PNG took 7 s and 646 MB), and TIFF's float modes would need their own scaling.
PHOTO_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
#: Most scans a JPEG may have: each is decoded over the whole image (a 136 KB progressive
#: JPEG of 5.8 megapixels with 6,000 repeated scans took 26 s); a progressive one has ~10.
MAX_JPEG_SCANS = 20


def load_image(source, size=None, *, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a photo as uint8 RGB (H, W, 3) in [0, 255], whatever its format and mode.

    Args:
        source: path of a PNG, JPEG, BMP, GIF or WebP file (:data:`PHOTO_FORMATS`), or an
            array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), uint8 in [0, 255] or float in
            [0, 1]. Transparency goes onto white, greyscale to 3 channels, EXIF orientation
            is applied.
        size: ``(height, width)`` to squash to (Lanczos, as Keras); ``None`` keeps it.
        max_pixels: most pixels a file may decode to (after a JPEG's draft), checked first.

    Raises:
        FileNotFoundError: no file at ``source``.
        ValueError: not a readable image in one of :data:`PHOTO_FORMATS`, more than
            ``max_pixels`` pixels, a JPEG of more than :data:`MAX_JPEG_SCANS` scans, or an
            array of another shape, dtype or range.
    """
    from PIL import Image

    if isinstance(source, str | os.PathLike):
        image = _decode_file(Path(source), max_pixels)
    else:
        array = _rgb_from_array(source)
        if size is None or array.shape[:2] == tuple(size):
            return array
        image = Image.fromarray(array)
    if size is not None and image.size != (size[1], size[0]):
        # resized as a Pillow image: no full-size numpy copy of a large photo
        image = image.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _too_large(path: Path, why: str, max_pixels: int) -> ValueError:
    return ValueError(
        f"'{path.name}' is too large to open safely: {why}, more than the "
        f"{max_pixels / 1e6:.0f} million pixels this loader decodes. Shrink it (a few "
        "thousand pixels a side is plenty: the models see 32x32 or 224x224) and try again"
    )


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(
        f"'{path}' is not a readable image ({type(exc).__name__}: {exc}). Give a "
        "PNG, JPEG, BMP, GIF or WebP file (RGB, RGBA or greyscale)"
    )


def _jpeg_scans(path: Path) -> int:
    """How many scans (SOS markers, ``FF DA``) a JPEG file holds, read in chunks."""
    # FF DA cannot occur in entropy-coded data (a data byte FF is followed by 00 there).
    scans, tail = 0, b""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            scans += (tail + chunk).count(b"\xff\xda")
            tail = chunk[-1:]
    return scans


def _draft_scale(width: int, height: int, max_pixels: int) -> int:
    """1, 2, 4 or 8: how much a single-scan JPEG is shrunk as it is decoded."""
    # The most keeping the long side >= JPEG_DRAFT_SIDE, or more to fit max_pixels (1/8 at most).
    keep_side = max(s for s in (1, 2, 4, 8) if max(width, height) >= JPEG_DRAFT_SIDE * s or s == 1)
    fit = next((s for s in (1, 2, 4, 8) if width * height <= max_pixels * s * s), 8)
    return max(keep_side, fit)


def _decode_file(path: Path, max_pixels: int):
    """Decode an image file to an RGB Pillow image, within ``max_pixels``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"No image file at '{path}'")
    unreadable = (UnidentifiedImageError, OSError, SyntaxError, ValueError)
    try:
        im = Image.open(path, formats=PHOTO_FORMATS)  # reads the header only
    except Image.DecompressionBombError as exc:
        raise _too_large(path, f"Pillow refuses it ({exc})", max_pixels) from None
    except unreadable as exc:
        raise _unreadable(path, exc) from None
    with im:
        width, height = im.size
        # Multi-scan JPEGs (progressive, a scan per channel) decode through full-size buffers even
        # when drafted, so only single-scan ones are drafted and the others count at full size.
        scale = _draft_scale(width, height, max_pixels)
        scans = _jpeg_scans(path) if im.format == "JPEG" else 0
        if scans > MAX_JPEG_SCANS:
            raise ValueError(
                f"'{path.name}' is a JPEG of {scans} scans, more than the {MAX_JPEG_SCANS} this "
                "loader decodes (a progressive JPEG has about 10). Save it again as a plain "
                "(baseline) JPEG or a PNG and try again"
            )
        if im.format == "JPEG" and scale > 1 and scans == 1:
            im.draft("RGB", (-(-width // scale), -(-height // scale)))  # sizes rounded up
        # Decoding peaks near 17 bytes a pixel (RGB WebP: decoder buffer, image, resized copy).
        if im.size[0] * im.size[1] > max_pixels:
            pixels = f"{width}x{height} pixels ({width * height / 1e6:.0f} million)"
            raise _too_large(path, f"it has {pixels} to decode", max_pixels)
        try:
            im.load()
            ImageOps.exif_transpose(im, in_place=True)  # a copy only if it must turn
        except unreadable as exc:
            raise _unreadable(path, exc) from None
    if im.mode.startswith("I"):  # 16/32-bit greyscale: scale 0..65535 to 0..255
        grey = np.array(im)  # uint16 or int32, changed in place: no float64 copies
        np.clip(grey, 0, 65535, out=grey)
        grey //= 257
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if "A" in im.mode or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    return im if im.mode == "RGB" else im.convert("RGB")


def _rgb_from_array(source) -> np.ndarray:
    """An image array as uint8 RGB (H, W, 3)."""
    array = check_pixels(source, "an image array")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or min(array.shape[:2]) < 1:
        raise ValueError(
            f"An image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), not "
            f"{array.shape}; for a batch, call this once per image"
        )
    if array.dtype != np.uint8:
        array = np.round(array * 255.0).astype(np.uint8)
    if array.shape[-1] == 4:
        alpha = array[..., 3:].astype(np.float64) / 255.0
        array = np.round(array[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return np.ascontiguousarray(array)


def model_image_size(model) -> tuple[int, int]:
    """(height, width) an image model takes (32 where open); ValueError if not (B, H, W, 3)."""
    shape = model.input_shape
    if isinstance(shape, list | dict) or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"An image classifier here takes one batch of RGB images (B, H, W, 3); this "
            f"model's input_shape is {shape}"
        )
    return shape[1] or 32, shape[2] or 32


def predict_image(
    model,
    path_or_array,
    top_k: int = 5,
    class_names=FINE_LABEL_NAMES,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[tuple[str, float]]:
    """The ``top_k`` of the 100 fine classes for one photo of any size, most probable first.

    Args:
        path_or_array: as :func:`load_image`; squashed to the model's input size.
        class_names: the 100 names of the model's outputs, in order.
        max_pixels: as :func:`load_image`.

    Returns:
        ``[(class_name, probability in [0, 1]), ...]``.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_image`; ``top_k`` outside [1, 100]; a
            model not giving 100 classes.
    """
    if not 1 <= top_k <= 100:
        raise ValueError(f"top_k must be between 1 and 100, not {top_k}")
    image = load_image(path_or_array, size=model_image_size(model), max_pixels=max_pixels)
    probs = predict_proba(model, image[None])[0]
    if probs.shape != (100,):
        raise ValueError(
            f"The model outputs {probs.shape[0]} values; predict_image needs CIFAR-100's 100 "
            "fine-class probabilities"
        )
    best = np.argsort(-probs, kind="stable")[:top_k]
    return [(class_names[i], float(probs[i])) for i in best]


#: Photos that ship inside scikit-image (``skimage/data``, no download needed):
#: name -> (file, the CIFAR-100 class it shows or None, description from scikit-image).
SAMPLE_PHOTOS = {
    "rocket": ("rocket.jpg", "rocket", "Launch photo of DSCOVR on Falcon 9 by SpaceX"),
    "coffee": ("coffee.png", "cup", "Coffee cup, courtesy of Pikolo Espresso Bar"),
    "chelsea": ("chelsea.png", None, "Chelsea the cat (CIFAR-100 has no cat class)"),
    "astronaut": ("astronaut.png", "woman", "Astronaut Eileen Collins, NASA"),
}


def sample_photo(name: str = "rocket") -> Path:
    """Path of a photo shipped with scikit-image (:data:`SAMPLE_PHOTOS`); ``rocket`` shows a rocket.

    Raises:
        ValueError: unknown ``name``. FileNotFoundError: scikit-image lacks the file.
    """
    from importlib.resources import files

    if name not in SAMPLE_PHOTOS:
        raise ValueError(f"Unknown sample photo {name!r}; choose one of {sorted(SAMPLE_PHOTOS)}")
    path = Path(str(files("skimage.data") / SAMPLE_PHOTOS[name][0]))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall scikit-image (requirements.txt)")
    return path
