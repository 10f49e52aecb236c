"""A dataset row's images, decoded from the bytes the row stores.

Rows embed their images as ``images[i]["bytes"]`` (the converters and the synthetic writer store them
so; :mod:`verl_grto.data.schema`). Decoding lives here, below both the policy's input pipeline
(:mod:`verl_grto.policy.inputs`) and the data check (:mod:`verl_grto.data.check`), so that the check
refuses exactly the images the policy could not be shown: one decoder, one notion of "does not
decode".
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image, UnidentifiedImageError

#: What PIL raises for bytes that are not a (complete) image: unknown format, truncated data, a bad
#: header, or more pixels than PIL's decompression-bomb limit.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def decode_image(data: Any, what: str = "image") -> Image.Image:
    """Decode one image's bytes completely (``load()``: a truncated file fails here, not later).

    Raises ValueError starting with ``what`` (e.g. ``"image 0"``) when there are no bytes or they do not
    decode.
    """
    if not data:
        raise ValueError(f"{what} has no bytes")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"{what} bytes are {type(data).__name__}, expected bytes")
    try:
        pil = Image.open(io.BytesIO(data))
        pil.load()
    except UnidentifiedImageError:  # PIL's own message names a BytesIO object's address
        raise ValueError(f"{what} does not decode: not an image format PIL knows") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(f"{what} does not decode: {exc}") from exc
    return pil


def image_bytes(row: dict[str, Any]) -> list[Any]:
    """The stored bytes of each of the row's images (None where an entry has none)."""
    return [image.get("bytes") if isinstance(image, dict) else None for image in row.get("images") or []]


def row_images(row: dict[str, Any]) -> list[Image.Image]:
    """The row's images (``images[i]["bytes"]``), decoded.

    Raises ValueError naming the sample when an image has no bytes or does not decode.
    """
    out = []
    for i, data in enumerate(image_bytes(row)):
        try:
            out.append(decode_image(data, f"image {i}"))
        except ValueError as exc:
            raise ValueError(f"sample {sample_id(row)}: {exc}") from exc
    return out


def sample_id(row: dict[str, Any]) -> str:
    """The row's ``extra_info.sample_id`` as a string, ``"?"`` when it has none (for messages)."""
    return str((row.get("extra_info") or {}).get("sample_id", "?"))
