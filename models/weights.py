"""Weights on disk: a folder with `manifest.json` and one safetensors file per network.

manifest.json:
    {"name": "...", "version": "...",
     "detector": {"file": "detector.safetensors", "sha256": "...", "config": {...DetectorConfig...},
                  "thresholds": {"score": ..., "mask": ..., "present": ..., "severity_mask": ...},
                  "trained": {...}},
     "lungs":    {"file": "lungs.safetensors", "sha256": "...", "config": {...LungConfig...}, "trained": {...}}}

Tensors are stored in float16 (half the size; the loader casts back to float32). safetensors is used instead of
pickle so that loading a weights file can never run code. The loader checks every file against its SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.errors import WeightsError
from models.finding import Thresholds
from models.nets import DetectorConfig, LungConfig

MANIFEST = "manifest.json"
DEMO_WEIGHTS = Path(__file__).parent / "weights"
DEFAULT_THRESHOLDS = Thresholds(score=0.5, mask=0.5, present=0.5)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(weights_dir: Path) -> dict[str, Any]:
    path = weights_dir / MANIFEST
    if not weights_dir.is_dir():
        raise WeightsError(f"{weights_dir}: weights folder does not exist; pass a folder with {MANIFEST}")
    if not path.is_file():
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise WeightsError(f"{path}: not valid JSON ({error}); restore it or export the weights again") from error
    if not isinstance(manifest, dict):
        raise WeightsError(f"{path}: expected a JSON object at the top level")
    return manifest


def _write_atomically(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        tmp.write(text)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


def save_network(
    weights_dir: Path,
    role: str,
    model: torch.nn.Module,
    config: DetectorConfig | LungConfig,
    *,
    extra: dict[str, Any] | None = None,
    name: str = "cxrnode",
    version: str = "0",
) -> Path:
    """Write `model`'s weights as float16 safetensors and record them (checksum, config) in the manifest."""
    if role not in ("detector", "lungs"):
        raise ValueError(f"role must be 'detector' or 'lungs', not {role!r}")
    weights_dir.mkdir(parents=True, exist_ok=True)
    path = weights_dir / f"{role}.safetensors"
    state = {
        k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in model.state_dict().items()
    }
    save_file(state, str(path), metadata={"role": role})
    manifest = read_manifest(weights_dir)
    manifest.setdefault("name", name)
    manifest.setdefault("version", version)
    manifest[role] = {"file": path.name, "sha256": sha256(path), "config": config.to_dict(), **(extra or {})}
    _write_atomically(weights_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def set_manifest_fields(weights_dir: Path, **fields: Any) -> None:
    """Update top-level manifest fields (name, version) or a role's entries (e.g. detector={'thresholds': ...})."""
    manifest = read_manifest(weights_dir)
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    _write_atomically(weights_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class LoadedNetwork:
    state: dict[str, torch.Tensor]
    entry: dict[str, Any]
    sha256: str


def load_network(weights_dir: Path, role: str) -> LoadedNetwork:
    """Read and verify one network's weights; float tensors come back as float32."""
    manifest = read_manifest(weights_dir)
    entry = manifest.get(role)
    where = weights_dir / MANIFEST
    if not isinstance(entry, dict):
        raise WeightsError(
            f"{where}: has no '{role}' entry; train it (cxrnode {'train' if role == 'detector' else 'train-lungs'} "
            f"... --out {weights_dir}) or point --weights at a complete weights folder"
        )
    for key in ("file", "sha256", "config"):
        if key not in entry:
            raise WeightsError(f"{where}: '{role}' entry lacks '{key}'")
    path = weights_dir / entry["file"]
    if not path.is_file():
        raise WeightsError(f"{path}: weights file named in {where} is missing")
    actual = sha256(path)
    if actual != entry["sha256"]:
        raise WeightsError(
            f"{path}: SHA-256 {actual[:12]}… does not match {entry['sha256'][:12]}… recorded in {where}; "
            "the file is corrupt or was replaced — restore it (git checkout / copy it again)"
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise WeightsError(f"{path}: not a readable safetensors file ({error})") from error
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return LoadedNetwork(state=state, entry=entry, sha256=actual)


def load_into(model: torch.nn.Module, loaded: LoadedNetwork, path_for_errors: Path) -> None:
    try:
        model.load_state_dict(loaded.state, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()[0:3]
        raise WeightsError(
            f"{path_for_errors}: weights do not fit the network described in the manifest ({' '.join(first)})"
        ) from error


def thresholds_of(entry: dict[str, Any]) -> Thresholds:
    """The thresholds recorded with a network's manifest entry; those missing are the defaults (severity_mask: the
    mask threshold)."""
    values = entry.get("thresholds") or {}
    severity_mask = values.get("severity_mask")
    return Thresholds(
        score=float(values.get("score", DEFAULT_THRESHOLDS.score)),
        mask=float(values.get("mask", DEFAULT_THRESHOLDS.mask)),
        present=float(values.get("present", DEFAULT_THRESHOLDS.present)),
        severity_mask=None if severity_mask is None else float(severity_mask),
    )
