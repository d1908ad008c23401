"""Rendered and thumbnail images (WADO-RS §10.4.1.1.3, §10.4.1.1.4) with Pillow."""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array

from .errors import BadRequest, NotAcceptable, NotFound, PayloadTooLarge
from .multipart import MediaType
from .wado import ascii_int, frame_count

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}


def choose_image_media(accept: list[MediaType]) -> str:
    for mt in accept:
        if mt.mime in FORMATS:
            return mt.mime
        if mt.mime in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable("Accept: rendered images are available as image/jpeg, image/png or image/gif")


def choose_multipart_image_media(accept: list[MediaType]) -> str | None:
    """The image type of ``multipart/related; type="image/…"`` when the client asks for one before
    any single image (a rendered study or series as one part per instance); else None."""
    for mt in accept:
        if mt.mime == "multipart/related" and mt.type_param in FORMATS:
            return mt.type_param
        if mt.mime in FORMATS or mt.mime in ("*/*", "image/*"):
            return None
    return None


def parse_render_params(params, thumbnail: bool) -> dict:
    out: dict = {"quality": 90, "viewport": (128, 128) if thumbnail else None, "window": None}
    for name, value in params:
        if name == "quality":
            quality = ascii_int(value)
            if quality is None or not 1 <= quality <= 100:
                raise BadRequest("quality: must be an integer from 1 to 100")
            out["quality"] = quality
        elif name == "viewport":
            size = [ascii_int(p) for p in value.split(",")]
            if len(size) not in (2, 6) or not all(v is not None and v > 0 for v in size[:2]):
                raise BadRequest("viewport: expected vw,vh (positive integers)")
            out["viewport"] = (min(size[0], 4096), min(size[1], 4096))
        elif name == "window":
            parts = value.split(",")
            try:
                center, width = (float(p) if p.strip().isascii() else math.nan for p in parts[:2])
            except ValueError:
                raise BadRequest("window: expected center,width[,function]") from None
            if len(parts) not in (2, 3) or not (math.isfinite(center) and math.isfinite(width)):
                raise BadRequest("window: expected center,width[,function] (finite numbers)")
            if width <= 0:
                raise BadRequest("window: width must be positive")
            out["window"] = (center, width)
        # annotation, charset, iccprofile, accept (read by the caller) and any parameter the
        # gateway does not know: ignored (PS3.18 8.3: unsupported parameters are ignored)
    return out


def _first(ds: Dataset, keyword: str) -> float | None:
    """The (first) value of a numeric attribute; None when absent, malformed or not finite."""
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        number = float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _to_8bit(values: np.ndarray, top: float) -> np.ndarray:
    return np.clip(values.astype(np.float64) * (255.0 / top), 0, 255).astype(np.uint8)


def to_image(ds: Dataset, arr: np.ndarray, window: tuple[float, float] | None) -> Image.Image:
    """One frame through the DICOM grayscale or colour pipeline (PS3.4 N.2): palette colour through
    its lookup tables; RGB as is (YBR already converted by pydicom); monochrome through the
    Modality LUT (or rescale), then the ``window`` asked for, else the VOI LUT, else the stored
    window, else the frame's own range; MONOCHROME1 inverted."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(_to_8bit(rgb, (1 << bits) - 1), "RGB")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        bits = int(ds.get("BitsStored", 8) or 8)
        return Image.fromarray(_to_8bit(arr[..., :3], (1 << bits) - 1) if bits > 8
                               else np.clip(arr[..., :3], 0, 255).astype(np.uint8), "RGB")
    data = apply_modality_lut(arr, ds).astype(np.float64)
    voi = ds.get("VOILUTSequence")
    if window is None and voi:
        item = voi[0]
        if "LUTDescriptor" in item:   # values past the table map to its first / last entry (PS3.3
            # C.11.2.1.1); pydicom 3.0 wraps them around instead (256 → entry 0 of a 256-entry table)
            entries, first = int(item.LUTDescriptor[0]) or 65536, int(item.LUTDescriptor[1])
            if first >= 32768 and data.min() < 0:   # a signed first value written as US
                first -= 65536
            data = np.clip(data, first, first + entries - 1)
        out = apply_voi_lut(data, ds, index=0, prefer_lut=True)
        top = (1 << int(item.LUTDescriptor[2])) - 1 if "LUTDescriptor" in item else float(out.max() or 1)
        scaled = _to_8bit(out, top)
    else:
        center, width = window if window else (_first(ds, "WindowCenter"), _first(ds, "WindowWidth"))
        if center is None or not width or width <= 0:
            lo, hi = float(data.min()), float(data.max())
            center, width = (lo + hi) / 2, max(hi - lo, 1.0)
        scaled = (np.clip((data - (center - width / 2)) / width, 0, 1) * 255).astype(np.uint8)
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
    return Image.fromarray(scaled, "L")


def render(ds: Dataset, frame: int, media: str, opts: dict, max_bytes: int = 256 << 20) -> bytes:
    """One frame as an image. Only that frame is decoded, and only when it (as the float64 array
    the windowing works on) fits in ``max_bytes`` (limits.max_instance_mb); else 413."""
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data to render")
    n = frame_count(ds)
    if not 1 <= frame <= n:
        raise NotFound(f"frame {frame} does not exist; the instance has {n}")
    try:
        pixels = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise NotFound("the instance lacks Rows or Columns: nothing to render") from None
    if pixels * 8 > max_bytes:
        raise PayloadTooLarge(f"rendering a frame of {pixels} values needs more than limits.max_instance_mb "
                              f"({max_bytes >> 20} MB)")
    try:
        arr = pixel_array(ds, index=frame - 1 if n > 1 else None)   # YBR arrives as RGB (as_rgb)
        img = to_image(ds, arr, opts.get("window"))
    except (NotAcceptable, NotFound):
        raise
    except Exception as exc:  # noqa: BLE001 - missing decoder plug-in, corrupt data, odd LUTs
        raise NotAcceptable(f"cannot decode the pixel data for rendering ({type(exc).__name__})") from None
    if opts.get("viewport"):
        img.thumbnail(opts["viewport"])
    out = BytesIO()
    fmt = FORMATS[media]
    if fmt == "JPEG":
        img.save(out, fmt, quality=opts.get("quality", 90))
    else:
        img.save(out, fmt)
    return out.getvalue()
