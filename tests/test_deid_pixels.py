"""Pixel-cleaning recipes: images with text drawn into known regions are cleaned where a rule covers
them (checked with OCR: tesseract reads the identity before and not after), recorded as Clean Pixel
Data; images no rule covers stay refused."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tempfile

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, RLELossless, UltrasoundImageStorage

from omi_dsf.deid import pixels

from omi_dsf.deid.leakcheck import LeakError
from omi_dsf.deid.pipeline import StudyPseudonymizer
from omi_dsf.deid.pseudonyms.embedded import EmbeddedProvider
from omi_dsf.deid.refusal import Refused
from omi_dsf.deid.store import SiteStore
from omi_dsf.testkit import synthetic

KEY = b"pixel-test-key-0123456789"
ROWS, COLS = 480, 640
BAND = (0, 0, COLS, 44)           # where the synthetic device writes the patient
IDENTITY_TEXT = "MUSTERMANN MAX 4711-0815"
KEPT_TEXT = "L12-5 36Hz"
needs_ocr = pytest.mark.skipif(shutil.which("tesseract") is None,
                               reason="tesseract not installed (Debian package tesseract-ocr, tools/apt-packages.txt)")


def ocr(image: np.ndarray) -> str:
    """Words tesseract reads in an 8-bit image (grey or RGB), upper case. Burned-in text is bright
    on a dark image: binarized and inverted first, so that speckle does not read as letters."""
    grey = image.max(axis=-1) if image.ndim == 3 else image
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "i.png")
        Image.fromarray(np.where(grey > 128, 0, 255).astype(np.uint8)).save(path)
        # one thread: tesseract's OpenMP threads spin against each other on a busy machine (same text)
        out = subprocess.run(["tesseract", path, "-", "--psm", "11"], capture_output=True, text=True,
                             check=True, env={**os.environ, "OMP_THREAD_LIMIT": "1"}).stdout
    return out.upper()


def drawn(rgb: bool = False) -> np.ndarray:
    """A dark image with speckle, the patient in the top band and a setting in the left margin."""
    rng = np.random.default_rng(15)
    grey = (rng.random((ROWS, COLS)) * 40).astype(np.uint8)
    img = Image.fromarray(np.stack([grey] * 3, -1) if rgb else grey)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=28)
    white = (255, 255, 255) if rgb else 255
    draw.text((8, 6), IDENTITY_TEXT, fill=white, font=font)
    draw.text((8, 220), KEPT_TEXT, fill=white, font=font)
    return np.asarray(img)


def us_instance(image: np.ndarray, frames: int = 1, rows: int = ROWS) -> Dataset:
    base = synthetic.ct_instance(0)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientName", "PatientID",
               "PatientBirthDate", "StudyDate", "AccessionNumber", "InstitutionName"):
        setattr(ds, kw, getattr(base, kw))
    ds.SOPClassUID = UltrasoundImageStorage
    ds.Modality = "US"
    ds.Manufacturer = "OMI Test Devices"
    ds.ManufacturerModelName = "Synth US 3"
    ds.BurnedInAnnotation = "YES"
    arr = np.stack([image] * frames) if frames > 1 else image
    photometric = "RGB" if image.ndim == 3 else "MONOCHROME2"
    ds.set_pixel_data(arr[..., :rows, :, :] if image.ndim == 3 else arr[..., :rows, :], photometric, 8,
                      generate_instance_uid=False)
    return ds


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "site-recipes.tsv"
    x, y, w, h = BAND
    path.write_text("manufacturer\tmodel\tsop_class\trows\tcolumns\trectangles\tsource\n"
                    f"omi test\tsynth us\t{UltrasoundImageStorage}\t{ROWS}\t{COLS}\t{x},{y},{w},{h}\ttest images\n")
    return path


def run(ds: Dataset, recipes=()):
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store,
                            pixel_recipes=recipes)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out = sp.process_encoded(buf.getvalue(), "us.dcm")
    return pydicom.dcmread(io.BytesIO(out.data))


def _assert_cleaned(before: np.ndarray, after: np.ndarray) -> None:
    x, y, w, h = BAND
    inside = after[..., y:y + h, x:x + w, :] if after.ndim >= 3 and after.shape[-1] == 3 else after[..., y:y + h, x:x + w]
    assert inside.min() == inside.max()                      # blank
    rest = np.ones(before.shape[-3:-1] if before.shape[-1] == 3 else before.shape[-2:], bool)
    rest[y:y + h, x:x + w] = False
    if before.shape[-1] == 3:
        assert np.array_equal(before[..., rest, :], after[..., rest, :])
    else:
        assert np.array_equal(before[..., rest], after[..., rest])


@needs_ocr
def test_recipe_cleans_the_band_and_ocr_no_longer_reads_the_patient(recipe):
    image = drawn()
    assert "MUSTERMANN" in ocr(image)            # the OCR check can fail: it reads the text when there
    back = run(us_instance(image), [recipe])
    assert back.BurnedInAnnotation == "NO"
    assert [i.CodeValue for i in back.DeidentificationMethodCodeSequence][-1] == "113101"
    assert "Clean Pixel Data Option" in back.DeidentificationMethod
    after = back.pixel_array
    _assert_cleaned(image, after)
    text = ocr(after)
    for token in ("MUSTERMANN", "MAX", "4711", "0815"):
        assert token not in text
    assert "36HZ" in text.replace(" ", "") or "L12-5" in text   # OCR still reads what was kept


def test_multiframe_rgb_rle_source_is_cleaned_in_every_frame(recipe):
    image = drawn(rgb=True)
    ds = us_instance(image, frames=2)
    ds.compress(RLELossless, generate_instance_uid=False)
    back = run(ds, [recipe])
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert int(back.NumberOfFrames) == 2
    after = back.pixel_array
    for frame in after:
        _assert_cleaned(image, frame)


def test_image_no_rule_covers_is_refused_naming_the_device_and_geometry(recipe):
    ds = us_instance(drawn(), rows=400)           # same device, another geometry
    with pytest.raises(LeakError, match=r"BurnedInAnnotation \(0028,0301\) is YES; no pixel recipe covers"
                                        r" Manufacturer 'OMI Test Devices', model 'Synth US 3', SOP class"
                                        r" Ultrasound Image Storage, 400 rows x 640 columns \(rule: burned-in"):
        run(ds, [recipe])


def test_flag_absent_on_us_is_cleaned_too(recipe):
    ds = us_instance(drawn())
    del ds.BurnedInAnnotation
    assert run(ds, [recipe]).BurnedInAnnotation == "NO"


@pytest.mark.parametrize("line,message", [
    ("a\tb\t*\t480\t640\t0,0,640\tx", r"site\.tsv:2: rectangles must be x,y,width,height"),
    ("a\tb\t*\t0\t640\t0,0,640,40\tx", r"site\.tsv:2: rows must be a positive number or \*"),
    ("a\tb\t*\t480\t640\t0,0,0,40\tx", r"site\.tsv:2: rectangles must be"),
])
def test_recipe_errors_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "site.tsv"
    path.write_text("\t".join(pixels._COLUMNS) + "\n" + line + "\n")
    with pytest.raises(pixels.RecipeError, match=message):
        pixels.load([path])


def test_site_rules_come_before_the_shipped_ones(tmp_path):
    path = tmp_path / "site.tsv"
    path.write_text("\t".join(pixels._COLUMNS) + "\nphilips\tepiq\t*\t*\t*\t0,0,10,10\tsite\n")
    rules = pixels.load([path])
    ds = Dataset()
    ds.Manufacturer, ds.ManufacturerModelName = "Philips Medical Systems", "EPIQ 5G"
    ds.SOPClassUID, ds.Rows, ds.Columns = UltrasoundImageStorage, 768, 1024
    assert pixels.match(rules, ds).where == f"{path}:2"
    assert pixels.match(pixels.load(), ds).where.startswith("pixel_recipes.tsv:")


@needs_ocr
@pytest.mark.parametrize("name,secrets", [
    ("GREYSCALE_IMAGE.dcm", ("PATIENT", "00079241539", "08/29/1951", "CLEVELAN")),
    ("RGB_IMAGE.dcm", ("ZZZDOWNTIME", "00047431395", "120907058", "CLEVELAND")),
])
def test_shipped_rules_clean_real_ultrasound_images(name, secrets):
    deid_data = pytest.importorskip("deid_data", reason="deid-data (the benchmark's corpus) not installed")
    path = os.path.join(os.path.dirname(deid_data.__file__), "data", "ultrasounds", name)
    original = pydicom.dcmread(path).pixel_array
    before = ocr(original)
    assert any(s in before for s in secrets)
    store = SiteStore()
    sp = StudyPseudonymizer(key=KEY, domain="omi", provider=EmbeddedProvider(KEY, store), store=store)
    back = pydicom.dcmread(io.BytesIO(sp.process_encoded(path, name).data))
    after = ocr(back.pixel_array)
    assert not [s for s in secrets if s in after]


def test_pixels_that_cannot_be_decoded_are_a_refusal_not_a_crash(recipe, tmp_path, capsys):
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from omi_dsf.cli import main
    ds = us_instance(drawn())
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream"])
    ds["PixelData"].is_undefined_length = True
    with pytest.raises(Refused, match=r"^us\.dcm \(SOPInstanceUID 2\.25\.\d+\): PixelData \(7FE0,0010\) cannot be"
                                      r" decoded to clean it \(\w+\) \(rule: pixel recipe .*site-recipes\.tsv:2\)"):
        run(ds, [recipe])
    src = tmp_path / "in"
    src.mkdir()
    ds.save_as(src / "us.dcm", enforce_file_format=True)
    key = tmp_path / "k"
    key.write_text("pixel-cli-key-0123456789")
    assert main(["deid", str(src), str(tmp_path / "out"), "--domain", "omi", "--key-file", str(key),
                 "--store", str(tmp_path / "s.sqlite"), "--pixel-recipes", str(recipe)]) == 2
    assert "cannot be decoded to clean it" in capsys.readouterr().err
