"""Tests of LiverTumorSegLib.result_checks: the warnings attached to a result."""

from __future__ import annotations

import numpy as np

from LiverTumorSegLib.result_checks import (
    image_edge_warning,
    left_out_warning,
    liver_in_air_warning,
    result_warnings,
)


def labels_with_air(n_air: int, n_liver: int = 100, label: int = 1, air_hu: float = -1000.0) -> tuple:
    """(labels, hu): ``n_liver`` liver voxels of ``label``, the first ``n_air`` of them in air."""
    labels = np.zeros((4, 10, 10), np.uint8)
    hu = np.full(labels.shape, 50.0, np.float32)
    flat_labels, flat_hu = labels.reshape(-1), hu.reshape(-1)
    flat_labels[:n_liver] = label
    flat_hu[:n_air] = air_hu
    return labels, hu


def test_tumor_voxels_in_air_count_as_liver_in_air():
    """The liver is labels 1 and 2: a 'tumor' found in air is as suspicious as parenchyma."""
    message = liver_in_air_warning(*labels_with_air(60, label=2))
    assert message is not None and message.startswith("60 % of the liver found lies in air")


def test_liver_in_air_is_flagged_above_ten_percent_only():
    """The threshold is more than 10 %: exactly 10 % is not flagged, 11 % and 20 % are."""
    assert liver_in_air_warning(*labels_with_air(10)) is None
    assert liver_in_air_warning(*labels_with_air(11)).startswith("11 % of the liver")
    assert liver_in_air_warning(*labels_with_air(20)).startswith("20 % of the liver")


def test_air_means_below_minus_500_hu():
    """Fat and lung edges at exactly -500 HU are not air ('below -500 HU')."""
    assert liver_in_air_warning(*labels_with_air(50, air_hu=-500.0)) is None
    assert liver_in_air_warning(*labels_with_air(50, air_hu=-500.5)) is not None


def test_left_out_liver_is_flagged_above_five_percent_of_the_kept_liver():
    """More than 5 % of the kept liver left out is flagged; 5 % or less (the usual specks)
    is not; anything left out of an empty liver is."""
    assert left_out_warning(0.0, 1000.0) is None
    assert left_out_warning(50.0, 1000.0) is None
    assert left_out_warning(60.0, 1000.0) == (
        "60.0 mL labelled liver apart from the liver region kept (1000.0 mL) was left out: a lobe the model "
        "sees as disconnected, or a false positive; check the liver volume")
    assert left_out_warning(400.0, 1000.0) is not None
    assert left_out_warning(1.0, 0.0) is not None


def test_image_edge_warning_names_the_edges_and_the_volume():
    """One edge is 'edge', several are 'edges'; the volume is given to 0.1 mL."""
    stats = {"liver": {"image_edges": ["inferior"], "volume_ml": 1234.56}}
    assert image_edge_warning(stats) == (
        "the liver reaches the inferior edge of the image: it may go on outside the scan, so its volume "
        "(1234.6 mL) is a lower bound")
    stats["liver"]["image_edges"] = ["right", "inferior"]
    assert image_edge_warning(stats).startswith("the liver reaches the right, inferior edges of the image:")
    for edges in ([], None):
        assert image_edge_warning({"liver": {"image_edges": edges, "volume_ml": 1.0}}) is None


def test_result_warnings_lists_every_warning_and_nothing_else():
    """A clean result has no warnings (no None placeholders in stats.json); the edge and
    left-out warnings are both collected, the left-out one only when postprocessing ran."""
    labels, hu = labels_with_air(0)
    clean = {"liver": {"image_edges": [], "volume_ml": 1000.0}}
    assert result_warnings(labels, hu, clean) == []
    assert result_warnings(labels, hu, clean, left_out_ml=10.0) == []
    edged = {"liver": {"image_edges": ["superior"], "volume_ml": 1000.0}}
    assert result_warnings(labels, hu, edged) == [image_edge_warning(edged)]
    assert result_warnings(labels, hu, edged, left_out_ml=300.0) == [image_edge_warning(edged),
                                                                     left_out_warning(300.0, 1000.0)]
    air_labels, air_hu = labels_with_air(90)
    assert result_warnings(air_labels, air_hu, edged) == [liver_in_air_warning(air_labels, air_hu),
                                                          image_edge_warning(edged)]
