"""Data: load CIFAR-10, Tiny ImageNet or a procedural shapes set as uint8 tensors; split, resize and batch them.

Every loader returns (x_train, y_train, x_test, y_test): x uint8 (N, 3, H, W) in 0-255 on the CPU, y int64 (N,).
The paper (Rajagopalan 2021, "Learned Data Augmentation") evaluates on CIFAR-10 and Tiny ImageNet; our VAE sees
64x64 images, so CIFAR-10 is upsampled once by `resize`, bilinear: an output pixel at source position (u, v) is
    x_out = (1-a)(1-b) x[i, j] + a(1-b) x[i, j+1] + (1-a) b x[i+1, j] + a b x[i+1, j+1],  a = u - i, b = v - j
with a wider (antialiased) triangle filter when shrinking. Tiny ImageNet's labelled validation set is our test set
(its test split has no labels); for both sets `split_validation` carves our validation split from train.
CIFAR-10's pickles are read by an unpickler that allows only numpy's array rebuilding, so a crafted file runs no code.
Tiny ImageNet's 110,000 JPEGs are decoded once and cached as uint8 in tiny-imagenet-200/uint8-cache.pt, rebuilt
when any image's name, size or mtime changes or the file is damaged; a folder we cannot write costs only a warning.
`load_shapes` is ours: 9 classes = 3 shapes x 3 hues, so geometric augmentations keep the label while a hue shift
can change it (the paper's conclusion in miniature), offline. The last section fetches a missing set with the
stdlib: streamed into a temporary file of its own, md5-checked and renamed; extracted into a scratch folder and
only then moved into place, so neither an interrupted run nor two runs sharing the folder leave a half-written file;
an archive put in the data folder by hand is used as it is, and CIFAR10_URL / TINYIMAGENET_URL name a mirror.
Problems a user can fix raise DataError; main.py prints its one-paragraph message and exits with status 2.
Called by main.py: LOADERS[name](data_dir), split_validation, resize, per step shuffled_batches and to_float, and
save_grid for its pictures. Axes: N images, B batch, C channels (RGB), H/W height/width.
"""
import errno
import gzip
import hashlib
import http.client
import math
import os
import pickle
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# Defaults are the official addresses, checksums and counts. Tests serve tiny archives of tiny sets by setting the
# CIFAR10_URL / TINYIMAGENET_URL environment variables and monkeypatching *_MD5 and *_COUNTS.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"  # www.cs.toronto.edu/~kriz/cifar.html
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published on the same page
CIFAR10_COUNTS = (50_000, 10_000)  # train, test images in the official release (5 batches of 10,000 + test_batch)
CIFAR10_CLASSES = 10  # labels 0-9
# Every global a batch names (pickletools.dis of the batches make_cifar10.py writes like the official Python 2 ones,
# and of numpy 2's own protocol-2 pickle of a uint8 array): numpy's array rebuilding, and the codec behind bytes.
CIFAR10_PICKLE_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                          ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"  # official address (Stanford CS231n)
TINYIMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # md5 of that zip; Stanford publishes none, other loaders
# (avalanche's TinyImagenet among them) check this same value
TINYIMAGENET_COUNTS = (100_000, 10_000)  # 500 train images per class, 50 labelled validation images per class
TINYIMAGENET_CLASSES = 200  # lines in wnids.txt
TINYIMAGENET_SIZE = 64  # every JPEG in the release is 64x64
TINYIMAGENET_CACHE = "uint8-cache.pt"  # written inside tiny-imagenet-200/
SHAPES_COUNTS = (6_000, 1_000)  # train, test: small, for quick CPU runs
SHAPES_SIZE = 32  # like CIFAR-10, so both go through the same resize
SHAPES_SEED = 0  # the set is the same on every machine
SHAPES_CLUTTER = 4  # random blobs per image; they make raw pixels and random features a poor guide to the label
RESIZE_CHUNK = 1024  # images per F.interpolate call: 1024 x 3 x 64 x 64 as float32 (off the CPU) is 50 MB
PROGRESS_SECONDS = 1.0  # at most one download progress line per second


class DataError(Exception):
    """A problem with the data that the user can fix; the message says what and how."""


def _check_count(what, count, expected, advice):
    """Raise DataError unless `count` (of images or classes) is what the format promises."""
    if count != expected:
        raise DataError(f"{what}: found {count:,}, but the format promises {expected:,}; {advice}")


# ---------------------------------------------------------------- CIFAR-10: pickled batches
def load_cifar10(data_dir):
    """CIFAR-10 from <data_dir>/cifar-10-batches-py (data_batch_1..5, test_batch): uint8 (N, 3, 32, 32), int64 (N,)."""
    folder = ensure_cifar10(data_dir)
    x_train, y_train = zip(*[_load_cifar10_batch(folder / f"data_batch_{i}") for i in range(1, 6)])
    x_test, y_test = _load_cifar10_batch(folder / "test_batch")
    x_train, y_train = torch.cat(x_train), torch.cat(y_train)  # (50000, 3, 32, 32), (50000,)
    advice = f"a batch file is incomplete: delete {folder} so that the next run extracts (or downloads) it again"
    _check_count(f"CIFAR-10 train images in {folder}/data_batch_1..5", len(x_train), CIFAR10_COUNTS[0], advice)
    _check_count(f"CIFAR-10 test images in {folder}/test_batch", len(x_test), CIFAR10_COUNTS[1], advice)
    return x_train, y_train, x_test, y_test


def _load_cifar10_batch(path):
    """One pickled batch -> uint8 (n, 3, 32, 32) and int64 (n,). Each 3072-byte row is the R, G, B planes, row-major."""
    if not path.exists():
        raise DataError(f"the CIFAR-10 batch file {path} is missing; delete {path.parent} so that the next run "
                        f"extracts (or downloads) it again")
    try:
        with open(path, "rb") as file:
            batch = _BatchUnpickler(file, path).load()
    except DataError:  # a refused global: its message says which
        raise
    except Exception as error:  # damaged bytes can make the unpickler fail in almost any way (EOF, key, memory, ...)
        raise DataError(f"the CIFAR-10 batch file {path} is truncated or damaged ({error!r}); delete {path.parent} "
                        f"so that the next run extracts (or downloads) it again") from None
    data, labels = _batch_arrays(path, batch)
    return torch.from_numpy(data.reshape(-1, 3, 32, 32)), torch.from_numpy(labels)  # (n, 3072) -> (n, 3, 32, 32)


class _BatchUnpickler(pickle.Unpickler):
    """A pickle rebuilds objects by calling the functions it names, so a crafted batch could run any code (os.system,
    say) as it loads: this unpickler hands out only those in CIFAR10_PICKLE_GLOBALS and refuses the rest unimported."""

    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")  # official files are Python 2 pickles: their str keys load as bytes
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in CIFAR10_PICKLE_GLOBALS:
            raise DataError(f"refusing to load {self.path}: it asks for {module}.{name}, which a CIFAR-10 batch never "
                            f"holds; delete {self.path.parent} and the archive it came from, so that the next run "
                            f"downloads the official one")
        return super().find_class(module, name)


def _batch_arrays(path, batch):
    """The rows, uint8 (n, 3072), and labels, int64 (n,), of an unpickled batch, once its types and shapes check out."""
    batch = batch if isinstance(batch, dict) else {}  # bytes keys in the official files, str in Python 3's pickles
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    rows_ok = isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
    labels_ok = isinstance(labels, list) and all(type(k) is int and 0 <= k < CIFAR10_CLASSES for k in labels)
    if not (rows_ok and labels_ok and len(labels) == len(data)):
        raise DataError(f"{path} is not a CIFAR-10 batch (a dict of uint8 rows of 3072 bytes under 'data', one "
                        f"label 0-9 per row under 'labels'); delete {path.parent} so that the next run extracts (or "
                        f"downloads) it again")
    return data, np.array(labels, dtype=np.int64)


# ---------------------------------------------------------------- Tiny ImageNet: JPEG folders, decoded once
def load_tinyimagenet(data_dir):
    """Tiny ImageNet from <data_dir>/tiny-imagenet-200: uint8 (N, 3, 64, 64), int64 (N,); test = labelled val set.
    Class k is line k of wnids.txt for both splits. Train labels come from the folder names train/<wnid>/images/,
    test labels from val/val_annotations.txt (filename TAB wnid TAB bounding box), never from file order."""
    root = ensure_tinyimagenet(data_dir)
    wnids = _read_lines(root / "wnids.txt")
    train_files, y_train = _list_train(root, wnids)
    test_files, y_test = _list_val(root, wnids)
    advice = f"compare {root} with the official archive, or delete it so that the next run extracts it again"
    _check_count(f"classes in {root / 'wnids.txt'}", len(wnids), TINYIMAGENET_CLASSES, advice)
    _check_count(f"Tiny ImageNet train images in {root / 'train'}", len(train_files), TINYIMAGENET_COUNTS[0], advice)
    _check_count(f"Tiny ImageNet val images in {root / 'val'}", len(test_files), TINYIMAGENET_COUNTS[1], advice)
    x = _cached_images(root, train_files + test_files)  # (N_train + N_test, 3, 64, 64) uint8
    # A copy of the test images, so that the whole decoded set is freed once the caller has split the train images.
    return x[:len(train_files)], torch.tensor(y_train), x[len(train_files):].clone(), torch.tensor(y_test)


def _read_lines(path):
    """The non-empty lines of a text file, stripped; a missing file is a DataError."""
    if not path.exists():
        raise DataError(f"{path} is missing, so {path.parent} is not in the official Tiny ImageNet layout")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _list_train(root, wnids):
    """Every train/<wnid>/images/*.JPEG in wnids.txt order, with label k for the k-th wnid."""
    files, labels = [], []
    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        # sorted, because os.listdir's order depends on the file system: the same files in the same order every run
        names = sorted(name for name in os.listdir(folder) if name.endswith(".JPEG")) if folder.is_dir() else []
        if not names:
            raise DataError(f"the class folder {folder} has no .JPEG images")
        files += [folder / name for name in names]
        labels += [k] * len(names)
    return files, labels


def _list_val(root, wnids):
    """val/images/<filename> for each line of val_annotations.txt, labelled by the wnid on that line."""
    annotations = root / "val" / "val_annotations.txt"
    class_of = {wnid: k for k, wnid in enumerate(wnids)}
    files, labels = [], []
    for number, line in enumerate(_read_lines(annotations), start=1):
        filename, wnid = (line.split("\t") + [""])[:2]  # filename TAB wnid TAB x0 y0 x1 y1
        if wnid not in class_of:
            raise DataError(f"{annotations} line {number} names class {wnid!r}, which is not in wnids.txt")
        files.append(root / "val" / "images" / filename)
        labels.append(class_of[wnid])
    return files, labels


def _cached_images(root, files):
    """Decoded images of `files`, read from the cache when its fingerprint (names, sizes, mtimes) still matches."""
    cache = root / TINYIMAGENET_CACHE
    fingerprint = _fingerprint(root, files)
    images = _read_cache(cache, fingerprint, (len(files), 3, TINYIMAGENET_SIZE, TINYIMAGENET_SIZE))
    if images is not None:
        return images
    images = _decode_images(files)
    try:  # a folder we cannot write (read-only, or a full disk) costs a warning, not the run
        write_atomically(cache, lambda file: torch.save({"fingerprint": fingerprint, "images": images}, file))
    except (OSError, RuntimeError) as error:
        failure = error if isinstance(error, OSError) else error.__context__  # torch.save raises a RuntimeError
        if not isinstance(failure, OSError):  # while handling a full disk's OSError
            raise
        print(f"cannot write the cache {cache} ({failure.strerror or failure}); going on without it: the next run "
              f"decodes the images again", file=sys.stderr)
    return images


def _read_cache(cache, fingerprint, shape):
    """The cached uint8 images of this fingerprint and shape, or None (decode again) when the cache is missing, stale,
    or holds anything else: a file cut short by a crash or a full disk must never pass for the data set."""
    try:
        saved = torch.load(cache, weights_only=True)  # weights_only: tensors and plain containers, never code
    except Exception:  # missing, truncated or garbage: each fails in its own way, and each means decode again
        return None
    images = saved.get("images") if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else None
    whole = isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.shape == shape
    return images if whole else None


def _fingerprint(root, files):
    """md5 over every image's relative name, size and mtime: changes when any file is added, removed or rewritten."""
    digest, start = hashlib.md5(), len(str(root)) + 1
    for path in files:
        try:
            info = path.stat()
        except FileNotFoundError:
            raise DataError(f"the image {path} is missing (val_annotations.txt names it)") from None
        digest.update(f"{str(path)[start:]}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())  # name below root
    return digest.hexdigest()


def _decode_images(files):
    """Decode JPEGs with Pillow, grayscale ones converted to RGB: uint8 (N, 3, 64, 64)."""
    print(f"decoding {len(files):,} images once; later runs read the cache", file=sys.stderr)
    size = TINYIMAGENET_SIZE
    images = np.empty((len(files), 3, size, size), dtype=np.uint8)  # (N, C, H, W), filled in place
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                if image.size != (size, size):
                    raise DataError(f"the image {path} is {image.size[0]}x{image.size[1]}, not {size}x{size}")
                rgb = np.asarray(image.convert("RGB"))  # (H, W, C); grayscale (mode L) gets three equal channels
                images[i] = rgb.transpose(2, 0, 1)  # (C, H, W)
        except OSError as error:
            raise DataError(f"the image {path} cannot be read ({error}); replace it or delete the folder") from None
    return torch.from_numpy(images)


# ---------------------------------------------------------------- Shapes: a procedural set, no download
def load_shapes(data_dir=None):
    """9 classes, label = 3 * shape + hue (shapes: disc, square, triangle; hues: red, green, blue); 32x32.
    Each image draws its position, size, saturation, brightness, a hue jitter towards the next primary, a dark
    tinted background, four blobs of clutter in random colours and places, and pixel noise, all from one generator
    seeded with SHAPES_SEED; data_dir is ignored."""
    num_train, num_test = SHAPES_COUNTS
    x, y = _draw_shapes(num_train + num_test, torch.Generator().manual_seed(SHAPES_SEED))
    return x[:num_train], y[:num_train], x[num_train:], y[num_train:]


def _draw_shapes(n, generator):
    """n random shape images: uint8 (n, 3, H, W) and int64 labels (n,); every image at once, no loop."""
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(n, *shape, generator=generator)
    shape, hue = torch.randint(0, 3, (n,), generator=generator), torch.randint(0, 3, (n,), generator=generator)
    radius = uniform(5, 11, 1, 1)  # (n, 1, 1) pixels
    centre_y, centre_x = radius + (SHAPES_SIZE - 2 * radius) * torch.rand(2, n, 1, 1, generator=generator)  # (n, 1, 1)
    grid = torch.arange(SHAPES_SIZE) + 0.5  # pixel centres
    dy, dx = grid[None, :, None] - centre_y, grid[None, None, :] - centre_x  # (n, H, 1), (n, 1, W)
    disc = dx ** 2 + dy ** 2 <= radius ** 2  # (n, H, W)
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.8 * radius
    triangle = (dy <= 0.7 * radius) & (dx.abs() <= 0.55 * (dy + radius))  # apex up, base below the centre
    mask = torch.where(shape[:, None, None] == 0, disc, torch.where(shape[:, None, None] == 1, square, triangle))
    primary, neighbour = F.one_hot(hue, 3).float(), F.one_hot((hue + 1) % 3, 3).float()  # (n, 3)
    saturation = uniform(0.6, 1.0, 1)  # (n, 1)
    colour = uniform(0.6, 1.0, 1) * (saturation * (primary + uniform(0, 0.4, 1) * neighbour) + 1 - saturation)
    background = uniform(0.0, 0.4, 1) + uniform(0.0, 0.15, 3)  # (n, 3) dark grey with a faint random tint
    image = background[:, :, None, None].expand(n, 3, SHAPES_SIZE, SHAPES_SIZE)  # (n, 3, H, W)
    for _ in range(SHAPES_CLUTTER):  # blobs of any colour anywhere, under the shape: nothing to do with the label
        blob_radius, (blob_y, blob_x) = uniform(2, 4, 1, 1), SHAPES_SIZE * torch.rand(2, n, 1, 1, generator=generator)
        blob = (grid[None, :, None] - blob_y) ** 2 + (grid[None, None, :] - blob_x) ** 2 <= blob_radius ** 2  # (n, H, W)
        image = torch.where(blob[:, None], uniform(0.2, 1.0, 3)[:, :, None, None], image)
    image = torch.where(mask[:, None], colour[:, :, None, None], image)  # (n, 3, H, W)
    image = image + 0.06 * torch.randn(image.shape, generator=generator)  # float, roughly 0-1
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), 3 * shape + hue  # uint8 0-255


# main.py's --dataset choices: name -> loader, each returning (x_train, y_train, x_test, y_test).
LOADERS = {"cifar10": load_cifar10, "tinyimagenet": load_tinyimagenet, "shapes": load_shapes}


# ---------------------------------------------------------------- splitting, resizing and batching
def split_validation(x, y, val_fraction=0.1, limit=None, seed=0):
    """One fixed permutation of x; its last val_fraction validate. With a limit, the permutation is first reordered so
    that every class appears in it at its own rate (each image ranked by its place among its class, over the class's
    size), and its first `limit` images are kept: a stratified subset, whose validation tail holds every class too.
    A limit too small for that raises DataError."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))  # (N,)
    if limit:
        labels = y[order]                                                    # (N,) in the permutation's order
        by_class = labels.argsort(stable=True)                               # (N,) positions, class by class
        counts = labels.bincount()                                           # (K,) images per class
        starts = counts.cumsum(0) - counts                                   # (K,) where each class begins
        rank = torch.empty(len(order))                                       # (N,) place among its own class
        rank[by_class] = (torch.arange(len(order)) - starts[labels[by_class]]).float()
        order = order[((rank + 0.5) / counts[labels]).argsort(stable=True)][:limit]   # (limit,) stratified
    num_train = len(order) - round(len(order) * val_fraction)
    train, val = order[:num_train], order[num_train:]
    classes = y.unique()
    if limit and not all(torch.isin(classes, y[split]).all() for split in (train, val)):
        raise DataError(f"--limit {limit} is too small to keep each of the {len(classes)} classes in both the train "
                        f"and the validation split ({val_fraction:.0%}); use at least {math.ceil(len(classes) / val_fraction)}")
    return x[train], y[train], x[val], y[val]


def resize(x, size):
    """uint8 (N, 3, h, w) -> uint8 (N, 3, size, size), bilinear, antialiased when shrinking, in chunks to save
    memory; x itself when it already has that size.

    On the CPU, F.interpolate has a uint8 kernel that rounds and saturates by itself, much faster than a trip
    through float32; no pixel differs from the float result by more than 1 level (tests/test_data.py checks it)."""
    if x.shape[-2:] == (size, size):
        return x
    options = dict(size=(size, size), mode="bilinear", align_corners=False, antialias=size < max(x.shape[-2:]))
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8, device=x.device)  # (N, 3, size, size)
    for start in range(0, len(x), RESIZE_CHUNK):
        chunk = x[start:start + RESIZE_CHUNK]  # (chunk, 3, h, w) uint8
        if x.device.type == "cpu":
            out[start:start + RESIZE_CHUNK] = F.interpolate(chunk, **options)  # (chunk, 3, size, size) uint8
        else:  # no uint8 kernel: through float 0-255, then round and clamp back to uint8
            out[start:start + RESIZE_CHUNK] = F.interpolate(chunk.float(), **options).round().clamp(0, 255).byte()
    return out


def shuffled_batches(x, y, batch_size, generator, skip=0):
    """Yield (x_batch, y_batch) along a fresh random permutation, sliced on x's device, from batch `skip` on (a resumed
    epoch); drop the last partial batch (BatchNorm needs full batches)."""
    pinned = generator.device.type == "cpu" and x.device.type == "cuda"  # a non-blocking copy to the GPU
    order = torch.randperm(len(x), generator=generator, pin_memory=pinned).to(x.device, non_blocking=True)  # (N,)
    for start in range(skip * batch_size, len(x) - batch_size + 1, batch_size):
        batch = order[start:start + batch_size]  # (B,)
        yield x[batch], y[batch]  # (B, 3, H, W) uint8, (B,) int64


def to_float(x):
    """uint8 (B, 3, H, W) in 0-255 -> float32 (B, 3, H, W) in 0-1, on x's device."""
    return x.float() / 255


def save_grid(rows, titles, scale=2, left=110):
    """Rows of float images (each (n, 3, H, W) in [0, 1]) as one picture, each row titled at its left, every image
    enlarged `scale` times without smoothing. -> PIL.Image (the caller saves it)"""
    size = rows[0].shape[-1] * scale
    sheet = Image.new("RGB", (left + max(len(row) for row in rows) * size, len(rows) * size), "white")
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    for r, (title, row) in enumerate(zip(titles, rows)):
        draw.multiline_text((6, r * size + size // 2 - 12), title, "black", font)
        for c, image in enumerate(row):                                     # float (3, H, W) -> uint8 (H, W, 3)
            pixels = (image.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
            sheet.paste(Image.fromarray(pixels).resize((size, size), Image.NEAREST), (left + c * size, r * size))
    return sheet


# ---------------------------------------------------------------- downloads: fetch, check, extract a missing set
def ensure_cifar10(data_dir):
    """Return <data_dir>/cifar-10-batches-py, downloading and extracting the official archive if missing."""
    return _ensure(data_dir, "cifar-10-batches-py", "cifar-10-python.tar.gz", "CIFAR10_URL", CIFAR10_URL, CIFAR10_MD5)


def ensure_tinyimagenet(data_dir):
    """Return <data_dir>/tiny-imagenet-200, downloading and extracting the official zip if missing."""
    return _ensure(data_dir, "tiny-imagenet-200", "tiny-imagenet-200.zip", "TINYIMAGENET_URL", TINYIMAGENET_URL,
                   TINYIMAGENET_MD5)


def _ensure(data_dir, folder_name, archive_name, url_variable, url, md5):
    """Return data_dir/folder_name, first downloading the archive (unless it is there) and extracting it if needed."""
    data_dir = Path(data_dir)
    folder = data_dir / folder_name
    archive = data_dir / archive_name
    url = os.environ.get(url_variable, url)
    if folder.is_dir():
        return folder
    scratch = _scratch_folder(folder, archive)  # first, so that a folder we cannot write is not taken for "offline"
    try:
        _fetch(url, archive, md5, folder, url_variable)
        safe_extract(archive, scratch)
        if not (scratch / folder.name).is_dir():
            raise DataError(f"the archive {archive} has no top-level folder {folder.name}; delete it and run again")
        try:
            os.replace(scratch / folder.name, folder)  # the one step that makes the data visible
        except OSError:  # another run sharing data_dir got there first: use its copy, extracted from the same archive
            if not folder.is_dir():
                raise DataError(f"cannot move the extracted data to {folder}; remove what is in its way") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _scratch_folder(folder, archive):
    """A fresh hidden folder beside `folder`, one per process, to extract into; DataError if we cannot write there."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".extracting-", dir=folder.parent))
    except OSError as error:
        raise DataError(f"cannot extract {archive.name} into {folder.parent} ({error.strerror or error}); make that "
                        f"folder writable, or extract the archive there by hand so that {folder} exists") from None


def _fetch(url, archive, md5, folder, url_variable):
    """download() the archive unless it is there; when that fails, say how to get the data by hand."""
    try:
        download(url, archive, md5)
    except (OSError, http.client.HTTPException) as error:
        if getattr(error, "errno", None) == errno.ENOSPC:  # our disk is full: the network is not to blame
            raise DataError(f"the disk holding {archive.parent} filled up while downloading {archive.name}; free "
                            f"some space and run again") from None
        raise DataError(
            f"found neither the folder {folder} nor the archive {archive}, and downloading {url} failed "
            f"({getattr(error, 'reason', error)}). Connect to the internet and run again, or download {url} by hand "
            f"and put the archive at {archive} (it is then used without downloading) or its extracted folder at "
            f"{folder}; the environment variable {url_variable} can name a mirror.") from None


def download(url, dest, md5):
    """Stream url into a temporary file beside dest with a progress line, check its length and md5, then rename it
    to dest; skip an existing dest, and keep one another run finishes meanwhile. Nothing is left behind on failure.
    Raises DataError on a cut-off or corrupted download, OSError (urllib's URLError) when the server is unreachable."""
    dest = Path(dest)
    if dest.exists():
        return dest
    with urllib.request.urlopen(url, timeout=60) as response:
        total = int(response.headers.get("Content-Length") or 0)

        def receive(file):
            received, digest = _stream(response, file, total, dest.name)
            if total and received < total:
                raise DataError(f"the download of {url} was cut off after {received:,} of {total:,} bytes; "
                                f"nothing was kept, run again to retry")
            if digest != md5:
                raise DataError(f"checksum mismatch for {url}: md5 {digest}, expected {md5}; "
                                f"the downloaded file was deleted")
        write_atomically(dest, receive, keep_existing=True)
    return dest


def _stream(response, file, total, name):
    """Copy response to file in 1 MiB pieces, printing bytes, % and speed to stderr; return (bytes, md5 hex)."""
    digest, received, start, shown = hashlib.md5(), 0, time.time(), 0.0
    while piece := response.read(1 << 20):
        file.write(piece)
        digest.update(piece)
        received += len(piece)
        elapsed = time.time() - start
        if elapsed - shown >= PROGRESS_SECONDS:
            shown = elapsed
            size = f"{received / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB ({100 * received / total:.0f}%)"
                                                  if total else "")
            print(f"\rdownloading {name}: {size}, {received / 1e6 / elapsed:.1f} MB/s", end="", file=sys.stderr,
                  flush=True)
    if shown:
        print(file=sys.stderr)
    return received, digest.hexdigest()


def write_atomically(dest, write, keep_existing=False):
    """Fill a fresh temporary file beside dest with write(file), flush it to the disk and rename it to dest (with
    keep_existing, drop it if dest appeared meanwhile). mkstemp gives each writer a name of its own, so two runs sharing
    the folder never write into one file; the rename is atomic, so dest is never torn; a failure removes the file."""
    handle, temporary = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on the disk before the name is: a crash cannot publish a torn file
        umask = os.umask(0o022)  # the only way to read the umask is to set it: put it straight back
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp's file is private (0600); other users of the folder read it too
        if not (keep_existing and dest.exists()):
            os.replace(temporary, dest)
            if os.name == "posix":  # the new name reaches the disk with its folder: fsync the folder too
                folder = os.open(dest.parent, os.O_RDONLY)
                os.fsync(folder)
                os.close(folder)
    finally:
        Path(temporary).unlink(missing_ok=True)  # already gone after the rename


def safe_extract(archive, dest):
    """Extract a .tar(.gz) or .zip into dest after checking every member; refuse the whole archive if one
    is absolute, climbs out with '..', or is a link or device (it could write outside dest)."""
    archive = Path(archive)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zipped:
                for info in zipped.infolist():  # the high 16 bits hold the Unix mode (0 from non-Unix zippers)
                    file_type = stat.S_IFMT(info.external_attr >> 16)
                    _check_member(archive, info.filename, file_type in (0, stat.S_IFREG, stat.S_IFDIR))
                zipped.extractall(dest)
        else:
            with tarfile.open(archive) as tarred:
                for info in tarred.getmembers():
                    _check_member(archive, info.name, info.isfile() or info.isdir())
                # Python 3.11.4+ also has the "data" filter (safe permissions and owners); older Pythons lack it,
                # and the checks above already refuse every member that could write outside dest
                tarred.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"the archive {archive} is damaged ({error}); delete it and run again") from None
    except OSError as error:  # a full disk or a folder we cannot write (BadGzipFile, an OSError too, is caught above)
        raise DataError(f"cannot extract {archive} ({error.strerror or error}); free some disk space or make its "
                        f"folder writable, and run again") from None


def _check_member(archive, name, is_file_or_folder):
    """Raise DataError unless the member `name` stays inside the target folder and is a plain file or folder."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"refusing to extract {archive}: member {name!r} would land outside the target folder")
    if not is_file_or_folder:
        raise DataError(f"refusing to extract {archive}: member {name!r} is a link or a device, not a file")


