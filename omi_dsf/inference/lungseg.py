"""Lung segmentation on chest CT by classical image processing (no learned weights).

Steps: air-like voxels (< -400 HU) → 3-D connected components → drop components touching
the in-plane image border (the air around the patient) → keep the two largest remaining
components (the lungs; trachea and bowel gas are smaller) → fill holes slice by slice
(vessels inside the lung belong to it) → a light opening against noise.

Known limits, stated because they are real: lungs that touch each other or the trachea
in 3-D form one component and come out as one lung; a field of view that cuts through
the body lets lung air touch the border and be dropped. The expected orientation is
axial with rows running anterior→posterior and columns patient right→left (the DICOM
standard image orientation 1\\0\\0\\0\\1\\0), so the lung in lower columns is the right one.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from scipy import ndimage

NAME = "lung-seg"
VERSION = "1.0.0"
AIR_THRESHOLD_HU = -400
RIGHT, LEFT = 1, 2  # label values in the output
DEFAULT_MAX_SLICES = 600
MAX_MATRIX = 1024          # rows and columns of a slice at most


def segment_lungs(hu: np.ndarray) -> np.ndarray:
    """Label volume (uint8, same shape as `hu` z-y-x): 0 background, 1 right lung, 2 left lung."""
    if hu.ndim != 3:
        raise ValueError(f"expected a 3-D volume (slices, rows, cols), got shape {hu.shape}")
    air = hu < AIR_THRESHOLD_HU
    # 6-connectivity in 3-D: thin tissue between lung and outside air keeps them apart.
    components, count = ndimage.label(air)
    if count == 0:
        return np.zeros(hu.shape, np.uint8)
    border = np.zeros(count + 1, bool)
    for edge in (components[:, 0, :], components[:, -1, :], components[:, :, 0], components[:, :, -1]):
        border[np.unique(edge)] = True
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    sizes[border] = 0
    sizes[0] = 0
    candidates = [int(i) for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 0]
    # a second component much smaller than the first is trachea or gas, not a lung
    candidates = [i for i in candidates if sizes[i] >= 0.1 * sizes[candidates[0]]]
    labels = np.zeros(hu.shape, np.uint8)
    centres = {i: ndimage.center_of_mass(components == i)[2] for i in candidates}
    ordered = sorted(candidates, key=lambda i: centres[i])
    if len(ordered) == 1:
        # one lung (or two merged): name it by which half of the image it lies in
        values = [RIGHT if centres[ordered[0]] < hu.shape[2] / 2 else LEFT]
    else:
        values = [RIGHT, LEFT]
    open_struct = ndimage.generate_binary_structure(2, 1)
    for comp, value in zip(ordered, values):
        mask = components == comp
        for k in range(mask.shape[0]):
            if mask[k].any():
                filled = ndimage.binary_fill_holes(mask[k])
                filled = ndimage.binary_opening(filled, open_struct)
                labels[k][filled & (labels[k] == 0)] = value
    return labels


def volumes_ml(labels: np.ndarray, spacing_mm: tuple[float, float, float]) -> tuple[float, float]:
    """(right, left) lung volume in millilitres for voxel spacing (slice, row, col) in mm."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=3)
    return float(counts[RIGHT] * voxel_ml), float(counts[LEFT] * voxel_ml)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


class ModelInputError(ValueError):
    """The inputs are well-formed tensors but not something this model can work on."""


class Model(Protocol):
    name: str
    version: str
    ready: bool

    def metadata(self) -> dict: ...

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class LungSegModel:
    """Both lungs on an axial chest CT volume given in Hounsfield units."""

    name = NAME
    version = VERSION

    def __init__(self, max_slices: int = DEFAULT_MAX_SLICES, min_slices: int = 3):
        self.max_slices, self.min_slices = max_slices, min_slices
        self.ready = True

    def metadata(self) -> dict:
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "python-numpy-scipy",
            "inputs": [
                {"name": "HU", "datatype": "INT16", "shape": [-1, -1, -1]},
                {"name": "SPACING_MM", "datatype": "FP32", "shape": [3]},
            ],
            "outputs": [
                {"name": "LUNG_LABELS", "datatype": "UINT8", "shape": [-1, -1, -1]},
                {"name": "LUNG_VOLUME_ML", "datatype": "FP32", "shape": [2]},
            ],
            "parameters": {
                "description": "lung segmentation by thresholding, connected components and morphology",
                "algorithm_name": self.name,
                "algorithm_version": self.version,
                "modality": "CT",
                "body_part": "CHEST",
                "orientation": "axial, image orientation 1\\0\\0\\0\\1\\0",
                "min_slices": self.min_slices,
                "max_slices": self.max_slices,
                "max_matrix": MAX_MATRIX,
                "inputs": {"HU": "volume (slices, rows, cols) in Hounsfield units, cranial slice first",
                           "SPACING_MM": "voxel spacing (between slices, rows, cols) in mm"},
                "labels": {"0": "background", str(RIGHT): "right lung", str(LEFT): "left lung"},
                "outputs": {"LUNG_VOLUME_ML": "(right, left) lung volume in ml"},
            },
        }

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        hu, spacing = inputs["HU"], inputs["SPACING_MM"]
        if not self.min_slices <= hu.shape[0] <= self.max_slices:
            raise ModelInputError(f"input 'HU' has {hu.shape[0]} slices; model '{self.name}' accepts "
                                  f"{self.min_slices} to {self.max_slices}")
        if not 16 <= min(hu.shape[1:]) <= max(hu.shape[1:]) <= MAX_MATRIX:
            raise ModelInputError(f"input 'HU' slices of {hu.shape[1]}x{hu.shape[2]}: the model accepts 16x16 "
                                  f"to {MAX_MATRIX}x{MAX_MATRIX}")
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise ModelInputError(f"input 'SPACING_MM' must be three positive numbers, got {spacing.tolist()}")
        labels = segment_lungs(hu)
        right, left = volumes_ml(labels, tuple(float(s) for s in spacing))
        return {"LUNG_LABELS": labels, "LUNG_VOLUME_ML": np.array([right, left], np.float32)}
