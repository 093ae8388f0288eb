"""Synthetic frontal chest radiographs with lung opacities, written as a dataset in the RSNA Pneumonia Detection Challenge layout.

The detector is trained only on these images, so they have to carry what a real radiograph carries: lungs of plausible
shape with the heart, mediastinum, spine, ribs, clavicles, diaphragm and soft tissue around them, exposure and noise that
vary from image to image, and opacities whose number, size and position follow the real RSNA labels (the statistics are
in `models/data/rsna_box_stats.json`, recomputed from `stage_2_train_labels.csv` with `compute_box_stats`).

One module per step:

    stats.py       the RSNA box statistics and the samplers that draw from them
    anatomy.py     one chest in body units (lungs, heart, bones, vessels, devices) and the lung masks
    lesions.py     opacities at real RSNA positions and sizes, their masks and boxes
    render.py      the picture: densities, exposure, detector response, noise
    radiograph.py  `make_radiograph`: all of the above as stored values with ground truth
    dicom.py       `make_dataset`: a radiograph as a CR or DX DICOM object
    dataset.py     `generate_dataset`: a folder in the RSNA layout of models.data.rsna
    command.py     `get_args_parser` + `main` for `cxrnode synth`

Pixel coordinates are continuous with the origin at the top-left corner of the top-left pixel: the pixel in row i,
column j covers [j, j+1) x [i, i+1) and its centre is (j + 0.5, i + 0.5).

The dataset layout is described at `generate_dataset`. The box statistics are recomputed (when the RSNA files are at
hand; the generator itself never reads them) with::

    from models.synth import write_box_stats
    write_box_stats(Path("stage_2_train_labels.csv"), Path("stage_2_detailed_class_info.csv"))

Command line: ``python -m models.synth OUT --n 100 --seed 1`` (the same parser is `cxrnode synth`).
"""

from models.synth.command import get_args_parser, main
from models.synth.dataset import (
    AP_FRACTION,
    BITS_STORED_CHOICES,
    DX_FRACTION,
    MONOCHROME1_FRACTION,
    ImagePlan,
    generate_dataset,
    sample_image_plans,
)
from models.synth.dicom import (
    CR_IMAGE_STORAGE,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    GENERATOR_NAME,
    GENERATOR_VERSION,
    SOP_CLASS_FOR_MODALITY,
    make_dataset,
    window_for,
)
from models.synth.lesions import OPACITY_KINDS
from models.synth.radiograph import (
    PHOTOMETRIC_INTERPRETATIONS,
    VIEW_POSITIONS,
    SyntheticRadiograph,
    make_radiograph,
    presentation_image,
)
from models.synth.render import WORK_MAX_PX
from models.synth.stats import (
    BOX_STATS_PATH,
    BoxStats,
    compute_box_stats,
    load_box_stats,
    sample_box_count,
    sample_box_sides,
    sample_rsna_box,
    write_box_stats,
)

__all__ = [
    "AP_FRACTION",
    "BITS_STORED_CHOICES",
    "BOX_STATS_PATH",
    "CR_IMAGE_STORAGE",
    "DX_FRACTION",
    "DX_IMAGE_STORAGE_FOR_PRESENTATION",
    "GENERATOR_NAME",
    "GENERATOR_VERSION",
    "MONOCHROME1_FRACTION",
    "OPACITY_KINDS",
    "PHOTOMETRIC_INTERPRETATIONS",
    "SOP_CLASS_FOR_MODALITY",
    "VIEW_POSITIONS",
    "WORK_MAX_PX",
    "BoxStats",
    "ImagePlan",
    "SyntheticRadiograph",
    "compute_box_stats",
    "generate_dataset",
    "get_args_parser",
    "load_box_stats",
    "main",
    "make_dataset",
    "make_radiograph",
    "presentation_image",
    "sample_box_count",
    "sample_box_sides",
    "sample_image_plans",
    "sample_rsna_box",
    "window_for",
    "write_box_stats",
]
