"""Box-aware transforms: geometry of boxes and pixels must agree."""
import numpy as np
import pytest
import torch

from densedet.data.transforms import (Augmentation, affine_matrix, box_keep_mask, hflip,
                                      hsv_jitter, letterbox, letterbox_boxes, mixup, mosaic,
                                      random_affine_matrix, transform_boxes, unletterbox_boxes,
                                      warp_affine)
from densedet.errors import DensedetError

GREY = 114


def _blob_image(h, w, box, value=255, background=0):
    """[h, w, 3] uint8 with the integer box (x1, y1, x2, y2) filled."""
    image = np.full((h, w, 3), background, np.uint8)
    x1, y1, x2, y2 = (int(v) for v in box)
    image[y1:y2, x1:x2] = value
    return image


def _blob_bbox(image, threshold=127):
    """xyxy (continuous px) of the pixels brighter than threshold in channel 0."""
    ys, xs = np.nonzero(image[..., 0] > threshold)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


# ----------------------------------------------------------------------------- letterbox
def test_letterbox_known_scale_and_pad_and_round_trip():
    image = _blob_image(50, 100, (0, 0, 100, 50), value=200)  # w=100, h=50, all content
    out, scale, pad = letterbox(image, (64, 64))
    assert out.shape == (64, 64, 3)
    assert scale == pytest.approx(0.64)
    assert pad == (0, 16)  # 100x50 -> 64x32, centred vertically
    assert (out[:16] == GREY).all() and (out[48:] == GREY).all()
    assert (out[16:48] == 200).all()

    boxes = np.array([[10, 5, 60, 45], [0, 0, 100, 50]], np.float32)
    mapped = letterbox_boxes(boxes, scale, pad)
    np.testing.assert_allclose(mapped[1], [0, 16, 64, 48], atol=1e-5)
    np.testing.assert_allclose(mapped[0], [6.4, 19.2, 38.4, 44.8], atol=1e-5)

    meta = dict(scale=scale, pad=pad, orig_size=(50, 100))
    np.testing.assert_allclose(unletterbox_boxes(mapped, meta), boxes, atol=1e-4)
    back = unletterbox_boxes(torch.from_numpy(mapped), meta)
    assert isinstance(back, torch.Tensor)
    torch.testing.assert_close(back, torch.from_numpy(boxes), atol=1e-4, rtol=0)


def test_unletterbox_clips_to_original_image():
    meta = dict(scale=0.5, pad=(0, 10), orig_size=(40, 60))
    boxes = np.array([[-5, 0, 40, 40]], np.float32)  # reaches into padding / beyond
    np.testing.assert_allclose(unletterbox_boxes(boxes, meta), [[0, 0, 60, 40]])
    with pytest.raises(ValueError):
        unletterbox_boxes(boxes, dict(scale=None, pad=None, orig_size=(40, 60)))


def test_letterbox_non_square_target_pads_width():
    out, scale, pad = letterbox(np.zeros((100, 100, 3), np.uint8), (50, 80))
    assert out.shape == (50, 80, 3) and scale == pytest.approx(0.5) and pad == (15, 0)
    assert (out[:, :15] == GREY).all() and (out[:, 65:] == GREY).all()
    assert (out[:, 15:65] == 0).all()


# ----------------------------------------------------------------------------- flip
def test_hflip_maps_boxes_and_pixels_exactly():
    box = np.array([[10, 4, 25, 30]], np.float32)
    image = _blob_image(40, 60, box[0])
    flipped, fboxes = hflip(image, box)
    np.testing.assert_array_equal(fboxes, [[35, 4, 50, 30]])
    np.testing.assert_array_equal(_blob_bbox(flipped), fboxes[0])
    again, aboxes = hflip(flipped, fboxes)
    np.testing.assert_array_equal(again, image)
    np.testing.assert_array_equal(aboxes, box)


# ----------------------------------------------------------------------------- affine
def test_identity_affine_is_a_no_op():
    matrix = affine_matrix((48, 64), (48, 64))
    np.testing.assert_allclose(matrix, np.eye(3)[:2], atol=1e-12)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[3, 4, 20, 30], [40, 10, 60, 45]], np.float32)
    labels = np.array([1, 2])
    out, oboxes, olabels = warp_affine(image, boxes, labels, matrix, (48, 64))
    np.testing.assert_array_equal(out, image)
    np.testing.assert_allclose(oboxes, boxes, atol=1e-5)
    np.testing.assert_array_equal(olabels, labels)


def test_pure_translation_moves_boxes_and_pixels_by_offset():
    matrix = affine_matrix((48, 64), (48, 64), translate_x=7, translate_y=-3)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 30, 40]], np.float32)
    out, oboxes, _ = warp_affine(image, boxes, np.array([0]), matrix, (48, 64))
    np.testing.assert_allclose(oboxes, [[17, 7, 37, 37]], atol=1e-5)
    np.testing.assert_array_equal(out[0:45, 7:64], image[3:48, 0:57])
    assert (out[:, :7] == GREY).all() and (out[45:] == GREY).all()


def test_rotation_keeps_centred_box_centre_and_encloses_rotated_object():
    size = (64, 64)
    box = np.array([[22, 26, 42, 38]], np.float32)  # centred at (32, 32)
    matrix = affine_matrix(size, size, angle=30.0)
    out, oboxes, _ = warp_affine(_blob_image(64, 64, box[0]), box, np.array([0]), matrix, size)
    centre = (oboxes[0, :2] + oboxes[0, 2:]) / 2
    np.testing.assert_allclose(centre, [32, 32], atol=1e-4)
    w, h = oboxes[0, 2:] - oboxes[0, :2]
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    np.testing.assert_allclose([w, h], [20 * c + 12 * s, 20 * s + 12 * c], atol=1e-4)
    np.testing.assert_allclose(_blob_bbox(out), oboxes[0], atol=1.0)


@pytest.mark.parametrize("seed", range(5))
def test_random_affine_boxes_follow_pixels(seed):
    """Any zoom/rotation/shear/shift: the transformed box encloses the warped object."""
    rng = np.random.default_rng(seed)
    box = np.array([[40, 50, 90, 80]], np.float32)
    image = _blob_image(128, 128, box[0])
    matrix = random_affine_matrix(rng, (128, 128), (96, 96), degrees=10, translate=0.1,
                                  scale_range=(0.7, 1.3), shear=2)
    out, oboxes, _ = warp_affine(image, box, np.array([0]), matrix, (96, 96))
    assert len(oboxes) == 1
    np.testing.assert_allclose(_blob_bbox(out), oboxes[0], atol=1.5)


def test_transform_boxes_empty():
    assert transform_boxes(np.zeros((0, 4), np.float32), np.eye(3)[:2]).shape == (0, 4)


# ----------------------------------------------------------------------------- filtering
def test_box_keep_mask_drops_tiny_thin_and_mostly_cropped():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 100, 10],
                       [0, 0, 10, 10]], np.float32)
    after = np.array([[0, 0, 10, 10],    # unchanged: kept
                      [0, 0, 1.5, 10],   # narrower than 2 px: dropped
                      [0, 0, 40, 2],     # aspect 20: dropped
                      [0, 0, 100, 10],   # aspect 10: kept
                      [0, 0, 3, 3]],     # 9% of its area left: dropped
                     np.float32)
    np.testing.assert_array_equal(box_keep_mask(before, after), [True, False, False, True, False])
    # the transform's own zoom does not count as cropping
    np.testing.assert_array_equal(box_keep_mask(before[4:], after[4:], area_scale=0.09),
                                  [True])


def test_warp_drops_boxes_pushed_out_of_the_image():
    matrix = affine_matrix((64, 64), (64, 64), translate_x=-40)
    boxes = np.array([[5, 5, 30, 30], [45, 5, 60, 30]], np.float32)
    _, oboxes, olabels = warp_affine(np.zeros((64, 64, 3), np.uint8), boxes, np.array([3, 4]),
                                     matrix, (64, 64))
    np.testing.assert_array_equal(olabels, [4])
    np.testing.assert_allclose(oboxes, [[5, 5, 20, 30]], atol=1e-5)


# ----------------------------------------------------------------------------- mosaic
def test_mosaic_places_four_images_with_their_boxes():
    size = (32, 48)
    colours = [10, 60, 160, 230]
    images = [np.full((16 + 8 * k, 24, 3), c, np.uint8) for k, c in enumerate(colours)]
    boxes = [np.array([[0, 0, 24, 16 + 8 * k]], np.float32) for k in range(4)]  # whole image
    labels = [np.array([k]) for k in range(4)]
    canvas, mboxes, mlabels = mosaic(images, boxes, labels, size, np.random.default_rng(3))
    assert canvas.shape == (64, 96, 3) and canvas.dtype == np.uint8
    np.testing.assert_array_equal(mlabels, [0, 1, 2, 3])
    assert (mboxes[:, :2] >= 0).all() and (mboxes[:, 2] <= 96).all() and (mboxes[:, 3] <= 64).all()
    for k, colour in enumerate(colours):
        x1, y1, x2, y2 = np.round(mboxes[k]).astype(int)
        assert x2 > x1 and y2 > y1
        assert (canvas[y1:y2, x1:x2] == colour).all()  # the box covers its own image's pixels
    # quadrant order around the centre: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    assert mboxes[0, 2] == mboxes[1, 0] and mboxes[0, 3] == mboxes[2, 1]


def test_mosaic_then_affine_keeps_only_valid_boxes():
    rng = np.random.default_rng(0)
    size = (64, 64)
    for _ in range(20):
        images = [rng.integers(0, 255, (int(rng.integers(20, 90)), int(rng.integers(20, 90)), 3),
                               dtype=np.uint8) for _ in range(4)]
        boxes, labels = [], []
        for image in images:
            h, w = image.shape[:2]
            xy = rng.uniform(0, [w - 2, h - 2], (6, 2))
            wh = rng.uniform(0.5, [w / 2, h / 2], (6, 2))
            boxes.append(np.concatenate([xy, np.minimum(xy + wh, [w, h])], 1).astype(np.float32))
            labels.append(rng.integers(0, 5, 6))
        canvas, mboxes, mlabels = mosaic(images, boxes, labels, size, rng)
        matrix = random_affine_matrix(rng, canvas.shape[:2], size, 10, 0.1, (0.1, 2.0), 2)
        out, oboxes, olabels = warp_affine(canvas, mboxes, mlabels, matrix, size)
        assert out.shape == (64, 64, 3) and len(oboxes) == len(olabels)
        assert (oboxes >= 0).all() and (oboxes <= 64).all()  # square 64 px output
        assert ((oboxes[:, 2:] - oboxes[:, :2]) >= 2.0).all()


# ----------------------------------------------------------------------------- mixup
def test_mixup_blends_and_concatenates_labels():
    image = np.full((40, 40, 3), 100, np.uint8)
    other = np.full((20, 20, 3), 200, np.uint8)
    boxes = np.array([[1, 1, 10, 10]], np.float32)
    other_boxes = np.array([[0, 0, 20, 20], [5, 5, 10, 10]], np.float32)
    cfg = Augmentation(mixup_scale=(1.0, 1.0))  # other exactly fills the 40x40 image
    out, mboxes, mlabels = mixup(image, boxes, np.array([7]), other, other_boxes,
                                 np.array([1, 2]), np.random.default_rng(0), cfg)
    np.testing.assert_array_equal(mlabels, [7, 1, 2])
    np.testing.assert_array_equal(mboxes[0], boxes[0])
    np.testing.assert_allclose(mboxes[1], [0, 0, 40, 40], atol=1e-4)
    w = mboxes[2, 2] - mboxes[2, 0]
    assert w == pytest.approx(10.0, abs=1e-4)
    # the outermost pixel row is interpolated against the grey border
    assert (np.abs(out[1:-1, 1:-1].astype(int) - 150) <= 1).all()


def test_mixup_smaller_image_leaves_grey_blend_and_boxes_on_its_pixels():
    rng = np.random.default_rng(5)
    image = np.zeros((64, 64, 3), np.uint8)
    obox = np.array([[0, 0, 32, 32]], np.float32)
    other = np.full((32, 32, 3), 254, np.uint8)
    cfg = Augmentation(mixup_scale=(0.5, 0.5))  # letterbox x2, jitter x0.5 -> 32 px
    out, mboxes, _ = mixup(image, np.zeros((0, 4), np.float32), np.zeros(0, np.int64), other,
                           obox, np.array([0]), rng, cfg)
    x1, y1, x2, y2 = np.round(mboxes[0]).astype(int)
    assert (x2 - x1, y2 - y1) == (32, 32)
    assert (np.abs(out[y1 + 1:y2 - 1, x1 + 1:x2 - 1].astype(int) - 127) <= 1).all()
    outside = np.ones((64, 64), bool)
    outside[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = False
    assert (np.abs(out[outside].astype(int) - GREY // 2) <= 1).all()


# ----------------------------------------------------------------------------- colour, config
def test_hsv_jitter_zero_gains_is_identity_and_is_seeded():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert hsv_jitter(image, np.random.default_rng(0), (0, 0, 0)) is image
    changed = [hsv_jitter(image, np.random.default_rng(s)) for s in range(6)]
    assert all(c.shape == image.shape and c.dtype == np.uint8 for c in changed)
    assert any(not np.array_equal(c, image) for c in changed)
    np.testing.assert_array_equal(hsv_jitter(image, np.random.default_rng(4)), changed[4])


def test_hsv_value_only_jitter_brightens_grey():
    grey = np.full((4, 4, 3), 100, np.uint8)
    outs = [hsv_jitter(grey, np.random.default_rng(s), (0, 0, 30)) for s in range(20)]
    diffs = {int(o[0, 0, 0]) - 100 for o in outs}
    assert all(-30 <= d <= 30 for d in diffs) and len(diffs) > 2  # V shifts grey levels only


def test_augment_config_presets_and_validation():
    nano = Augmentation.preset("yolox_nano")
    assert nano.mixup_prob == 0.0 and nano.mosaic_scale == (0.5, 1.5) and nano.mosaic_prob == 0.5
    assert Augmentation.preset("yolox_s") == Augmentation()
    assert Augmentation.preset("yolox_tiny", flip_prob=0.0).flip_prob == 0.0
    with pytest.raises(DensedetError, match="mosaic_prob"):
        Augmentation(mosaic_prob=1.5)
    with pytest.raises(DensedetError, match="mixup_scale"):
        Augmentation(mixup_scale=(2.0, 1.0))
    with pytest.raises(DensedetError, match="preset"):
        Augmentation.preset("yolov8")
