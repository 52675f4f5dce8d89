"""Cases whose expected values were computed by hand or printed in the tutorials the book discusses."""
import numpy as np
import pytest

import roilib
from roilib import geometry


def test_roi_pool_reproduces_the_mxnet_4x4_example():
    # a common MXNet example: ROIPooling on arange(16), pooled 2x2, scale 1
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    rois = np.array([[0, 0, 0, 2, 2], [0, 0, 1, 3, 3]], dtype=np.float32)
    out = roilib.roi_pool(x, rois, (2, 2), 1.0)
    np.testing.assert_array_equal(out[0, 0], [[5, 6], [9, 10]])
    np.testing.assert_array_equal(out[1, 0], [[9, 11], [13, 15]])


@pytest.mark.parametrize("aligned, first_row", [(False, [7.5, 8, 8.5, 9]), (True, [4.5, 5, 5.5, 6])])
def test_roi_align_on_a_5x5_ramp(aligned, first_row):
    # value(y, x) = 5y + x is linear, so bilinear samples are exact: with aligned=False the
    # box [1, 3] has bins of 0.5 and one sample per bin at 1.25, 1.75, ...; aligned=True
    # shifts every sample by -0.5, i.e. by -(5 + 1) * 0.5 = -3 in value.
    x = np.arange(25, dtype=np.float64).reshape(1, 1, 5, 5)
    out = roilib.roi_align(x, np.array([[0, 1, 1, 3, 3]], float), 4, aligned=aligned)
    np.testing.assert_allclose(out[0, 0, 0], first_row)
    np.testing.assert_allclose(out[0, 0, :, 0], np.array(first_row[0]) + 5 * 0.5 * np.arange(4))


def test_roi_align_reproduces_tutorial_example_with_its_rounded_box():
    # the tutorial rounds the scaled box to [230.02, 69.24, 262.46, 80.5] before continuing
    box = np.array([[0, 230.02, 69.24, 262.46, 80.5]])
    geo = geometry.roi_align_boxes(box, (7, 7), 1.0, 2, aligned=False)
    assert round(float(geo.bin_w[0]), 2) == 4.63
    assert round(float(geo.bin_h[0]), 2) == 1.61  # 11.26 / 7 = 1.6086; the tutorial truncates to 1.60
    y = geometry.sample_points(geo.start_y[0], geo.bin_h[0], 2, 7)[0]
    x = geometry.sample_points(geo.start_x[0], geo.bin_w[0], 2, 7)[0]
    assert (round(y, 2), round(x, 2)) == (69.64, 231.18)
    corners = geometry.bilinear_corners(y, x, 200, 272)
    assert (corners.y_low, corners.y_high, corners.x_low, corners.x_high) == (69, 70, 231, 232)
    # distances to the cell's top, bottom, left, right edges
    assert [round(d, 2) for d in (y - 69, 70 - y, x - 231, 232 - x)] == [0.64, 0.36, 0.18, 0.82]
    # the tutorial lists the areas of the four sub-rectangles top-left, top-right,
    # bottom-left, bottom-right; each is the weight of the diagonally opposite corner
    areas = corners.weights[::-1, ::-1]
    np.testing.assert_array_equal(np.round(areas, 2), [[0.11, 0.53], [0.06, 0.29]])


def test_roi_align_reproduces_tutorial_example_at_full_precision():
    rois = np.array([[0, 920.11, 276.99, 1049.87, 322.0]])
    scaled = geometry.scale_boxes(rois, 0.25)
    np.testing.assert_allclose(scaled[0], [230.0275, 69.2475, 262.4675, 80.5])
    geo = geometry.roi_align_boxes(rois, (7, 7), 0.25, 2, aligned=False)
    np.testing.assert_allclose([geo.bin_w[0], geo.bin_h[0]], [32.44 / 7, 11.2525 / 7])
    s = geometry.axis_samples(geo.start_y[0], geo.bin_h[0], 2, 7, 200)
    np.testing.assert_allclose(s.coord[:2], [69.2475 + 11.2525 / 28, 69.2475 + 3 * 11.2525 / 28])


def test_feature_map_projection_of_blog_example_box():
    # a 200x145 box at (296, 192) on a stride-32 map: 6.25 x 4.53 at (9.25, 6)
    scaled = geometry.scale_boxes(np.array([[0, 296, 192, 296 + 200, 192 + 145]]), 1 / 32)[0]
    np.testing.assert_allclose(scaled[:2], [9.25, 6.0])
    np.testing.assert_allclose(scaled[2:] - scaled[:2], [6.25, 4.53125])


def test_roipool_quantizes_blog_example_665px_box_to_20_cells():
    # 665 / 32 = 20.78 on the map; RoIPool rounds the corners
    q = geometry.quantize_boxes(np.array([[0, 0, 0, 665, 665]]), 1 / 32)[0]
    assert q.tolist() == [0, 0, 21, 21]  # C round of 20.78 is 21 ...
    floor_size = np.floor(665 / 32)
    assert floor_size == 20  # ... while the tutorials' description floors it to 20


def test_c_round_rounds_half_away_from_zero():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49999997], dtype=np.float32)
    np.testing.assert_array_equal(geometry.c_round(x), [-3, -2, -1, 1, 2, 3, 0])
    assert np.round(np.float32(2.5)) == 2  # NumPy's own rounding would differ


def test_spp_appendix_bins_for_a10_n6():
    start, end = geometry.spp_bins(10, 6)
    # floor(i*10/6) and ceil((i+1)*10/6) by hand
    assert start.tolist() == [0, 1, 3, 5, 6, 8]
    assert end.tolist() == [2, 4, 5, 7, 9, 10]


def test_spp_training_windows_miss_the_map_end_for_a10_n6():
    start, end = geometry.spp_training_windows(10, 6)
    # win = ceil(10/6) = 2, stride = floor(10/6) = 1: windows [i, i + 2)
    assert start.tolist() == [0, 1, 2, 3, 4, 5]
    assert end.tolist() == [2, 3, 4, 5, 6, 7]


def test_roi_pool_bins_of_a_7_cell_box_into_3():
    # width 7 into 3 bins of 7/3: [0, 3), [2, 5), [4, 7) -- overlapping, as in Caffe
    bins = geometry.roi_pool_bins(np.array([[0, 0, 0, 6, 6]]), (3, 3), 1.0, 10, 10)
    assert bins.wstart[0].tolist() == [0, 2, 4]
    assert bins.wend[0].tolist() == [3, 5, 7]


def test_read_region_of_the_running_example_in_both_conventions():
    # box (296, 192)-(496, 337) at stride 32: (9.25, 6)-(15.5, 10.53125) on the map; its
    # corners round to 9, 6, 16, 11 (15.5 rounds away from zero, to 16)
    rois = np.array([[0, 296, 192, 496, 337]])
    # the book's convention, cell i = [i, i + 1): RoIPool's cells 9..16 and 6..11
    pool = geometry.read_region(rois, 1 / 32, "pool")[0]
    assert pool.tolist() == [9, 6, 17, 12]
    # the legacy convention, cell i = [i - 1/2, i + 1/2]
    legacy = geometry.read_region(rois, 1 / 32, "pool", convention="index")[0]
    assert legacy.tolist() == [8.5, 5.5, 16.5, 11.5]
    # RoIWarp samples from the centre of cell 9 to the centre of cell 16; aligned RoIAlign
    # reads the box itself, aligned=False RoIAlign the box moved by half a cell
    assert geometry.read_region(rois, 1 / 32, "warp")[0].tolist() == [9.5, 6.5, 16.5, 11.5]
    assert geometry.read_region(rois, 1 / 32, "aligned")[0].tolist() == [9.25, 6, 15.5, 10.53125]
    assert geometry.read_region(rois, 1 / 32, "align")[0].tolist() == [9.75, 6.5, 16, 11.03125]
    # a 16 x 16 map spans [0, 16]: column 16 is cut off
    clipped = geometry.read_region(rois, 1 / 32, "pool", height=16, width=16)[0]
    assert clipped.tolist() == [9, 6, 16, 12]
    lost, gained = geometry.area_lost_and_gained(geometry.scale_boxes(rois, 1 / 32), clipped[None])
    assert lost[0] == 0  # the box lies inside [9, 16] x [6, 12]
    assert gained[0] == pytest.approx(7 * 6 - 6.25 * 4.53125)
    # centres: cells (9 + 17) / 2 = 13 against (9.25 + 15.5) / 2 = 12.375, i.e. 0.625
    # cells = 20 px; rows 9 against 8.265625, 0.734375 cells = 23.5 px
    assert geometry.centre_shift(rois, 1 / 32, "pool")[0].tolist() == [20.0, 23.5]
    assert geometry.centre_shift(rois, 1 / 32, "pool", "index")[0].tolist() == [4.0, 7.5]


def test_read_region_rejects_an_unknown_convention_or_method():
    rois = np.array([[0, 1.0, 1.0, 5.0, 5.0]])
    with pytest.raises(ValueError, match="convention must be one of"):
        geometry.read_region(rois, 1.0, "pool", convention="centre")
    with pytest.raises(ValueError, match="method must be"):
        geometry.read_region(rois, 1.0, "crop")
