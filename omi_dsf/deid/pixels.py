"""Clean Pixel Data (PS3.15 E.3.1): blank the regions where known devices burn identifying text.

The recipes say, per Manufacturer / model / SOP class / rows x columns, which rectangles to blank
(in the spirit of the CTP anonymizer's pixel rules); `pixel_recipes.tsv` beside this module is the
shipped set, sites add files of their own. A cleaned image is written uncompressed, with
BurnedInAnnotation NO and the Clean Pixel Data Option (DCM 113101) in De-identification Method
(Code Sequence). An image that may show text and that no rule covers stays refused.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from . import profile
from .refusal import Refused

CLEAN_PIXEL_CODE = ("113101", "Clean Pixel Data Option")
_COLUMNS = ("manufacturer", "model", "sop_class", "rows", "columns", "rectangles", "source")
SHIPPED = "pixel_recipes.tsv"


class RecipeError(ValueError):
    """A recipe file that cannot be used; names the file, the line and the field."""


@dataclass(frozen=True)
class PixelRule:
    manufacturer: str            # "" = any; else contained in Manufacturer, ignoring case
    model: str
    sop_class: str
    rows: int | None
    columns: int | None
    rectangles: tuple[tuple[int, int, int, int], ...]   # x, y, width, height
    where: str                   # file:line, for messages

    def matches(self, ds: Dataset) -> bool:
        def text(kw: str) -> str:
            return str(ds.get(kw, "") or "").strip()
        return ((not self.manufacturer or self.manufacturer.lower() in text("Manufacturer").lower())
                and (not self.model or self.model.lower() in text("ManufacturerModelName").lower())
                and (not self.sop_class or self.sop_class == text("SOPClassUID"))
                and (self.rows is None or self.rows == int(ds.get("Rows", 0) or 0))
                and (self.columns is None or self.columns == int(ds.get("Columns", 0) or 0)))


def _field(value: str) -> str:
    value = (value or "").strip()
    return "" if value == "*" else value


def _size(value: str, where: str, name: str) -> int | None:
    value = _field(value)
    if not value:
        return None
    if not value.isdigit() or int(value) == 0:
        raise RecipeError(f"{where}: {name} must be a positive number or *, not {value!r}")
    return int(value)


def _rectangles(value: str, where: str) -> tuple[tuple[int, int, int, int], ...]:
    out = []
    for part in (value or "").split(";"):
        numbers = [p.strip() for p in part.split(",")]
        if len(numbers) != 4 or not all(n.isdigit() for n in numbers) or 0 in map(int, numbers[2:]):
            raise RecipeError(f"{where}: rectangles must be x,y,width,height (width and height > 0),"
                              f" ';' between several; not {part.strip()!r}")
        x, y, w, h = map(int, numbers)
        out.append((x, y, w, h))
    return tuple(out)


def parse(text: str, name: str) -> tuple[PixelRule, ...]:
    """The rules of one recipe file (TSV with the columns of `pixel_recipes.tsv`)."""
    numbered = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.startswith("#")]
    if not numbered:
        return ()
    header = [c.strip() for c in numbered[0][1].split("\t")]
    if tuple(header[:len(_COLUMNS)]) != _COLUMNS:
        raise RecipeError(f"{name}:{numbered[0][0]}: the header must be {' '.join(_COLUMNS)} (tab separated)")
    rules = []
    for n, row in zip((n for n, _ in numbered[1:]),
                      csv.DictReader([line for _, line in numbered], delimiter="\t", quoting=csv.QUOTE_NONE)):
        where = f"{name}:{n}"
        rules.append(PixelRule(_field(row["manufacturer"]), _field(row["model"]), _field(row["sop_class"]),
                               _size(row["rows"], where, "rows"), _size(row["columns"], where, "columns"),
                               _rectangles(row["rectangles"], where), where))
    return tuple(rules)


def load(paths=()) -> tuple[PixelRule, ...]:
    """The site's recipe files (tried first, in order) and then the shipped one."""
    rules: list[PixelRule] = []
    for p in paths or ():
        try:
            text = Path(p).read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(f"pixel recipe file {p}: {exc.strerror or exc}") from None
        rules.extend(parse(text, os.fspath(p)))
    shipped = resources.files(__package__).joinpath(SHIPPED).read_text(encoding="utf-8")
    rules.extend(parse(shipped, SHIPPED))
    return tuple(rules)


def match(rules, ds: Dataset) -> PixelRule | None:
    return next((r for r in rules if r.matches(ds)), None)


def describe(ds: Dataset) -> str:
    """The image as the recipes see it (device and geometry: no patient data)."""
    sop = str(ds.get("SOPClassUID", "") or "")
    sop_name = UID(sop).name if sop else "?"
    return (f"Manufacturer {str(ds.get('Manufacturer', '') or '')!r}, model "
            f"{str(ds.get('ManufacturerModelName', '') or '')!r}, SOP class {sop_name}, "
            f"{ds.get('Rows', '?')} rows x {ds.get('Columns', '?')} columns")


def clean(ds: Dataset, rule: PixelRule) -> None:
    """Blank the rule's rectangles in every frame; record the Clean Pixel Data Option."""
    try:
        arr = np.array(ds.pixel_array)         # YBR is decoded to RGB
    except Exception as exc:  # no decoder for this compression, damaged data, ...
        raise Refused(f"PixelData (7FE0,0010) cannot be decoded to clean it ({type(exc).__name__})"
                      f" (rule: pixel recipe {rule.where})") from None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if samples == 3:
        photometric = "RGB"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    had_frames = "NumberOfFrames" in ds
    fill = arr.max() if photometric == "MONOCHROME1" else arr.min()
    view = arr if frames > 1 else arr[np.newaxis]
    for x, y, w, h in rule.rectangles:
        view[:, y:y + h, x:x + w] = fill
    try:
        ds.set_pixel_data(arr, photometric, int(ds.BitsStored), generate_instance_uid=False)
    except (ValueError, NotImplementedError, AttributeError) as exc:
        raise Refused(f"PixelData (7FE0,0010) cannot be written back after cleaning ({exc.__class__.__name__})"
                      f" (rule: pixel recipe {rule.where})") from None
    if had_frames and "NumberOfFrames" not in ds:
        ds.NumberOfFrames = 1   # Type 1 in multi-frame IODs: keep it
    ds.BurnedInAnnotation = "NO"
    record(ds)


def record(ds: Dataset) -> None:
    """Add the Clean Pixel Data Option to the de-identification record (PS3.15 E.1.1)."""
    item = profile.dcm_code(*CLEAN_PIXEL_CODE)
    if "DeidentificationMethodCodeSequence" in ds:
        ds.DeidentificationMethodCodeSequence.append(item)
    else:
        ds.DeidentificationMethodCodeSequence = [item]
    value = ds.get("DeidentificationMethod")
    methods = [] if value is None else [value] if isinstance(value, str) else list(value)
    ds.DeidentificationMethod = [m for m in methods if m] + [CLEAN_PIXEL_CODE[1]]
