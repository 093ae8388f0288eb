"""The severity mask threshold (issue 13): read from the weights' manifest, applied to lung involvement only, in the
config and in the result UIDs only when it is set."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from models.finding import Opacity, Thresholds
from models.predict import involved, upsample_masks
from models.weights import DEMO_WEIGHTS, read_manifest, thresholds_of
from node.config.schema import InferenceSettings
from node.writers import uids
from test_writers import CR, make_finding, make_source


def test_thresholds_of_reads_the_severity_mask_and_defaults_to_none() -> None:
    assert thresholds_of({"thresholds": {"score": 0.9, "mask": 0.5, "present": 0.9}}).severity_mask is None
    chosen = thresholds_of({"thresholds": {"mask": 0.5, "severity_mask": 0.8}})
    assert chosen.severity_mask == 0.8
    assert chosen.severity_mask_or_mask == 0.8
    assert Thresholds(0.5, 0.4, 0.5).severity_mask_or_mask == 0.4


def test_the_demo_weights_record_a_severity_mask_threshold_above_the_mask_threshold() -> None:
    thresholds = thresholds_of(read_manifest(DEMO_WEIGHTS)["detector"])
    assert thresholds.severity_mask is not None
    assert thresholds.mask < thresholds.severity_mask < 1.0


def _opacity_of(probabilities: torch.Tensor, shape: tuple[int, int], mask: float) -> Opacity:
    return Opacity(
        box=(0.0, 0.0, 1.0, 1.0), score=0.99, mask=(upsample_masks(probabilities, shape) >= mask)[0, 0].numpy()
    )


def test_involvement_uses_the_severity_mask_threshold_and_the_reported_masks_keep_theirs() -> None:
    shape = (8, 8)
    probabilities = torch.zeros(1, 1, *shape)
    probabilities[0, 0, :, :4] = 0.6  # counts at mask 0.5, not at 0.8
    probabilities[0, 0, :, 6:] = 0.9  # counts at both
    opacities = [_opacity_of(probabilities, shape, 0.5)]
    same = involved(opacities, probabilities, shape, Thresholds(0.5, 0.5, 0.5))
    assert np.array_equal(same, opacities[0].mask)
    assert int(same.sum()) == 8 * 6
    stricter = involved(opacities, probabilities, shape, Thresholds(0.5, 0.5, 0.5, severity_mask=0.8))
    assert int(stricter.sum()) == 8 * 2
    assert stricter[:, 6:].all() and not stricter[:, :6].any()
    assert int(opacities[0].mask.sum()) == 8 * 6  # the reported mask is untouched
    nothing = involved([], probabilities[:0], shape, Thresholds(0.5, 0.5, 0.5, severity_mask=0.8))
    assert nothing.shape == shape and not nothing.any()


def test_the_config_key_is_optional_and_checked() -> None:
    assert InferenceSettings().severity_mask_threshold is None
    assert InferenceSettings(severity_mask_threshold=0.8).severity_mask_threshold == 0.8
    try:
        InferenceSettings(severity_mask_threshold=1.5)
    except ValueError as error:
        assert "severity_mask_threshold" in str(error)
    else:
        raise AssertionError("a severity_mask_threshold above 1 was accepted")


def test_result_uids_change_with_a_severity_mask_threshold_and_not_without_one() -> None:
    source = make_source(CR)
    finding = make_finding((int(source.Rows), int(source.Columns)), 1)
    plain = uids.result_key(source, finding, "1.0")
    assert "severity_mask" not in plain.settings  # results written before the threshold existed keep their UIDs
    stricter = replace(finding, thresholds=replace(finding.thresholds, severity_mask=0.8))
    other = uids.result_key(source, stricter, "1.0")
    assert '"severity_mask":0.8' in other.settings
    assert other.instance_uid("seg") != plain.instance_uid("seg")
