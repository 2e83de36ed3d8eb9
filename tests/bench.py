"""Speed of this project on this machine, each figure beside a plain baseline measured in the same run.

    python tests/bench.py                       # stage 1 at 64x64 and 32x32, stage 2, augmentations
    python tests/bench.py --data-dir /tmp/cifar10   # also time loading CIFAR-10 from its pickles

Stage 1 baseline: the same VAE, a plain eager fp32 NCHW training step on a ready float batch, with the
process's default settings (glibc malloc as it comes). It runs first, because the project's allocator
setting (main.tune_allocator) cannot be undone inside a process. The project's step then includes
everything a real epoch does per batch: slicing a shuffled uint8 batch, converting it, augmenting it.
Not collected by pytest (the file name does not start with test_).
"""
import argparse
import platform
import statistics
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

CIFAR_TRAIN, CIFAR_ALL = 45_000, 60_000   # stage-1 images per epoch; images whose features stage 2 extracts


def median_seconds(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def plain_step(image_size, batch_size, device):
    """The baseline: eager fp32, NCHW, a ready float batch, no augmentation."""
    torch.manual_seed(0)
    model = vae.VAE(image_size=image_size).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch_size, 3, image_size, image_size, device=device)

    def step():
        x_logits, mu, logvar = model(x)
        loss = vae.elbo(x_logits, x, mu, logvar).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return step


def project_step(image_size, batch_size, aug, amp, device):
    """What main.train_vae does per batch: slice a shuffled uint8 batch, then main.train_step (convert,
    augment, channels_last, autocast, step). Also returns the batch preparation alone, to time its share."""
    torch.manual_seed(0)
    model = vae.VAE(image_size=image_size).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x_all = torch.randint(0, 256, (4 * batch_size, 3, image_size, image_size), dtype=torch.uint8, device=device)
    y_all = torch.zeros(len(x_all), dtype=torch.long, device=device)
    rng, aug_rng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    args = argparse.Namespace(strength=1.0, beta=1.0)

    def prepare():
        x_uint8, _ = next(data.shuffled_batches(x_all, y_all, batch_size, rng))
        x = data.to_float(x_uint8).contiguous(memory_format=torch.channels_last)
        return x_uint8, augment.AUGMENTATIONS[aug](x, 1.0, aug_rng)

    def step():
        x_uint8, _ = next(data.shuffled_batches(x_all, y_all, batch_size, rng))
        main.train_step(model, optimizer, x_uint8, augment.AUGMENTATIONS[aug], aug_rng, args, amp)  # syncs
    return step, prepare


def bench_stage1(device, amp, sizes, batch_size, repeats):
    rows = []
    baselines = {s: batch_size / median_seconds(plain_step(s, batch_size, device), repeats) for s in sizes}
    main.tune_allocator()                       # from here on, the project's process settings
    for s in sizes:
        step, prepare = project_step(s, batch_size, "crop", amp, device)
        ours = batch_size / median_seconds(step, repeats)
        overhead = median_seconds(prepare, repeats) * ours / batch_size
        rows.append((s, baselines[s], ours, overhead))
        print(f"stage 1 {s}x{s} batch {batch_size}: plain eager fp32 {baselines[s]:7.0f} img/s | project "
              f"{ours:7.0f} img/s ({ours / baselines[s]:.2f}x) | CIFAR-10 epoch {CIFAR_TRAIN / ours:5.1f} s | "
              f"slice+convert+augment {100 * overhead:.1f}% of a step", flush=True)
    return rows


def bench_stage2(device, amp, image_size, batch_size, epochs):
    """Feature extraction rate (measured on 2,048 images, scaled to 60,000) and 40 real head epochs on 45,000."""
    model = vae.VAE(image_size=image_size).to(device, memory_format=torch.channels_last)
    x = torch.randint(0, 256, (2048, 3, image_size, image_size), dtype=torch.uint8, device=device)
    extract = median_seconds(lambda: probe.extract_features(model, x, 500, amp), 3, warmup=1)
    features, y = torch.randn(CIFAR_TRAIN, vae.LATENT_DIM, device=device), torch.randint(0, 10, (CIFAR_TRAIN,), device=device)
    head = probe.make_head(vae.LATENT_DIM, 10).to(device)
    optimizer, rng = torch.optim.Adam(head.parameters(), lr=1e-4), torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(epochs):
        probe.train_epoch(head, optimizer, features, y, batch_size, rng)
        probe.evaluate(head, features, y)
    head_seconds = time.perf_counter() - t
    extract_all = extract * CIFAR_ALL / len(x)
    print(f"stage 2 {image_size}x{image_size}: features {len(x) / extract:6.0f} img/s -> {extract_all:.1f} s for "
          f"60,000 images; {epochs} head epochs on 45,000 features {head_seconds:.1f} s; "
          f"total {extract_all + head_seconds:.1f} s", flush=True)


def bench_data(data_dir):
    t = time.perf_counter()
    x_train, _, x_test, _ = data.load_cifar10(data_dir)
    load = time.perf_counter() - t
    t = time.perf_counter()
    data.resize(x_train, 64), data.resize(x_test, 64)
    print(f"data: CIFAR-10 pickles -> uint8 tensors {load:.2f} s; resize 60,000 images to 64x64 once "
          f"{time.perf_counter() - t:.2f} s", flush=True)


def run():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--data-dir", default=None, help="a folder holding cifar-10-batches-py (optional)")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = main.pick_device(args.device)
    amp = main.pick_precision(args.precision, device)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU ' + torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {'bf16' if amp else 'fp32'}", flush=True)
    if args.data_dir:
        bench_data(args.data_dir)
    bench_stage1(device, amp, (64, 32), 128, args.repeats)
    bench_stage2(device, amp, 64, 128, 40)
    try:
        import bench_augment
        bench_augment.main()
    except ImportError as e:
        print(f"augmentation benchmark skipped: {e}")


if __name__ == "__main__":
    run()
