"""/v1/images/edits uploads: the multipart form read within a byte limit, and its image and mask decoded
into request tensors.

    image  PNG, JPEG or WebP -> INPUT_IMAGE uint8 [H, W, 3] (RGB; any alpha is dropped, as our client's
           `.convert("RGB")` does; the EXIF orientation is applied, so a photo is edited as it is shown)
    mask   OpenAI's semantics: its fully transparent pixels (alpha 0) are where the image is edited
           -> MASK_IMAGE uint8 [H, W], 255 there, 0 elsewhere. A mask without an alpha channel is read as
           grayscale, white = repaint (our MASK_IMAGE, diffusers' and our client's --mask convention); the
           server binarises it at 0.5.

Decoding is bounded before it starts: Pillow's open() reads only the header, and an image of more than
`max_pixels` pixels is refused before its pixels are decoded (Pillow's own decompression-bomb error, past
twice its MAX_IMAGE_PIXELS, comes first for the largest). Everything here is answered as a 400 naming the
field (`image` or `mask`), never a 500.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import IO

import numpy as np
from aiohttp import web
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ApiError, bad_request
from .params import EDIT_TEXT_FIELDS, FILE_FIELDS, IMAGE_FIELDS, MASK_FIELD, edit_unknown_field

FORMATS = ("PNG", "JPEG", "WEBP")  # OpenAI's edit formats; Pillow tries no other decoder on an upload
# What a corrupt or truncated file raises from Pillow's decoders
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, Image.DecompressionBombError)


@dataclass
class Upload:
    field: str  # the form field it came in
    file: IO[bytes]
    filename: str | None = None


@dataclass
class Form:
    """A multipart form: text fields by name (each once) and file uploads by field."""

    texts: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[Upload]] = field(default_factory=dict)

    def close(self) -> None:
        """aiohttp spools large uploads to temporary files: closed (and so deleted) when the request ends."""
        for uploads in self.files.values():
            for upload in uploads:
                upload.file.close()

    def image(self) -> Upload:
        """The one image to edit (`image`, or a one-item `image[]` list), or ApiError 400 naming `image`."""
        images = [upload for name in IMAGE_FIELDS for upload in self.files.get(name, [])]
        if not images:
            raise bad_request("image", "image: is required: the PNG, JPEG or WebP file to edit (curl -F image=@in.png)")
        if len(images) > 1:
            raise bad_request(
                "image",
                f"image: {len(images)} images were sent; this server edits one image per request "
                "(send one `image`, or an `image[]` list of one)",
                code="unsupported_value",
            )
        return images[0]

    def mask(self) -> Upload | None:
        masks = self.files.get(MASK_FIELD, [])
        if len(masks) > 1:
            raise bad_request(MASK_FIELD, f"mask: {len(masks)} masks were sent; send at most one")
        return masks[0] if masks else None


async def read_form(request: web.Request, max_bytes: int) -> Form:
    """The request's multipart/form-data body (aiohttp's parser, with this endpoint's byte limit instead of
    the app's small JSON one), or ApiError: 400 for another body or a malformed one, 413 past `max_bytes`."""
    if request.content_type != "multipart/form-data":
        raise bad_request(
            None,
            f"{request.path} takes multipart/form-data (image, prompt, ... as form fields: curl -F), "
            f"got Content-Type {request.content_type!r}",
        )
    try:
        post = await request.clone(client_max_size=max_bytes).post()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413,
            f"the request body exceeds this server's {max_bytes} bytes for an edit (--max-upload-bytes)",
            code="request_too_large",
        ) from None
    except UnicodeDecodeError as exc:
        raise bad_request(
            None, f"a text field is not valid UTF-8 ({exc}); send images as files (curl -F image=@in.png)"
        ) from None
    except ValueError as exc:  # aiohttp's parser: a bad boundary, a part without a name, nested multipart
        raise bad_request(None, f"the request body is not valid multipart/form-data: {exc}") from None

    form = Form()
    try:
        for name, value in post.items():
            if name in FILE_FIELDS:
                if isinstance(value, web.FileField):
                    upload = Upload(name, value.file, value.filename)
                elif isinstance(value, (bytes, bytearray)):  # a part without a filename, non-text content type
                    upload = Upload(name, io.BytesIO(bytes(value)))
                else:
                    raise bad_request(
                        _field(name), f"{_field(name)}: expected a file (curl -F {name}=@in.png), got a text value"
                    )
                form.files.setdefault(name, []).append(upload)
            elif isinstance(value, web.FileField):
                value.file.close()
                if name not in EDIT_TEXT_FIELDS:
                    raise edit_unknown_field(name)
                raise bad_request(name, f"{name}: expected a text field, got a file upload")
            elif name in form.texts:
                raise bad_request(name, f"{name}: given more than once; send it once")
            else:
                form.texts[name] = value if isinstance(value, str) else bytes(value).decode("utf-8", "replace")
    except BaseException:
        form.close()
        raise
    return form


def _field(name: str) -> str:
    return "image" if name in IMAGE_FIELDS else name


def _open(name: str, upload: Upload, max_pixels: int) -> Image.Image:
    """The decoded image of an upload (first frame of an animated one), its EXIF orientation applied."""
    data = upload.file.read()
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise bad_request(name, f"{name}: too many pixels ({exc}); this server decodes at most {max_pixels}") from None
    except UnidentifiedImageError:
        raise bad_request(
            name, f"{name}: is not a PNG, JPEG or WebP image ({len(data)} bytes{_named(upload)})"
        ) from None
    except _DECODE_ERRORS as exc:
        raise bad_request(name, f"{name}: cannot be read as an image{_named(upload)}: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:  # before any pixel is decoded
        raise bad_request(
            name,
            f"{name}: {width}x{height} = {width * height} pixels; this server decodes at most {max_pixels} "
            "(--max-input-pixels)",
        )
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as exc:
        raise bad_request(name, f"{name}: cannot be decoded{_named(upload)}: {type(exc).__name__}: {exc}") from None


def _named(upload: Upload) -> str:
    return f", file {upload.filename!r}" if upload.filename else ""


def decode_image(upload: Upload, max_pixels: int) -> np.ndarray:
    """The image to edit -> uint8 [H, W, 3] (RGB)."""
    return np.ascontiguousarray(np.asarray(_open("image", upload, max_pixels).convert("RGB"), dtype=np.uint8))


def mask_tensor(image: Image.Image) -> np.ndarray:
    """A decoded mask -> MASK_IMAGE uint8 [H, W], 255 = repaint (the module docstring: alpha 0 is repainted;
    without alpha, grayscale with white = repaint). A mask with alpha but no fully transparent pixel would
    edit nothing, which is surely not what was meant: refused."""
    if image.has_transparency_data:  # an alpha channel, or a palette / colour key with transparency
        alpha = np.asarray(image.convert("RGBA").getchannel("A"))
        mask = np.where(alpha == 0, 255, 0).astype(np.uint8)
        if not mask.any():
            raise bad_request(
                MASK_FIELD,
                "mask: no pixel is fully transparent (alpha 0), so nothing would be edited; make the area to "
                "edit transparent, or send a mask without an alpha channel (white = edit)",
            )
        return mask
    return np.ascontiguousarray(np.asarray(image.convert("L"), dtype=np.uint8))


def decode_mask(upload: Upload, max_pixels: int) -> np.ndarray:
    return mask_tensor(_open(MASK_FIELD, upload, max_pixels))


def decode_edit(image: Upload, mask: Upload | None, max_pixels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The edit's INPUT_IMAGE and MASK_IMAGE (CPU work: the caller runs it off the event loop). OpenAI asks
    for a mask of the image's size, and so does the server: refused here, naming `mask`."""
    pixels = decode_image(image, max_pixels)
    if mask is None:
        return pixels, None
    repaint = decode_mask(mask, max_pixels)
    if repaint.shape != pixels.shape[:2]:
        (mh, mw), (ih, iw) = repaint.shape, pixels.shape[:2]
        raise bad_request(MASK_FIELD, f"mask: is {mw}x{mh} pixels, the image {iw}x{ih}; they must be the same size")
    return pixels, repaint
