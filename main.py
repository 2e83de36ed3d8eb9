"""
Run the paper's experiment end to end: learn an augmentation with a VAE, then probe what its encoder kept.

    python main.py --dataset cifar10 --aug crop      # the paper's protocol (100 + 40 epochs, 64x64)
    python main.py --dataset shapes                  # the same experiment offline, in about a minute on a CPU

Method (Rajagopalan 2021, "Learned Data Augmentation"), one function per step, in the order main() calls them:
    1. parse the command line, pick the device and precision, load and split the data;
    2. stage 1 (train_vae): for every batch, x_aug = augment(x); minimise -ELBO(decode(z), x),
       z ~ q(z | x_aug): augmented in, clean out;
    3. stage 2 (train_probe): freeze the encoder, train the paper's head on mu, report top-1/top-5;
    4. both stages for the baseline ("none": clean in, clean out) and for --aug, then compare (report).
Every epoch of both stages ends with an atomic checkpoint, so Ctrl-C (or SIGTERM) finishes the step,
saves, and `--resume` continues bit for bit on the CPU. Outputs land in one run folder: summary.json,
metrics.jsonl, reconstructions.png, curves.png and the weights of both VAEs and both probes.

Axes: B batch, C channels, H/W height/width, D latent size, K classes.
"""
import argparse
import ctypes
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import augment
import data
import probe
import vae

# Dataset-dependent defaults: the paper's settings for real data, small ones for the offline `shapes` run.
DEFAULTS = {
    "cifar10": dict(epochs=100, probe_epochs=40, image_size=64, batch_size=128),       # epochs, size: paper; batch: ours
    "tinyimagenet": dict(epochs=100, probe_epochs=40, image_size=64, batch_size=128),  # as for CIFAR-10
    "shapes": dict(epochs=3, probe_epochs=40, image_size=32, batch_size=128),          # ~1 minute on 2 cores
}
VAL_FRACTION = 0.1        # 45,000 / 5,000 for CIFAR-10; the test set is only read at the very end
SPLIT_SEED = 0            # the validation split never changes with --seed
VAL_IMAGES = 1000         # stage-1 validation ELBO and test reconstruction error use this many images
STOP = threading.Event()  # set by SIGINT/SIGTERM; the training loops check it after every step


class Interrupted(Exception):
    """Raised after a checkpoint has been saved in answer to SIGINT/SIGTERM."""


def fail(message, status=2):
    """Stop with one clear line on stderr and no traceback: status 2 for usage and input errors."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def request_stop(signum, frame):
    """SIGINT/SIGTERM: let the current step finish and checkpoint; a second signal stops at once."""
    STOP.set()
    signal.signal(signum, signal.SIG_DFL)

# -----------------------------------------------------------------------------
# Command line, device, and process settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    per = lambda key: "default: " + ", ".join(f"{d} {v[key]}" for d, v in DEFAULTS.items())  # noqa: E731
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.LOADERS), help="data set (default: %(default)s)")
    p.add_argument("--aug", default="crop", choices=list(augment.AUGMENTATIONS),
                   help="augmentation of the second VAE; 'none' trains only the baseline (default: %(default)s)")
    p.add_argument("--strength", type=float, default=1.0, help="augmentation strength (0 = identity) (default: %(default)s)")
    p.add_argument("--data-dir", default="./data", help="where data sets are found or downloaded (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<aug>-seed<seed>)")
    p.add_argument("--epochs", type=int, default=None, help=f"stage-1 VAE epochs ({per('epochs')})")
    p.add_argument("--probe-epochs", type=int, default=None, help=f"stage-2 epochs ({per('probe_epochs')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"both stages ({per('batch_size')})")
    p.add_argument("--image-size", type=int, default=None, help=f"a multiple of 32 ({per('image_size')})")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the VAE (paper) (default: %(default)s)")
    p.add_argument("--probe-lr", type=float, default=1e-4, help="Adam learning rate of the probe (paper) (default: %(default)s)")
    p.add_argument("--latent-dim", type=int, default=vae.LATENT_DIM, help="latent size D (default: %(default)s)")
    p.add_argument("--beta", type=float, default=1.0, help="KL weight; 1.0 is the true ELBO (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, batch order, augmentations (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast where the hardware runs it fast (CUDA, AVX512-BF16/AMX CPUs) (default: %(default)s)")
    p.add_argument("--log-every", type=float, default=2.0, help="seconds between progress lines (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a run")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or f"runs/{args.dataset}-{args.aug}-seed{args.seed}"
    saved = Path(args.out) / "args.json"
    if args.resume and saved.exists():     # continue with the settings the run was started with
        args = argparse.Namespace(**{**json.loads(saved.read_text()), "resume": True, "device": args.device})
    check_args(args)
    return args


def check_args(args):
    """Reject flag values the experiment cannot run with, before any work is done."""
    for name in ("epochs", "probe_epochs", "latent_dim"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        fail(f"--batch-size must be at least 2 (BatchNorm needs two images), got {args.batch_size}")
    if args.image_size < 32 or args.image_size % 32:
        fail(f"--image-size must be a positive multiple of 32 (five stride-2 layers), got {args.image_size}")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be at least 1, got {args.limit}")
    if not (args.lr > 0 and args.probe_lr > 0 and args.beta >= 0 and args.strength >= 0):
        fail("--lr and --probe-lr must be positive, --beta and --strength non-negative")


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; a device that is absent is a usage error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        fail(f"unsupported --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True   # shapes never change: let cuDNN time and pick its kernels once
    return device


def pick_precision(choice, device):
    """The autocast dtype (bf16) or None for plain fp32. bf16 only where it is fast: emulated, it is ~10x slower."""
    if choice == "fp32":
        return None
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if choice == "bf16" or fast:
        return torch.bfloat16
    return None


def tune_allocator():
    """Stop glibc from returning big activation buffers to the OS after every step (Linux only).

    By default malloc serves blocks above 128 KiB with mmap and frees them with munmap, so every step
    page-faults its activations in again; raising the mmap and trim thresholds keeps them in the heap
    (at 64x64, batch 128, on our CPU: 26,844 page faults per step before, 0 to ~1,100 after)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                           # musl or another libc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3        # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)           # the largest glibc accepts on 64-bit systems
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)

# -----------------------------------------------------------------------------
# Data, run folder and checkpoints


def load_data(args, device, amp):
    """Load, split off validation, resize once, move to the device: uint8 (N, 3, S, S), int64 (N,)."""
    x_train, y_train, x_test, y_test = data.LOADERS[args.dataset](args.data_dir)
    if args.limit is not None and args.limit > len(x_train):
        fail(f"--limit {args.limit} is more than the {len(x_train)} training images of {args.dataset}")
    x_train, y_train, x_val, y_val = data.split_validation(x_train, y_train, VAL_FRACTION, args.limit, SPLIT_SEED)
    if args.batch_size > len(x_train):
        fail(f"--batch-size {args.batch_size} is larger than the {len(x_train)} training images")
    if len(x_val) == 0:
        fail(f"--limit {args.limit} leaves no validation images (they are {VAL_FRACTION:.0%}); use at least 10")
    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    splits = {k: (data.resize(x, args.image_size).to(device), y.to(device)) for k, (x, y) in splits.items()}
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    print(f"{args.dataset}: {len(x_train)} train, {len(x_val)} val, {len(x_test)} test images at "
          f"{args.image_size}x{args.image_size}, {num_classes} classes; {device}, {'bf16' if amp else 'fp32'}", flush=True)
    return splits, num_classes


def prepare_run_dir(args):
    """Create the run folder; refuse to silently overwrite a run that is already there."""
    run_dir = Path(args.out)
    holds_run = (run_dir / "args.json").exists()
    if args.resume and not holds_run:
        fail(f"--resume: {run_dir} holds no run to continue")
    if holds_run and not (args.resume or args.overwrite):
        fail(f"{run_dir} already holds a run: add --resume to continue it or --overwrite to start over")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for old in run_dir.glob("checkpoint-*.pt"):
                old.unlink()
        if not args.resume:
            write_json(run_dir / "args.json", vars(args))
    except OSError as e:
        fail(f"cannot write to the output folder {run_dir}: {e.strerror}")
    return run_dir


def write_json(path, obj):
    """Write JSON atomically: a temporary file, then a rename."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def save_checkpoint(path, state):
    """torch.save to a temporary file, then rename: a crash mid-write never leaves a half checkpoint."""
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """The saved state, or a clear error for a truncated or unreadable file."""
    try:
        return torch.load(path, map_location="cpu")
    except Exception as e:   # torch raises several types for a damaged file
        fail(f"checkpoint {path} is truncated or unreadable ({type(e).__name__}); "
             f"delete it to redo that stage, or start over with --overwrite")


def peak_memory_mb():
    """Peak resident memory of this process so far (Unix; NaN elsewhere), to show that it does not grow."""
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def rng_state():
    """The global CPU (and CUDA) random state, which draws eps in reparameterize: saved for an exact resume."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what rng_state saved."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])

# -----------------------------------------------------------------------------
# Stage 1: learn the augmentation


def train_step(model, optimizer, x_uint8, augment_fn, aug_rng, args, amp):
    """One step of stage 1, the paper's idea in two lines: augmented in, clean out. -> [loss, recon, kl]"""
    x = data.to_float(x_uint8).contiguous(memory_format=torch.channels_last)  # (B, 3, H, W) float in [0, 1]
    x_aug = augment_fn(x, args.strength, aug_rng)                             # (B, 3, H, W) float in [0, 1]
    with autocast(x.device, amp):
        x_logits, mu, logvar = model(x_aug)
    parts = vae.elbo(x_logits, x, mu, logvar, args.beta)
    optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    optimizer.step()
    return torch.stack([parts.loss.detach(), parts.recon.mean(), parts.kl.mean()]).tolist()  # one sync


def autocast(device, amp):
    """bf16 autocast when `amp` is set; a no-op context for plain fp32."""
    return torch.autocast(device.type, amp or torch.float32, enabled=amp is not None)


def train_vae(name, splits, args, device, amp, run_dir):
    """Stage 1: train a VAE on (augment(x) -> x); checkpointed every epoch and on a signal, resumable."""
    torch.manual_seed(args.seed)      # both VAEs start from the same weights: a controlled comparison
    model = vae.VAE(args.latent_dim, args.image_size).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    batch_rng, aug_rng = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    x_train, y_train = splits["train"]
    steps = len(x_train) // args.batch_size
    st = {"epoch": 0, "step": 0, "history": [], "seconds": 0.0, "sums": [0.0, 0.0, 0.0]}
    path = run_dir / f"checkpoint-{name}-vae.pt"
    if path.exists():
        st = load_checkpoint(path)
        model.load_state_dict(st["model"]), optimizer.load_state_dict(st["optimizer"])
        batch_rng.set_state(st["batch_rng"]), aug_rng.set_state(st["aug_rng"]), set_rng_state(st["rng"])
    save = lambda: save_checkpoint(path, {**st, "model": model.state_dict(), "optimizer": optimizer.state_dict(),  # noqa: E731
                                          "batch_rng": batch_rng.get_state(), "aug_rng": aug_rng.get_state(),
                                          "rng": rng_state()})
    clock = Progress(f"stage 1 [{name}]", args, steps, st)
    while st["epoch"] < args.epochs:
        if st["step"] == 0:
            st["epoch_rng"] = batch_rng.get_state()    # the epoch's batch order, kept for a mid-epoch resume
        else:
            batch_rng.set_state(st["epoch_rng"])       # resuming mid-epoch: draw the same order again
        model.train()
        for step, (x_uint8, _) in enumerate(data.shuffled_batches(x_train, y_train, args.batch_size, batch_rng)):
            if step < st["step"]:
                continue                               # resuming mid-epoch: skip the steps already taken
            values = train_step(model, optimizer, x_uint8, augment.AUGMENTATIONS[name], aug_rng, args, amp)
            if not math.isfinite(values[0]):
                fail(f"stage 1 ({name}) diverged: the loss is {values[0]} at epoch {st['epoch'] + 1}, step {step + 1}. "
                     f"The last good checkpoint is kept in {run_dir}; try a lower --lr or --precision fp32", 3)
            st["sums"] = [a + b for a, b in zip(st["sums"], values)]
            st["step"] += 1
            clock.tick(values[0])
            if STOP.is_set():
                save()
                raise Interrupted
        row = {f"train_{k}": v / steps for k, v in zip(("loss", "recon", "kl"), st["sums"])}
        row.update(evaluate_vae(model, splits["val"][0][:VAL_IMAGES], augment.AUGMENTATIONS[args.aug], args, amp))
        st["history"].append({"run": name, "stage": "vae", "epoch": st["epoch"] + 1, **row})
        st.update(epoch=st["epoch"] + 1, step=0, sums=[0.0, 0.0, 0.0])
        save()
        print(f"stage 1 [{name}] epoch {st['epoch']}/{args.epochs} done: train loss {row['train_loss']:.1f}, val loss "
              f"{row['val_loss_clean']:.1f} from clean, {row['val_loss_aug']:.1f} from augmented input; "
              f"peak memory {peak_memory_mb():.0f} MB", flush=True)
    return model, st["history"], {"vae_seconds": st["seconds"],
                                  "vae_images_per_s": args.epochs * steps * args.batch_size / st["seconds"]}


class Progress:
    """Adds up stage-1 seconds in the checkpointed state and prints a line every --log-every seconds."""

    def __init__(self, title, args, steps, st):
        self.title, self.args, self.steps, self.st = title, args, steps, st
        self.start = self.last = time.perf_counter()
        self.seconds_before, self.done = st["seconds"], 0

    def tick(self, loss):
        st, args, now = self.st, self.args, time.perf_counter()
        st["seconds"], self.done = self.seconds_before + now - self.start, self.done + 1
        if now - self.last < args.log_every and not STOP.is_set():
            return
        self.last, rate = now, self.done * args.batch_size / (now - self.start)
        left = (args.epochs - st["epoch"]) * self.steps - st["step"]
        print(f"{self.title} epoch {st['epoch'] + 1}/{args.epochs} step {st['step']}/{self.steps} loss {loss:.1f}"
              f" = -recon {-st['sums'][1] / st['step']:.1f} + kl {st['sums'][2] / st['step']:.1f} | "
              f"{rate:.0f} img/s | ETA {left * args.batch_size / rate / 60:.1f} min", flush=True)


@torch.no_grad()
def evaluate_vae(model, x_uint8, augment_fn, args, amp):
    """-ELBO and per-pixel squared error of sigmoid(decode(mu)) against the clean x, from clean inputs and
    from inputs augmented with --aug (for the baseline too; a fixed seed, so epochs are comparable)."""
    x = data.to_float(x_uint8).contiguous(memory_format=torch.channels_last)   # (N, 3, H, W) in [0, 1]
    fixed = torch.Generator().manual_seed(12345)
    metrics = {}
    for kind, x_in in (("clean", x), ("aug", augment_fn(x, args.strength, fixed))):
        x_logits, mu, logvar = reconstruct(model, x_in, amp)
        metrics[f"val_loss_{kind}"] = vae.elbo(x_logits, x, mu, logvar, args.beta).loss.item()
        metrics[f"mse_{kind}"] = (torch.sigmoid(x_logits) - x).pow(2).mean().item()
    return metrics


@torch.no_grad()
def reconstruct(model, x_in, amp):
    """Deterministic reconstruction in eval mode: decode(mu), no sampling. -> float32 x_logits, mu, logvar"""
    model.eval()
    with autocast(x_in.device, amp):
        mu, logvar = model.encode(x_in.contiguous(memory_format=torch.channels_last))
        x_logits = model.decode(mu)                                              # (N, 3, H, W)
    return x_logits.float(), mu.float(), logvar.float()

# -----------------------------------------------------------------------------
# Stage 2: freeze the encoder and probe it


def train_probe(name, model, splits, num_classes, args, device, amp, run_dir):
    """Extract mu once for every split, then train the paper's head; resumable per epoch."""
    t0 = time.perf_counter()
    features = {k: probe.extract_features(model, x, args.batch_size, amp) for k, (x, _) in splits.items()}
    labels = {k: y for k, (_, y) in splits.items()}
    feature_seconds = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    head = probe.make_head(args.latent_dim, num_classes).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.probe_lr)
    rng = torch.Generator().manual_seed(args.seed + 2)
    st = {"epoch": 0, "history": [], "seconds": 0.0}
    path = run_dir / f"checkpoint-{name}-probe.pt"
    if path.exists():
        st = load_checkpoint(path)
        head.load_state_dict(st["head"]), optimizer.load_state_dict(st["optimizer"]), rng.set_state(st["rng"])
    while st["epoch"] < args.probe_epochs:
        t_epoch = time.perf_counter()
        loss = probe.train_epoch(head, optimizer, features["train"], labels["train"], args.batch_size, rng)
        if not math.isfinite(loss):
            fail(f"stage 2 ({name}) diverged: the loss is {loss} at epoch {st['epoch'] + 1}. "
                 f"The last good checkpoint is kept in {run_dir}; try a lower --probe-lr", 3)
        row = {"run": name, "stage": "probe", "epoch": st["epoch"] + 1}
        for split in ("train", "val"):
            row.update({f"{split}_{k}": v for k, v in probe.evaluate(head, features[split], labels[split]).items()})
        st["history"].append(row)
        st.update(epoch=st["epoch"] + 1, seconds=st["seconds"] + time.perf_counter() - t_epoch)
        save_checkpoint(path, {**st, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": rng.get_state()})
        print(f"stage 2 [{name}] epoch {row['epoch']}/{args.probe_epochs} loss {row['train_loss']:.3f} "
              f"train top-1 {row['train_top1']:.1f}% val top-1 {row['val_top1']:.1f}% "
              f"top-5 {row['val_top5']:.1f}%", flush=True)
        if STOP.is_set():
            raise Interrupted
    test = probe.evaluate(head, features["test"], labels["test"])
    stats = {f"test_{k}": v for k, v in test.items()}
    stats.update({k: v for k, v in st["history"][-1].items() if k.startswith(("train_", "val_"))},
                 probe_seconds=feature_seconds + st["seconds"], feature_seconds=feature_seconds)
    return head, st["history"], stats

# -----------------------------------------------------------------------------
# Report: table, summary.json, metrics.jsonl, pictures


def to_pil(x):
    """float (3, H, W) in [0, 1] -> PIL image."""
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def draw_reconstructions(path, models, x_uint8, aug, args, num_images=8, scale=2):
    """Rows: clean x, x_aug, then each VAE's sigmoid(decode(mu)) from x_aug (the paper's Figures 1-4)."""
    x = data.to_float(x_uint8[:num_images])                                    # (B, 3, H, W)
    x_aug = augment.AUGMENTATIONS[aug](x, args.strength, torch.Generator().manual_seed(0))
    rows = [x, x_aug] + [torch.sigmoid(reconstruct(model, x_aug, None)[0]) for model in models.values()]
    titles = ["clean x", f"x_aug\n({aug})"] + [f"VAE '{name}'\nfrom x_aug" for name in models]
    size, left = args.image_size * scale, 110
    sheet = Image.new("RGB", (left + num_images * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, row) in enumerate(zip(titles, rows)):
        draw.multiline_text((6, r * size + size // 2 - 12), title, "black", ImageFont.load_default())
        for c, img in enumerate(row):
            sheet.paste(to_pil(img).resize((size, size), Image.NEAREST), (left + c * size, r * size))
    sheet.save(path)


def draw_curves(path, histories):
    """Per-epoch probe top-1, top-5 and loss, train (thin) and validation (thick), one colour per VAE."""
    font, colours = ImageFont.load_default(), [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    panel_w, panel_h, margin = 360, 260, 48
    sheet = Image.new("RGB", (3 * panel_w, panel_h + 30), "white")
    draw = ImageDraw.Draw(sheet)
    for p, metric in enumerate(("top1", "top5", "loss")):
        x0, y0, x1, y1 = p * panel_w + margin, 20, (p + 1) * panel_w - 12, panel_h - 30
        values = [r[f"{s}_{metric}"] for h in histories.values() for r in h for s in ("train", "val")]
        lo, hi = min(values), max(values)
        hi = hi if hi > lo else lo + 1
        epochs = max(r["epoch"] for h in histories.values() for r in h)
        to_xy = lambda e, v: (x0 + (x1 - x0) * (e - 1) / max(epochs - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))  # noqa: E731
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, 4), {"top1": "top-1 (%)", "top5": "top-5 (%)", "loss": "cross-entropy"}[metric], "black", font)
        for i in range(5):                                                 # ticks on both axes
            v = lo + (hi - lo) * i / 4
            draw.text((x0 - 44, to_xy(1, v)[1] - 5), f"{v:.3g}", "black", font)
        for e in sorted({round(1 + (epochs - 1) * i / 4) for i in range(5)}):
            draw.text((to_xy(e, lo)[0] - 6, y1 + 4), f"{e}", "black", font)
        draw.text(((x0 + x1) // 2 - 14, y1 + 16), "epoch", "black", font)
        for colour, (name, h) in zip(colours, histories.items()):
            for split, width in (("train", 1), ("val", 3)):
                draw.line([to_xy(r["epoch"], r[f"{split}_{metric}"]) for r in h], fill=colour, width=width)
    for i, name in enumerate(histories):                                      # legend
        draw.text((margin + 170 * i, panel_h + 12), f"{name}: thin train, thick val", colours[i], font)
    sheet.save(path)


def report(args, run_dir, runs, histories, models, splits, device, amp, wall_seconds):
    print(f"\n{'VAE input':<22}{'test top-1':>11}{'test top-5':>11}{'val top-1':>10}"
          f"{'mse clean':>11}{'mse aug':>10}{'img/s':>8}")
    for name, r in runs.items():
        print(f"{name:<22}{r['test_top1']:>10.2f}%{r['test_top5']:>10.2f}%{r['val_top1']:>9.2f}%"
              f"{r['mse_clean']:>11.4f}{r['mse_aug']:>10.4f}{r['vae_images_per_s']:>8.0f}")
    summary = {"args": vars(args), "device": str(device), "precision": "bf16" if amp else "fp32",
               "torch": torch.__version__, "python": platform.python_version(), "machine": platform.platform(),
               "threads": torch.get_num_threads(), "wall_seconds": wall_seconds, "runs": runs}
    write_json(run_dir / "summary.json", summary)
    rows = [row for name in histories for row in histories[name]]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    draw_reconstructions(run_dir / "reconstructions.png", models, splits["test"][0], args.aug, args)
    draw_curves(run_dir / "curves.png", {n: [r for r in h if r["stage"] == "probe"] for n, h in histories.items()})
    print(f"wrote {run_dir}/: summary.json, metrics.jsonl, reconstructions.png, curves.png, vae-*.pt, probe-*.pt")

# -----------------------------------------------------------------------------


def main(argv=None):
    t0 = time.perf_counter()
    args = parse_args(argv)
    tune_allocator()
    device = pick_device(args.device)
    amp = pick_precision(args.precision, device)
    run_dir = prepare_run_dir(args)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)
    try:
        splits, num_classes = load_data(args, device, amp)
        runs, histories, models = {}, {}, {}
        for name in dict.fromkeys(("none", args.aug)):       # the baseline first, then --aug
            model, vae_history, vae_stats = train_vae(name, splits, args, device, amp, run_dir)
            head, probe_history, probe_stats = train_probe(name, model, splits, num_classes, args, device, amp, run_dir)
            test = evaluate_vae(model, splits["test"][0][:VAL_IMAGES], augment.AUGMENTATIONS[args.aug], args, amp)
            runs[name] = {**probe_stats, **vae_stats, "mse_clean": test["mse_clean"], "mse_aug": test["mse_aug"]}
            histories[name], models[name] = vae_history + probe_history, model
            torch.save(model.state_dict(), run_dir / f"vae-{name}.pt")
            torch.save(head.state_dict(), run_dir / f"probe-{name}.pt")
    except data.DataError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2)
    except Interrupted:
        print(f"\nstopped by a signal; the checkpoint is saved. Resume with:\n"
              f"  python main.py --out {run_dir} --resume", file=sys.stderr)
        raise SystemExit(130)   # 128 + SIGINT, the shell's convention
    report(args, run_dir, runs, histories, models, splits, device, amp, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
