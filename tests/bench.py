"""Speed of this project on this machine, each figure beside a plain baseline measured in the same run.

    python tests/bench.py                            # stage 1 at 64x64 and 32x32, stage 2, augmentations
    python tests/bench.py --device cuda              # the same on a GPU, with the CUDA-graph step beside it
    python tests/bench.py --data-dir ./data          # also time loading CIFAR-10 from its pickles
    python tests/bench.py --allocator                # stage 1 with glibc's allocator as it comes and tuned

Stage 1 baseline: the same VAE, a plain eager fp32 NCHW training step on a ready float batch. The project's step
includes everything a real epoch does per batch: slicing a shuffled uint8 batch, converting it, augmenting it
(crop), then vae.train_step, in fp32 and in bf16 autocast (where the hardware has bf16), and replayed as a CUDA
graph (on CUDA). The variants take turns step by step, so a change of load on a shared machine hits all alike;
the line ends with what `--precision auto` picks there, which should be the faster precision.
Not collected by pytest (the file name does not start with test_).
"""
import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import augment  # noqa: E402
import data  # noqa: E402
import main  # noqa: E402
import probe  # noqa: E402
import vae  # noqa: E402
from timing import images_per_second, median_seconds  # noqa: E402

CIFAR_TRAIN, CIFAR_ALL = 45_000, 60_000   # stage-1 images per epoch; images whose features stage 2 extracts


def plain_step(image_size, batch_size, device):
    """The baseline: eager fp32, NCHW, a ready float batch, no augmentation."""
    torch.manual_seed(0)
    model = vae.VAE(image_size=image_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)

    def step(_):
        x_logits, mu, logvar = model(x)
        loss = vae.elbo(x_logits, x, mu, logvar).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        vae.sync(device)
    return step


def project_step(image_size, batch_size, precision, device, graphed=False):
    """What main.train_vae does per batch: slice a shuffled uint8 batch, convert and augment it, vae.train_step."""
    torch.manual_seed(0)
    model = vae.VAE(image_size=image_size).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=graphed)
    train_step = vae.cuda_graphed(vae.train_step) if graphed else vae.train_step
    x_all = torch.randint(0, 256, (4 * batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    y_all = torch.zeros(len(x_all), dtype=torch.long, device=device)
    batch_rng, aug_rng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    ctx = vae.autocast_context(device, precision)

    def step(_):
        x_uint8, _ = next(data.shuffled_batches(x_all, y_all, batch_size, batch_rng))
        x, x_aug = main.augmented_batch(x_uint8, augment.crop, 1.0, aug_rng)
        train_step(model, optimizer, x, x_aug, 1.0, ctx)
        vae.sync(device)
    return step


def bench_stage1(device, sizes, batch_size, repeats):
    """Images/s of the baseline and the project's variants at each size, side by side."""
    bf16 = device.type == "cuda" or vae.cpu_has_native_bf16()
    for size in sizes:
        variants = {"plain eager fp32": plain_step(size, batch_size, device),
                    "project fp32": project_step(size, batch_size, "fp32", device)}
        if bf16:
            variants["project bf16"] = project_step(size, batch_size, "bf16", device)
        if device.type == "cuda":
            variants["project fp32, CUDA graph"] = project_step(size, batch_size, "fp32", device, graphed=True)
        batch = torch.empty(batch_size)                        # only its length is read: images per call
        speeds = dict(zip(variants, images_per_second(list(variants.values()), batch, repeats, warmup=5)))
        baseline = speeds["plain eager fp32"]
        cells = " | ".join(f"{name} {speed:6.0f} img/s ({speed / baseline:.2f}x)" for name, speed in speeds.items())
        picked, _ = vae.pick_precision("auto", device, size)
        print(f"stage 1 {size}x{size} batch {batch_size}: {cells} | auto picks {picked}", flush=True)


def bench_stage2(device, image_size, batch_size, epochs):
    """Feature extraction rate (measured on 2,048 images, scaled to 60,000) and `epochs` head epochs on 45,000."""
    model = vae.VAE(image_size=image_size).to(device, memory_format=torch.channels_last)
    x = torch.randint(0, 256, (2048, 3, image_size, image_size), dtype=torch.uint8, device=device)
    extract = median_seconds(lambda: probe.extract_features(model, x, 500), 3, warmup=1)
    features = torch.randn(CIFAR_TRAIN, vae.LATENT_DIM, device=device)
    y = torch.randint(0, 10, (CIFAR_TRAIN,), device=device)
    head = probe.make_head(vae.LATENT_DIM, 10).to(device)
    optimizer, rng = torch.optim.Adam(head.parameters(), lr=1e-4), torch.Generator().manual_seed(0)
    t_start = time.perf_counter()
    for _ in range(epochs):
        probe.train_epoch(head, optimizer, features, y, batch_size, rng)
        probe.evaluate(head, features, y)
    head_seconds = time.perf_counter() - t_start
    extract_all = extract * CIFAR_ALL / len(x)
    print(f"stage 2 {image_size}x{image_size} (fp32): features {len(x) / extract:6.0f} img/s -> {extract_all:.1f} s "
          f"for 60,000 images; {epochs} head epochs on 45,000 features {head_seconds:.1f} s", flush=True)


def bench_allocator(rounds, repeats):
    """Stage 1 at 64x64 (the project's step, the precision auto picks) in fresh processes, with glibc's allocator as
    it comes and after vae.tune_allocator(), the two taking turns process by process: the median of each, the ratio."""
    speeds = {"as it comes": [], "tuned": []}
    for _ in range(rounds):
        for name in speeds:
            child = [sys.executable, __file__, "--stage1-rate", str(repeats)] + (["--tuned"] if name == "tuned" else [])
            speeds[name].append(float(subprocess.run(child, capture_output=True, text=True, check=True).stdout))
    plain, tuned = (statistics.median(v) for v in speeds.values())
    print(f"stage 1 64x64 batch 128, {rounds} processes each: glibc's allocator as it comes {plain:.0f} img/s, tuned "
          f"{tuned:.0f} img/s ({tuned / plain:.2f}x); every process: "
          f"{ {name: [round(v) for v in values] for name, values in speeds.items()} }", flush=True)


def bench_data(data_dir):
    t_start = time.perf_counter()
    x_train, _, x_test, _ = data.load_cifar10(data_dir)
    load = time.perf_counter() - t_start
    t_start = time.perf_counter()
    data.resize(x_train, 64), data.resize(x_test, 64)
    print(f"data: CIFAR-10 pickles -> uint8 tensors {load:.2f} s; resize 60,000 images to 64x64 once "
          f"{time.perf_counter() - t_start:.2f} s", flush=True)


def run():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None, help="a folder holding cifar-10-batches-py (optional)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per variant")
    p.add_argument("--skip-augment", action="store_true", help="leave out the augmentation benchmark")
    p.add_argument("--allocator", action="store_true", help="only compare glibc's allocator as it comes and tuned")
    p.add_argument("--stage1-rate", type=int, default=None, help=argparse.SUPPRESS)   # a child of --allocator
    p.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage1_rate:
        if args.tuned:
            vae.tune_allocator()
        precision = vae.pick_precision("auto", torch.device("cpu"), 64)[0]
        print(images_per_second([project_step(64, 128, precision, torch.device("cpu"))], torch.empty(128),
                                args.stage1_rate, warmup=5)[0])
        return
    if args.allocator:
        bench_allocator(rounds=9, repeats=args.repeats)
        return
    device = vae.pick_device(args.device)
    vae.tune_allocator()                                   # every variant runs with the project's process settings
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU " + torch.backends.cpu.get_cpu_capability()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, {name}, "
          f"native bf16 {device.type == 'cuda' or vae.cpu_has_native_bf16()}, torch {torch.__version__}", flush=True)
    if args.data_dir:
        bench_data(args.data_dir)
    bench_stage1(device, (64, 32), 128, args.repeats)
    bench_stage2(device, 64, 128, 40)
    if not args.skip_augment:
        import bench_augment
        bench_augment.main()


if __name__ == "__main__":
    run()
