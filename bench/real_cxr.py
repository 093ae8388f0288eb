"""Run the Predictor over every real radiograph in ../shared/data/real-cxr and say what came out.

    python bench/real_cxr.py [--weights DIR] [--shared ../shared] [--json OUT]

The demo detector has only seen synthetic radiographs: this is a smoke test (every file goes through without error)
and a look at its behaviour, not an accuracy claim. Where the folder has a reference it is shown next to the output:
the RSNA box of the NIH image 00000013_009 (IoU with our best box), the experts' geographic-extent score of the
COVID-19 images (0-8), and the lung masks (Dice).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pydicom

from models import Predictor
from models.data.lungs import read_gray, read_mask, split_lungs
from models.metrics import box_iou, dice
from node.pixels import prepare

REPO = Path(__file__).resolve().parents[1]


def load(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".dcm":
        return prepare(pydicom.dcmread(path))
    return read_gray(path).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path)
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = args.shared / "data" / "real-cxr"
    predictor = Predictor.load(args.weights, device="cpu")
    files = sorted(
        [
            *root.glob("dicom/*.dcm"),
            *root.glob("nih_png/*.png"),
            *root.glob("rsna_positive_png/*.png"),
            *root.glob("covid_severity/images/*"),
            *root.glob("lung_masks_montgomery/[0-9].jpg"),
        ]
    )
    experts: dict[str, float] = {}
    with (root / "covid_severity" / "covid-severity-scores.csv").open() as handle:
        rows = [line for line in handle if not line.startswith("#")]
    for row in csv.DictReader(rows):
        experts[row["filename"]] = float(row["geographic_mean"])
    rsna_box = np.array([[191.0, 282.0, 191.0 + 219.0, 282.0 + 503.0]]) * 0.25  # 00000013_009 at 256 px
    results = []
    for path in files:
        image = load(path)
        finding = predictor.predict([image])[0]
        entry: dict[str, object] = {
            "file": str(path.relative_to(root)),
            "size": list(image.shape),
            "opacity_present": finding.opacity_present,
            "probability": round(finding.opacity_probability, 3),
            "boxes": len(finding.opacities),
            "severity_total": round(finding.severity.total, 1),
            "extent_total": finding.extent.total,
        }
        if path.name == "00000013_009.png":
            entry["iou_with_rsna_box"] = (
                round(float(box_iou(finding.boxes, rsna_box).max()), 3) if len(finding.boxes) else 0.0
            )
        if path.parent.name == "images" and path.name in experts:
            entry["experts_extent"] = experts[path.name]
            mask = root / "covid_severity" / "lung_masks_v7labs" / path.name
            if mask.is_file():
                right, left = split_lungs(read_mask(mask, image.shape))
                entry["lung_dice"] = round((dice(finding.right_lung, right) + dice(finding.left_lung, left)) / 2, 3)
        if path.parent.name == "lung_masks_montgomery":
            right, left = split_lungs(read_mask(path.with_name(f"{path.stem}-mask.png"), image.shape))
            entry["lung_dice"] = round((dice(finding.right_lung, right) + dice(finding.left_lung, left)) / 2, 3)
        results.append(entry)
        extras = {k: v for k, v in entry.items() if k in ("iou_with_rsna_box", "experts_extent", "lung_dice")}
        print(
            f"{entry['file']:<62} {entry['size'][0]:>5}x{entry['size'][1]:<5} present={str(entry['opacity_present']):<5} "
            f"p={entry['probability']:.3f} boxes={entry['boxes']} severity={entry['severity_total']:5.1f}% "
            f"extent={entry['extent_total']} {extras}"
        )
    print(f"{len(results)} real images, none failed; model {predictor.model_version}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
