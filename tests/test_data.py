"""Parsers on tiny files in the official formats, the Tiny ImageNet cache, the shapes set, and the split/resize/batch
helpers. The tiny data sets come from conftest.py."""
import errno
import io
import os
import pickle
import shlex
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
from conftest import VAL_CLASSES, WNIDS, grey_level, write_image

MKSTEMP = tempfile.mkstemp  # the real one, for tests that patch it


# ---------------------------------------------------------------- CIFAR-10

def test_cifar10_layout_labels_and_both_key_styles(cifar_dir):
    x_train, y_train, x_test, y_test = data.load_cifar10(cifar_dir)
    assert x_train.shape == (20, 3, 32, 32) and x_test.shape == (4, 3, 32, 32)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    index = torch.arange(20)
    assert torch.equal(y_train, index % 10)  # batches 1-3 have bytes keys, 4-5 str keys: all in order
    for channel, offset in enumerate((0, 100, 200)):  # each row is the R plane, then G, then B
        assert torch.equal(x_train[:, channel].amin((1, 2)), (index + offset).to(torch.uint8))
        assert torch.equal(x_train[:, channel].amax((1, 2)), (index + offset).to(torch.uint8))
    assert torch.equal(x_test[:, 0, 0, 0], torch.arange(20, 24).to(torch.uint8))


def test_cifar10_missing_batch_file_is_named(cifar_dir):
    os.remove(cifar_dir / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(data.DataError, match="data_batch_3 is missing"):
        data.load_cifar10(cifar_dir)


def test_cifar10_truncated_pickle_is_named(cifar_dir):
    path = cifar_dir / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(data.DataError, match="test_batch is truncated"):
        data.load_cifar10(cifar_dir)


class RunsCommand:
    """Unpickling this calls os.system(command): what a crafted batch file could do to whoever loads it."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_cifar10_batch_that_would_run_code_is_refused(cifar_dir, tmp_path):
    marker = tmp_path / "marker"
    batch = {"data": np.zeros((4, 3072), np.uint8), "labels": RunsCommand(f"touch {shlex.quote(str(marker))}")}
    (cifar_dir / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(data.DataError, match=r"refusing to load \S*data_batch_2: it asks for (posix|nt)\.system"):
        data.load_cifar10(cifar_dir)
    assert not marker.exists()  # refused before anything was called


ROWS = np.zeros((4, 3072), np.uint8)
DAMAGED_BATCHES = {  # what a batch file may hold instead of a batch; each must be a DataError naming the file
    "a list": pickle.dumps([ROWS, [0, 1, 2, 3]], protocol=2),
    "no labels": pickle.dumps({"data": ROWS}, protocol=2),
    "no data": pickle.dumps({b"labels": [0, 1, 2, 3]}, protocol=2),
    "rows of 100 bytes": pickle.dumps({"data": ROWS[:, :100], "labels": [0, 1, 2, 3]}, protocol=2),
    "rows not uint8": pickle.dumps({"data": ROWS.astype(np.int64), "labels": [0, 1, 2, 3]}, protocol=2),
    "label 10": pickle.dumps({"data": ROWS, "labels": [0, 1, 2, 10]}, protocol=2),
    "labels not numbers": pickle.dumps({"data": ROWS, "labels": ["cat"] * 4}, protocol=2),
    "one label short": pickle.dumps({"data": ROWS, "labels": [0, 1, 2]}, protocol=2),
    "garbage": b"\x80\x02]K\x01K\x02s.",  # sets item 1 of an empty list: the unpickler raises IndexError
}


@pytest.mark.parametrize("damage", DAMAGED_BATCHES)
def test_cifar10_damaged_batch_is_a_data_error(cifar_dir, damage):
    (cifar_dir / "cifar-10-batches-py" / "data_batch_4").write_bytes(DAMAGED_BATCHES[damage])
    with pytest.raises(data.DataError, match=r"data_batch_4 (is truncated or damaged|is not a CIFAR-10 batch)"):
        data.load_cifar10(cifar_dir)


def test_cifar10_wrong_count_says_what_and_where(cifar_dir, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_COUNTS", (50_000, 10_000))  # the real format's numbers
    with pytest.raises(data.DataError, match=r"train images in .*data_batch_1\.\.5: found 20, .* promises 50,000"):
        data.load_cifar10(cifar_dir)


# ---------------------------------------------------------------- Tiny ImageNet

def test_tinyimagenet_labels_follow_wnids_and_annotations(tinyimagenet_dir):
    x_train, y_train, x_test, y_test = data.load_tinyimagenet(tinyimagenet_dir)
    assert x_train.shape == (6, 3, 64, 64) and x_test.shape == (3, 3, 64, 64)  # grayscale JPEGs became RGB
    assert x_train.dtype == torch.uint8 and y_test.dtype == torch.int64
    assert y_train.tolist() == [0, 0, 1, 1, 2, 2]  # wnids.txt order, not sorted wnid order
    for x, y in ((x_train, y_train), (x_test, y_test)):  # every image carries its class as its grey level
        levels = torch.tensor([grey_level(k) for k in y.tolist()], dtype=torch.float)
        assert (x.float().mean((1, 2, 3)) - levels).abs().max() < 3
    assert sorted(y_test.tolist()) == sorted(VAL_CLASSES.values())
    assert y_test.tolist() != list(VAL_CLASSES.values())  # annotation order differs from file order


def test_tinyimagenet_unknown_wnid_in_annotations(tinyimagenet_dir):
    annotations = tinyimagenet_dir / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn09999999\t0\t0\t63\t63\n")
    with pytest.raises(data.DataError, match="line 4 names class .n09999999., which is not in wnids.txt"):
        data.load_tinyimagenet(tinyimagenet_dir)


def test_tinyimagenet_class_folder_without_images(tinyimagenet_dir):
    for path in (tinyimagenet_dir / "tiny-imagenet-200" / "train" / WNIDS[1] / "images").iterdir():
        path.unlink()
    with pytest.raises(data.DataError, match=f"{WNIDS[1]}/images has no .JPEG images"):
        data.load_tinyimagenet(tinyimagenet_dir)


def test_tinyimagenet_cache_built_reused_and_rebuilt(tinyimagenet_dir, monkeypatch):
    root = tinyimagenet_dir / "tiny-imagenet-200"
    first = data.load_tinyimagenet(tinyimagenet_dir)
    assert (root / data.TINYIMAGENET_CACHE).exists()
    decode = data._decode_images
    calls = []
    monkeypatch.setattr(data, "_decode_images", lambda files: calls.append(files) or decode(files))
    second = data.load_tinyimagenet(tinyimagenet_dir)
    assert calls == [] and all(torch.equal(a, b) for a, b in zip(first, second))
    write_image(root / "val" / "images" / "val_0.JPEG", 0)  # rewrite one file with another grey level
    third = data.load_tinyimagenet(tinyimagenet_dir)
    assert len(calls) == 1 and not torch.equal(first[2], third[2])
    assert sorted(os.listdir(root)) == sorted(["train", "val", "wnids.txt", data.TINYIMAGENET_CACHE])  # no temp file


def damaged_cache(cache, damage):
    """The bytes of `cache` (a good cache) damaged one way: cut short, garbage, or the right fingerprint beside
    something that is not the images."""
    raw = cache.read_bytes()
    if damage in ("truncated", "garbage"):
        return raw[:len(raw) // 2] if damage == "truncated" else b"not a torch file" * 10
    saved = torch.load(cache, weights_only=True)
    images = saved["images"]  # (N, 3, 64, 64) uint8
    wrong = {"wrong shape": images[:, :, :32], "wrong dtype": images.float(), "not a tensor": "images"}
    buffer = io.BytesIO()
    torch.save(images if damage == "not a dict" else {**saved, "images": wrong[damage]}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong shape", "wrong dtype", "not a tensor", "not a dict"])
def test_tinyimagenet_damaged_cache_is_rebuilt(tinyimagenet_dir, monkeypatch, damage):
    cache = tinyimagenet_dir / "tiny-imagenet-200" / data.TINYIMAGENET_CACHE
    first = data.load_tinyimagenet(tinyimagenet_dir)
    cache.write_bytes(damaged_cache(cache, damage))
    decode = data._decode_images
    calls = []
    monkeypatch.setattr(data, "_decode_images", lambda files: calls.append(files) or decode(files))
    second = data.load_tinyimagenet(tinyimagenet_dir)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first, second))  # decoded again, not returned
    assert torch.equal(torch.load(cache, weights_only=True)["images"], torch.cat([first[0], first[2]]))  # rewritten


def refuse_to_create(**kwargs):
    """Stands in for tempfile.mkstemp in a read-only folder (root ignores chmod, so the test fakes it)."""
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))


def create_on_a_full_disk(**kwargs):
    """tempfile.mkstemp whose file writes go to /dev/full, where each one fails with ENOSPC."""
    handle, name = MKSTEMP(**kwargs)
    os.close(handle)
    return os.open("/dev/full", os.O_WRONLY), name


def save_as_the_disk_fills(contents, file):
    """torch.save as it fails when the disk fills up partway (seen on a 200 KB tmpfs): a write's OSError, then a
    RuntimeError from closing its archive while handling it."""
    try:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")


@pytest.mark.parametrize("target, fake", [("tempfile.mkstemp", refuse_to_create),
                                          ("tempfile.mkstemp", create_on_a_full_disk),
                                          ("torch.save", save_as_the_disk_fills)],
                         ids=["read-only folder", "disk full", "disk full inside torch.save"])
def test_tinyimagenet_unwritable_cache_is_only_a_warning(tinyimagenet_dir, monkeypatch, capsys, target, fake):
    if fake is create_on_a_full_disk and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    monkeypatch.setattr(target, fake)
    root = tinyimagenet_dir / "tiny-imagenet-200"
    x_train, y_train, x_test, y_test = data.load_tinyimagenet(tinyimagenet_dir)
    assert x_train.shape == (6, 3, 64, 64) and y_train.tolist() == [0, 0, 1, 1, 2, 2]  # the images come back anyway
    reason = os.strerror(errno.EACCES if fake is refuse_to_create else errno.ENOSPC)
    assert f"cannot write the cache {root / data.TINYIMAGENET_CACHE} ({reason}); going on" in capsys.readouterr().err
    assert sorted(os.listdir(root)) == ["train", "val", "wnids.txt"]  # no cache, no temporary file left behind


def test_two_runs_sharing_the_folder_write_the_cache_without_colliding(tinyimagenet_dir, monkeypatch):
    save = torch.save
    root = tinyimagenet_dir / "tiny-imagenet-200"

    def save_while_another_run_writes_its_cache(contents, file):
        save(contents, file)
        monkeypatch.setattr(torch, "save", save)  # the other run saves normally
        data.load_tinyimagenet(tinyimagenet_dir)  # ...and finishes while this run's file is still unpublished
    monkeypatch.setattr(torch, "save", save_while_another_run_writes_its_cache)
    first = data.load_tinyimagenet(tinyimagenet_dir)
    assert torch.equal(torch.load(root / data.TINYIMAGENET_CACHE, weights_only=True)["images"][:6], first[0])
    assert sorted(os.listdir(root)) == sorted(["train", "val", "wnids.txt", data.TINYIMAGENET_CACHE])


# ---------------------------------------------------------------- shapes

def test_shapes_deterministic_balanced_and_coloured_by_label():
    x_train, y_train, x_test, y_test = data.load_shapes(None)
    assert x_train.shape == (data.SHAPES_COUNTS[0], 3, 32, 32) and x_test.shape == (data.SHAPES_COUNTS[1], 3, 32, 32)
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    assert y_train.bincount().min() > 0.8 * len(y_train) / 9 and y_train.max() == 8
    assert torch.equal(data.load_shapes(None)[0], x_train)  # same seed, same set
    # hue = label % 3 (red, green, blue): the channel that leads the other two by 0.2 on the most pixels is the
    # shape's; the blobs of clutter have random colours, so they rarely outvote it
    x = x_train.float() / 255  # (N, 3, H, W)
    top2 = x.topk(2, dim=1).values  # (N, 2, H, W)
    leads = (top2[:, 0] - top2[:, 1] > 0.2)[:, None] & (x.argmax(1, keepdim=True) == torch.arange(3).view(1, 3, 1, 1))
    assert (leads.flatten(2).sum(2).argmax(1) == y_train % 3).float().mean() > 0.95


# ---------------------------------------------------------------- splitting, resizing, batching

def test_split_validation_sizes_disjoint_deterministic():
    x, y = torch.arange(100).view(100, 1, 1, 1), torch.arange(100) // 10  # class-sorted, like Tiny ImageNet
    x_train, y_train, x_val, y_val = data.split_validation(x, y, val_fraction=0.2)
    assert len(x_train) == 80 and len(x_val) == 20
    assert set(x_train.flatten().tolist()).isdisjoint(x_val.flatten().tolist())
    assert torch.equal(y_train, x_train.flatten() // 10)  # images and labels stay paired
    assert torch.equal(data.split_validation(x, y, val_fraction=0.2)[0], x_train)


@pytest.mark.parametrize("limit", [50, 73, 100])
def test_a_limit_keeps_every_class_in_both_splits(limit):
    x, y = torch.arange(300).view(300, 1, 1, 1), torch.arange(300) // 30   # 10 classes, sorted by class
    x_train, y_train, x_val, y_val = data.split_validation(x, y, val_fraction=0.2, limit=limit)
    assert len(x_train) + len(x_val) == limit and len(x_val) == round(0.2 * limit)
    assert set(y_train.tolist()) == set(y_val.tolist()) == set(range(10))      # stratified: no class left out
    assert y_train.bincount().max() - y_train.bincount().min() <= 1           # each class its share
    assert set(x_train.flatten().tolist()).isdisjoint(x_val.flatten().tolist())
    assert torch.equal(y_train, x_train.flatten() // 30)


def test_a_limit_too_small_for_every_class_is_refused():
    x, y = torch.arange(300).view(300, 1, 1, 1), torch.arange(300) // 30
    with pytest.raises(data.DataError, match="--limit 40 is too small to keep each of the 10 classes.*at least 50"):
        data.split_validation(x, y, val_fraction=0.2, limit=40)


def test_resize_identity_upsampling_and_antialias():
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    assert data.resize(x, 32) is x
    constant = torch.full((2, 3, 32, 32), 77, dtype=torch.uint8)
    assert torch.equal(data.resize(constant, 64), torch.full((2, 3, 64, 64), 77, dtype=torch.uint8))
    stripes = torch.zeros(1, 3, 64, 64, dtype=torch.uint8)
    stripes[..., ::4] = 255  # one bright column in four: a plain bilinear 4x shrink samples only the dark ones
    small = data.resize(stripes, 16)
    assert small.shape == (1, 3, 16, 16) and small.dtype == torch.uint8
    assert 55 < small.float().mean() < 75  # antialiased: about the true average 255 / 4


def test_resize_in_chunks_matches_float_bilinear(monkeypatch):
    x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8)
    whole = data.resize(x, 64)
    monkeypatch.setattr(data, "RESIZE_CHUNK", 3)
    assert torch.equal(data.resize(x, 64), whole)
    reference = F.interpolate(x.float(), size=(64, 64), mode="bilinear", align_corners=False).round()
    assert (whole.float() - reference).abs().max() <= 1  # the CPU's uint8 kernel rounds on its own
    on_meta = data.resize(x.to("meta"), 64)  # the float branch used off the CPU (shapes only: no GPU in CI)
    assert on_meta.shape == (7, 3, 64, 64) and on_meta.dtype == torch.uint8


def test_shuffled_batches_drop_last_and_reshuffle():
    x, y = torch.arange(10).view(10, 1, 1, 1).to(torch.uint8), torch.arange(10)
    generator = torch.Generator().manual_seed(0)
    first = list(data.shuffled_batches(x, y, 4, generator))
    assert [len(xb) for xb, yb in first] == [4, 4]  # 10 images: the last 2 are dropped
    assert all(torch.equal(xb.flatten().long(), yb) for xb, yb in first)
    assert len(set(torch.cat([yb for _, yb in first]).tolist())) == 8
    second = list(data.shuffled_batches(x, y, 4, generator))
    assert not torch.equal(torch.cat([yb for _, yb in first]), torch.cat([yb for _, yb in second]))


def test_shuffled_batches_skip_resumes_the_same_order():
    x, y = torch.arange(20).view(20, 1, 1, 1).to(torch.uint8), torch.arange(20)
    whole = [yb for _, yb in data.shuffled_batches(x, y, 3, torch.Generator().manual_seed(5))]
    resumed = [yb for _, yb in data.shuffled_batches(x, y, 3, torch.Generator().manual_seed(5), skip=4)]
    assert len(whole) == 6 and len(resumed) == 2
    assert all(torch.equal(a, b) for a, b in zip(whole[4:], resumed))


def test_to_float_maps_0_255_to_0_1():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.equal(data.to_float(x), torch.tensor([0.0, 0.2, 1.0]).view(1, 3, 1, 1))


def test_every_loader_returns_uint8_images_and_int64_labels(cifar_dir, tinyimagenet_dir):
    for name, folder, size in (("cifar10", cifar_dir, 32), ("tinyimagenet", tinyimagenet_dir, 64), ("shapes", None, 32)):
        x_train, y_train, x_test, y_test = data.LOADERS[name](folder)
        assert x_train.dtype == x_test.dtype == torch.uint8, name
        assert x_train.shape[1:] == x_test.shape[1:] == (3, size, size), name
        assert y_train.dtype == y_test.dtype == torch.int64 and (len(y_train), len(y_test)) == (len(x_train), len(x_test))


def test_save_grid_places_every_image_enlarged_beside_its_title(tmp_path):
    from PIL import Image
    red, blue = torch.zeros(2, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    red[:, 0], blue[:, 2] = 1.0, 0.5                                  # two red images, then one half-blue image
    data.save_grid([red, blue], ["red", "blue"], scale=2, left=110).save(tmp_path / "grid.png")
    sheet = Image.open(tmp_path / "grid.png")
    assert sheet.size == (110 + 2 * 8, 2 * 8)                         # two images wide, two rows of 4 x 2 pixels
    assert sheet.getpixel((110, 0)) == sheet.getpixel((110 + 15, 7)) == (255, 0, 0)   # the red row, corner to corner
    assert sheet.getpixel((110, 8)) == (0, 0, 128) and sheet.getpixel((110 + 8, 8)) == (255, 255, 255)  # 0.5 -> 128
