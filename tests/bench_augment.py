"""Benchmark: images per second of every augmentation in augment.py at batch 256, 3x64x64, per-image parameters,
beside kornia's batched equivalents and a per-image loop of torchvision.transforms.v2 (each only if installed).

Run from the repository root:  python tests/bench_augment.py
Not a test (pytest collects only test_*.py). bench_augmentations() returns the rows for a wider bench script.
"""

import os
import platform
import sys

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TESTS))  # the repository root, for augment
sys.path.insert(0, TESTS)  # for timing, also when this file is imported by another bench script
import augment  # noqa: E402
from timing import images_per_second  # noqa: E402

BATCH_SIZE = 256  # the batch of the README's augmentation table, which this script produced
IMAGE_SIZE = 64  # Tiny ImageNet, and CIFAR-10 after resizing
RUNS = 7  # timed rounds per entry, after one warm-up call each; the median is reported


def kornia_equivalents():
    """name -> kornia module with the same distributions (per-image draws), or {} when kornia is absent."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return {}
    size = (IMAGE_SIZE, IMAGE_SIZE)
    crop = K.RandomResizedCrop(size, scale=(0.25, 1.0), ratio=(1.0, 1.0), cropping_mode="resample", p=1.0)
    center_crop = K.RandomAffine(degrees=0.0, scale=(1.0, 2.0), padding_mode="reflection", p=1.0)
    rotate = K.RandomRotation(degrees=30.0, p=1.0)
    brightness_contrast = K.ColorJitter(brightness=0.4, contrast=0.4, p=1.0)
    hue_saturation = K.ColorJitter(saturation=0.4, hue=0.1, p=1.0)
    steps = [crop, center_crop, rotate, brightness_contrast, hue_saturation]
    return {"crop": crop, "center-crop": center_crop, "rotate": rotate, "brightness-contrast": brightness_contrast,
            "hue-saturation": hue_saturation, "all": torch.nn.Sequential(*steps)}


def torchvision_equivalents():
    """name -> function looping torchvision.transforms.v2 over the images one by one, or {} when absent."""
    try:
        from torchvision.transforms import v2
    except ImportError:
        return {}
    transforms = {
        "crop": v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.25, 1.0), ratio=(1.0, 1.0)),
        "center-crop": v2.RandomAffine(degrees=0.0, scale=(1.0, 2.0)),
        "rotate": v2.RandomRotation(30.0),
        "brightness-contrast": v2.ColorJitter(brightness=0.4, contrast=0.4),
        "hue-saturation": v2.ColorJitter(saturation=0.4, hue=0.1),
    }
    transforms["all"] = v2.Compose(list(transforms.values()))
    return {name: (lambda x, t=t: torch.stack([t(image) for image in x])) for name, t in transforms.items()}


def machine():
    """One line naming the machine and library versions the numbers were measured on."""
    processor = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):  # Linux: platform.processor() is often empty or just the architecture
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        processor = f"{names[0]} ({processor})" if names else processor
    return (f"{processor}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def bench_augmentations(batch_size=BATCH_SIZE, image_size=IMAGE_SIZE, runs=RUNS):
    """One row per augmentation: images/s of ours, kornia's and torchvision's (None where not installed)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=generator)  # (B, C, H, W) float in [0, 1]
    kornia, torchvision = kornia_equivalents(), torchvision_equivalents()
    rows = []
    for name, fn in augment.AUGMENTATIONS.items():
        contenders = {"ours": lambda x, fn=fn: fn(x, generator=generator)}
        for library, equivalents in (("kornia", kornia), ("torchvision", torchvision)):
            if name in equivalents:
                contenders[library] = equivalents[name]
        speeds = dict(zip(contenders, images_per_second(list(contenders.values()), x, runs)))
        rows.append({"augmentation": name, "ours": speeds["ours"], "kornia": speeds.get("kornia"),
                     "torchvision": speeds.get("torchvision")})
    return rows


def print_table(rows):
    """Images/s per library and the speed ratio ours / theirs ('-' where there is nothing to compare)."""
    def cell(value):
        return f"{value:>12,.0f}" if value is not None else f"{'-':>12}"

    def ratio(ours, theirs):
        return f"{ours / theirs:>8.2f}x" if theirs else f"{'-':>9}"

    print(f"{'augmentation':<20}{'ours img/s':>12}{'kornia':>12}{'ours/kornia':>12}{'tv v2 loop':>12}{'ours/tv':>9}")
    for row in rows:
        print(f"{row['augmentation']:<20}{cell(row['ours'])}{cell(row['kornia'])}   {ratio(row['ours'], row['kornia'])}"
              f"{cell(row['torchvision'])}{ratio(row['ours'], row['torchvision'])}")


def main():
    print(machine())
    print(f"batch {BATCH_SIZE} x 3 x {IMAGE_SIZE} x {IMAGE_SIZE}, per-image parameters, median of {RUNS} runs")
    if not kornia_equivalents():
        print("kornia is not installed: its columns are skipped")
    if not torchvision_equivalents():
        print("torchvision is not installed: its columns are skipped")
    print_table(bench_augmentations())


if __name__ == "__main__":
    main()
