"""Rendered and thumbnail images (WADO-RS §10.4.1.1.3, §10.4.1.1.4) with Pillow."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from .errors import BadRequest, NotAcceptable, NotFound
from .multipart import MediaType

FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF"}


def choose_image_media(accept: list[MediaType]) -> str:
    for mt in accept:
        if mt.mime in FORMATS:
            return mt.mime
        if mt.mime in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable("Accept: rendered images are available as image/jpeg, image/png or image/gif")


def parse_render_params(params, thumbnail: bool) -> dict:
    out: dict = {"quality": 90, "viewport": (128, 128) if thumbnail else None, "window": None}
    for name, value in params:
        if name == "quality":
            if not value.isdigit() or not 1 <= int(value) <= 100:
                raise BadRequest("quality: must be an integer from 1 to 100")
            out["quality"] = int(value)
        elif name == "viewport":
            parts = value.split(",")
            if len(parts) not in (2, 6) or not all(p.strip().isdigit() and int(p) > 0 for p in parts[:2]):
                raise BadRequest("viewport: expected vw,vh (positive integers)")
            out["viewport"] = (min(int(parts[0]), 4096), min(int(parts[1]), 4096))
        elif name == "window":
            parts = value.split(",")
            try:
                center, width = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                raise BadRequest("window: expected center,width[,function]") from None
            if width <= 0 or len(parts) > 3:
                raise BadRequest("window: width must be positive")
            out["window"] = (center, width)
        elif name in ("annotation", "charset", "iccprofile"):
            continue
        else:
            raise BadRequest(f"unknown parameter {name[:40]!r} for a rendered resource")
    return out


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)
    except (TypeError, ValueError, IndexError):
        return None


def render(ds: Dataset, frame: int, media: str, opts: dict) -> bytes:
    if "PixelData" not in ds:
        raise NotFound("the instance has no pixel data to render")
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if not 1 <= frame <= n:
        raise NotFound(f"frame {frame} does not exist; the instance has {n}")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoder plug-in, corrupt data
        raise NotAcceptable(f"cannot decode the pixel data for rendering ({type(exc).__name__})") from None
    if n > 1:
        arr = arr[frame - 1]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)[..., :3], "RGB")
    else:
        data = arr.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
            ds.get("RescaleIntercept", 0) or 0)
        if opts.get("window"):
            center, width = opts["window"]
        else:
            center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
            if center is None or not width:
                lo, hi = float(data.min()), float(data.max())
                center, width = (lo + hi) / 2, max(hi - lo, 1.0)
        lo = center - width / 2
        scaled = np.clip((data - lo) / width, 0, 1) * 255
        if photometric == "MONOCHROME1":
            scaled = 255 - scaled
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    if opts.get("viewport"):
        img.thumbnail(opts["viewport"])
    out = BytesIO()
    fmt = FORMATS[media]
    if fmt == "JPEG":
        img.save(out, fmt, quality=opts.get("quality", 90))
    else:
        img.save(out, fmt)
    return out.getvalue()
