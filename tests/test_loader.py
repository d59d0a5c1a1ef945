"""DetectionDataset, collate, the seeded loader and batch resizing."""
import cv2
import numpy as np
import pytest
import torch

from densedet.data.dataset import DetectionDataset, unletterbox_boxes
from densedet.data.loader import SeededSampler, build_loader, collate, resize_batch
from densedet.data.sample import Sample
from densedet.data.transforms import Augmentation
from densedet.errors import DensedetError

SIZE = 64


def _write(tmp_path, name, image):
    path = tmp_path / name
    assert cv2.imwrite(str(path), image)
    return str(path)


def _samples(tmp_path, count=6, ext="png"):
    """Images of varied size with 3 objects each (the last one an ignore object)."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        h, w = 40 + 8 * i, 90 - 6 * i
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        path = _write(tmp_path, f"im{i}.{ext}", image)
        boxes = np.array([[2, 3, w * 0.6, h * 0.7], [w * 0.3, h * 0.2, w - 1, h - 2],
                          [5, 5, 20, 20]], np.float32)
        samples.append(Sample(f"im{i}", path, w, h, boxes, [i % 3, 1, 4], [False, False, True]))
    return samples


# ----------------------------------------------------------------------------- evaluation
def test_eval_item_is_letterboxed_rgb_with_meta_that_maps_back(tmp_path):
    image = np.zeros((50, 100, 3), np.uint8)
    image[:, :50] = (0, 0, 255)  # BGR red on the left half
    path = _write(tmp_path, "red.png", image)
    boxes = np.array([[0, 0, 50, 50], [60, 10, 90, 40]], np.float32)
    ds = DetectionDataset([Sample(7, path, 100, 50, boxes, [0, 1], [False, False])], SIZE)
    x, target, meta = ds[0]
    assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
    assert meta == dict(image_id=7, orig_size=(50, 100), scale=0.64, pad=(0, 16), mosaic=False)
    torch.testing.assert_close(x[:, 32, 10], torch.tensor([1.0, 0.0, 0.0]))  # RGB order
    torch.testing.assert_close(x[:, 5, 10], torch.full((3,), 114 / 255))   # padding grey
    assert float(x.max()) <= 1.0 and float(x.min()) >= 0.0
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.0, 16.0, 32.0, 48.0]))
    assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [0, 1]
    torch.testing.assert_close(unletterbox_boxes(target["boxes"], meta), torch.from_numpy(boxes),
                               atol=1e-4, rtol=0)


def test_dataset_keeps_opencv_single_threaded_for_fork_safety():
    cv2.setNumThreads(2)
    DetectionDataset([], SIZE)
    assert cv2.getNumThreads() == 1  # forked workers inherit it; see loader.seed_worker


def test_ignore_objects_dropped_or_kept(tmp_path):
    samples = _samples(tmp_path, 2)
    _, target, _ = DetectionDataset(samples, SIZE)[0]
    assert target["labels"].tolist() == [0, 1]
    _, target, _ = DetectionDataset(samples, SIZE, ignore_mode="keep")[0]
    assert target["labels"].tolist() == [0, 1, 4]
    train = DetectionDataset(samples, SIZE, Augmentation(mixup_prob=0.0))
    for seed in range(10):
        assert 4 not in train[(seed % 2, seed)][1]["labels"].tolist()
    with pytest.raises(DensedetError, match="ignore_mode"):
        DetectionDataset(samples, SIZE, ignore_mode="mask")


def test_letterbox_training_path_drops_tiny_boxes_and_flips(tmp_path):
    path = _write(tmp_path, "a.png", np.zeros((64, 64, 3), np.uint8))
    boxes = np.array([[10, 10, 40, 40], [50, 10, 51, 40]], np.float32)  # second: 1 px wide
    sample = Sample(0, path, 64, 64, boxes, [2, 3], [False, False])
    cfg = Augmentation(mosaic_prob=0.0, hsv_prob=0.0, flip_prob=1.0)
    _, target, meta = DetectionDataset([sample], SIZE, cfg)[(0, 0)]
    assert meta["mosaic"] is False
    assert target["labels"].tolist() == [2]
    torch.testing.assert_close(target["boxes"], torch.tensor([[24.0, 10.0, 54.0, 40.0]]))


def test_mosaic_training_items_are_valid(tmp_path):
    ds = DetectionDataset(_samples(tmp_path), SIZE, Augmentation())
    total = 0
    for seed in range(24):
        x, target, meta = ds[(seed % len(ds), seed)]
        assert x.shape == (3, SIZE, SIZE) and meta["mosaic"] and meta["scale"] is None
        boxes = target["boxes"]
        assert boxes.shape[1] == 4 and len(boxes) == len(target["labels"])
        assert (boxes >= 0).all() and (boxes <= SIZE).all()
        assert ((boxes[:, 2:] - boxes[:, :2]) >= 2.0).all()
        total += len(boxes)
    assert total > 24  # mosaic + mixup gather objects from several images


def test_same_seed_same_item_and_global_rng_path(tmp_path):
    ds = DetectionDataset(_samples(tmp_path), SIZE, Augmentation())
    a, b = ds[(2, 123)], ds[(2, 123)]
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1]["boxes"], b[1]["boxes"])
    np.random.seed(5)
    c = ds[2]
    np.random.seed(5)
    torch.testing.assert_close(c[0], ds[2][0])


def test_corrupt_missing_and_mis_sized_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = DetectionDataset([Sample(0, str(bad), 10, 10)], SIZE)
    with pytest.raises(DensedetError, match="broken.jpg"):
        ds[0]
    ds = DetectionDataset([Sample(0, str(tmp_path / "missing.png"), 10, 10)], SIZE)
    with pytest.raises(DensedetError, match="missing.png"):
        ds[0]
    path = _write(tmp_path, "small.png", np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(DensedetError, match="small.png.*differs"):
        DetectionDataset([Sample(0, path, 60, 40)], SIZE)[0]


def test_fast_jpeg_decode_matches_full_decode(tmp_path):
    rng = np.random.default_rng(1)
    image = cv2.GaussianBlur(rng.integers(0, 256, (256, 320, 3), dtype=np.uint8), (0, 0), 4)
    path = _write(tmp_path, "big.jpg", image)
    sample = Sample(0, path, 320, 256, [[32, 40, 200, 220]], [0], [False])
    fast, full = (DetectionDataset([sample], SIZE, fast_decode=f)[0] for f in (True, False))
    torch.testing.assert_close(fast[1]["boxes"], full[1]["boxes"])
    assert fast[2] == full[2]
    assert float((fast[0] - full[0]).abs().mean()) < 0.02


def test_cached_images_give_the_same_items(tmp_path):
    samples = _samples(tmp_path, 4)
    plain, cached = DetectionDataset(samples, SIZE), DetectionDataset(samples, SIZE)
    assert cached.cache_images() == sum(SIZE * min(SIZE, round(s.height * SIZE / s.width)) * 3
                                        for s in samples)  # all wider than tall
    for i in range(4):
        a, b = plain[i], cached[i]
        torch.testing.assert_close(a[0], b[0])
        torch.testing.assert_close(a[1]["boxes"], b[1]["boxes"])
    plain, cached = (DetectionDataset(samples, SIZE, Augmentation()) for _ in range(2))
    cached.cache_images()
    for seed in range(4):
        a, b = plain[(seed, seed)], cached[(seed, seed)]
        assert a[2]["mosaic"] and b[2]["mosaic"]
        torch.testing.assert_close(a[1]["boxes"], b[1]["boxes"])
        assert float((a[0] - b[0]).abs().mean()) < 0.03  # mixup resamples from another size


# ----------------------------------------------------------------------------- collate
def test_collate_pads_with_invalid_rows(tmp_path):
    img = torch.zeros(3, 8, 8)
    batch = [(img, dict(boxes=torch.tensor([[1.0, 1, 4, 4], [2, 2, 6, 6]]),
                        labels=torch.tensor([3, 5])), {"image_id": 0}),
             (img, dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64)),
              {"image_id": 1})]
    images, targets, metas = collate(batch)
    assert images.shape == (2, 3, 8, 8) and [m["image_id"] for m in metas] == [0, 1]
    assert targets["gt_boxes"].shape == (2, 2, 4) and targets["gt_labels"].dtype == torch.int64
    assert targets["gt_valid"].tolist() == [[True, True], [False, False]]
    assert targets["gt_labels"].tolist() == [[3, 5], [0, 0]]
    assert (targets["gt_boxes"][1] == 0).all()
    empty = collate([batch[1], batch[1]])[1]
    assert empty["gt_boxes"].shape == (2, 1, 4) and not empty["gt_valid"].any()


def test_resize_batch_scales_boxes():
    images = torch.rand(2, 3, 32, 64)
    targets = dict(gt_boxes=torch.tensor([[[8.0, 4, 32, 16]], [[0, 0, 64, 32]]]),
                   gt_labels=torch.zeros(2, 1, dtype=torch.int64),
                   gt_valid=torch.ones(2, 1, dtype=torch.bool))
    out, new = resize_batch(images, targets, (48, 32))
    assert out.shape == (2, 3, 48, 32)
    expected = torch.tensor([[[4.0, 6, 16, 24]], [[0, 0, 32, 48]]])
    torch.testing.assert_close(new["gt_boxes"], expected)
    assert new["gt_valid"] is targets["gt_valid"]
    assert resize_batch(images, targets, (32, 64))[0] is images


# ----------------------------------------------------------------------------- loader
def _batches(loader, epochs=1):
    out = []
    for _ in range(epochs):
        for images, targets, metas in loader:
            out.append((images, targets["gt_boxes"], targets["gt_labels"],
                        [m["image_id"] for m in metas]))
    return out


def _assert_same(a, b):
    assert len(a) == len(b)
    for (ia, ba, la, ida), (ib, bb, lb, idb) in zip(a, b):
        assert ida == idb
        torch.testing.assert_close(ia, ib)
        torch.testing.assert_close(ba, bb)
        assert torch.equal(la, lb)


def test_loader_is_deterministic_and_independent_of_workers(tmp_path):
    ds = DetectionDataset(_samples(tmp_path), SIZE, Augmentation())
    serial = _batches(build_loader(ds, 3, shuffle=True, num_workers=0, seed=11), epochs=2)
    again = _batches(build_loader(ds, 3, shuffle=True, num_workers=0, seed=11), epochs=2)
    _assert_same(serial, again)
    workers = _batches(build_loader(ds, 3, shuffle=True, num_workers=2, seed=11), epochs=2)
    _assert_same(serial, workers)
    # epochs differ from each other, and another seed gives other batches
    assert not torch.equal(serial[0][0], serial[2][0])
    other = _batches(build_loader(ds, 3, shuffle=True, num_workers=0, seed=12))
    assert not torch.equal(serial[0][0], other[0][0])


def test_set_epoch_replays_an_epoch(tmp_path):
    ds = DetectionDataset(_samples(tmp_path, 4), SIZE, Augmentation(mixup_prob=0.0))
    loader = build_loader(ds, 2, shuffle=True, num_workers=0, seed=3)
    first_two = _batches(loader, epochs=2)
    loader.sampler.set_epoch(1)
    _assert_same(first_two[2:], _batches(loader))


def test_close_mosaic_reaches_persistent_workers(tmp_path):
    ds = DetectionDataset(_samples(tmp_path, 4), SIZE, Augmentation())
    loader = build_loader(ds, 2, shuffle=False, num_workers=2, seed=0, persistent_workers=True)
    flags = [m["mosaic"] for _, _, metas in loader for m in metas]
    assert flags == [True] * 4
    workers_before = loader._iterator._workers
    ds.close_mosaic()
    assert ds.mosaic_prob == 0.0 and ds.mixup_prob == 0.0
    flags = [m["mosaic"] for _, _, metas in loader for m in metas]
    assert loader._iterator._workers is workers_before  # the same worker processes
    assert flags == [False] * 4
    ds.set_augment(mosaic_prob=1.0)
    assert all(m["mosaic"] for _, _, metas in loader for m in metas)
    with pytest.raises(DensedetError):
        ds.set_augment(mixup_prob=2.0)


def test_seeded_sampler_shards_like_distributed_sampler():
    from torch.utils.data.distributed import DistributedSampler

    data = list(range(10))
    ranks = [SeededSampler(10, True, 5, DistributedSampler(data, num_replicas=2, rank=r, seed=5))
             for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    pairs = [list(s) for s in ranks]
    indices = [i for p in pairs for i, _ in p]
    assert sorted(indices) == data and len(ranks[0]) == 5
    assert [s for _, s in pairs[0]] != [s for _, s in pairs[1]]  # ranks draw other seeds
    assert ranks[0].base.epoch == 3
    plain = SeededSampler(10, False, 0)
    assert [i for i, _ in plain] == data
    with pytest.raises(ValueError):
        SeededSampler(3, True, -1)
