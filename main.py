"""
Run the paper's experiment end to end: learn an augmentation with a VAE, then probe what its encoder kept.

    python main.py --dataset shapes                  # the whole experiment offline, under a minute on a CPU
    python main.py --dataset cifar10 --aug crop      # the paper's protocol (100 + 40 epochs, 64x64)
    python main.py --dataset cifar10 --aug every --seeds 0,1,2 --image-size 32 --epochs 10   # the study
    python main.py --dataset cifar10 --recipe ours   # our best setting within ~30 CPU minutes per VAE (RECIPES)

Method (Rajagopalan 2021, "Learned Data Augmentation"), in the order main() runs it, once per seed:
    1. stage 1 (train_vae): for every batch, x_aug = augment(x); minimise -ELBO(decode(z), x) with
       z ~ q(z | x_aug): augmented in, clean out. First the baseline ("none": clean in, clean out), then each --aug,
       all from the same initial weights and batch order;
    2. stage 2 (train_probe): freeze the encoder, train the paper's head on mu, report top-1/top-5;
       controls: the same head on raw pixels and on the untrained encoder (the VAEs' common starting point);
    3. measure (measure_augmentation): how much of the augmentation each VAE undoes, how far it moves mu,
       whether the probe still finds the label, and how many latent dimensions carry information;
    4. report: results.md and results.json (mean +- std over seeds), reconstructions.png, curves.png.
A run folder is resumable: the same command continues where it stopped and skips what is finished.
The last section holds the machinery (errors and signals, device and precision, the optional CUDA graph,
run folder and checkpoints, progress and time); nothing in it changes the method.

Axes: B batch, C channels, H/W height/width, D latent size, K classes.
"""
import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import signal
import statistics
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

# Per data set: the paper's settings for real data, small ones for the offline `shapes` run.
DEFAULTS = {
    "cifar10": dict(epochs=100, probe_epochs=40, image_size=64, batch_size=128),       # epochs, size: paper; batch: ours
    "tinyimagenet": dict(epochs=100, probe_epochs=40, image_size=64, batch_size=128),  # as for CIFAR-10
    "shapes": dict(epochs=3, probe_epochs=40, image_size=32, batch_size=128),          # 36 s on 2 cores
}
# Named flag sets. "paper" is the paper's settings (the defaults); "ours" is the best we measured on CIFAR-10 within
# about 30 CPU minutes per VAE (README, "What moves the result"): the paper's image size, a KL weight of 0.1 (every
# latent dimension in use), ten times the paper's learning rate, 20 epochs. An explicit flag wins over its recipe.
RECIPES = {
    "paper": {},
    "ours": dict(aug="crop", image_size=64, beta=0.1, lr=1e-3, epochs=20),
}
VAL_FRACTION = 0.1        # 45,000 / 5,000 for CIFAR-10; the test set is only read at the very end
SPLIT_SEED = 0            # the validation split never changes with --seeds
MEASURE_IMAGES = 1000     # test images for the reconstruction, invariance and KL measurements
MEASURE_SEED = 12345      # one fixed draw of augmentations for every measurement, so VAEs and epochs compare
INFORMATIVE_NATS = 0.1    # a latent dimension whose mean KL exceeds this carries information about the image
CONTROLS = ("pixels", "random-encoder")

# -----------------------------------------------------------------------------
# Settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())

    def per_dataset(key):
        return "default: " + ", ".join(f"{name} {values[key]}" for name, values in DEFAULTS.items())
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.LOADERS), help="data set (default: %(default)s)")
    p.add_argument("--aug", default="crop", help=f"augmentation(s) to learn, comma-separated, or 'every'; one of "
                   f"{', '.join(augment.AUGMENTATIONS)}; join names with '+' to mix them, as in crop+hue-saturation "
                   f"(default: %(default)s)")
    p.add_argument("--baseline", default=True, action=argparse.BooleanOptionalAction,
                   help="also train the baseline 'none' and probe the two controls; --no-baseline trains only the "
                   "--aug VAEs, for sweeps over a setting whose baseline is known (default: on)")
    p.add_argument("--seeds", "--seed", default="0", help="comma-separated seeds; each repeats everything, "
                   "and seeds weights, batch order and augmentations (default: %(default)s)")
    p.add_argument("--strength", type=float, default=1.0, help="augmentation strength (0 = identity) (default: %(default)s)")
    p.add_argument("--data-dir", default="./data", help="where data sets are found or downloaded (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<aug>-seed<seeds>[-<recipe>])")
    p.add_argument("--epochs", type=int, default=None, help=f"stage-1 VAE epochs ({per_dataset('epochs')})")
    p.add_argument("--probe-epochs", type=int, default=None, help=f"stage-2 epochs ({per_dataset('probe_epochs')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"both stages ({per_dataset('batch_size')})")
    p.add_argument("--image-size", type=int, default=None, help=f"a multiple of 32 ({per_dataset('image_size')})")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the VAE (paper) (default: %(default)s)")
    p.add_argument("--probe-lr", type=float, default=1e-4, help="Adam learning rate of the probe (paper) (default: %(default)s)")
    p.add_argument("--latent-dim", type=int, default=vae.LATENT_DIM, help="latent size D (default: %(default)s)")
    p.add_argument("--beta", type=float, default=1.0, help="KL weight; 1.0 is the true ELBO (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: what measured fastest for this network on this device and image size (default: %(default)s)")
    p.add_argument("--cuda-graph", default="auto", choices=["auto", "on", "off"],
                   help="replay stage 1's step as one CUDA graph; auto means off until measured (default: %(default)s)")
    p.add_argument("--log-every", type=float, default=2.0, help="seconds between progress lines (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with the settings it was started with")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a run")
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="a named set of the flags above (see RECIPES); flags given explicitly win (default: paper)")
    p.set_defaults(**RECIPES[p.parse_known_args(argv)[0].recipe])
    args = p.parse_args(argv)
    if args.resume and args.out and (Path(args.out) / "args.json").exists():
        saved = json.loads((Path(args.out) / "args.json").read_text())
        args = argparse.Namespace(**{**vars(args), **saved, "resume": True, "device": args.device,
                                     "log_every": args.log_every})
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.augs = parse_augmentations(args.aug)
    args.seed_list = parse_seeds(args.seeds)
    recipe = "" if args.recipe == "paper" else f"-{args.recipe}"
    args.out = args.out or f"runs/{args.dataset}-{args.aug.replace(',', '+')}-seed{args.seeds.replace(',', '+')}{recipe}"
    check_args(args)
    return args


def parse_augmentations(text):
    """'crop,rotate' -> ['crop', 'rotate']; 'every' -> every augmentation; 'none' (the baseline) is implied;
    'crop+hue-saturation' is one mix of the two."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["every"]:
        names = list(augment.AUGMENTATIONS)
    unknown = [part for name in names for part in name.split("+") if part not in augment.AUGMENTATIONS]
    if unknown or not names:
        fail(f"--aug {text!r}: use 'every' or names from {', '.join(augment.AUGMENTATIONS)}, comma-separated "
             f"(join names with '+' to mix them)")
    return [name for name in dict.fromkeys(names) if name != "none"]


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]."""
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        fail(f"--seeds {text!r}: use whole numbers, comma-separated, such as 0,1,2")
    return list(dict.fromkeys(seeds))


def vae_names(args):
    """The VAEs each seed trains: the baseline 'none' (unless --no-baseline), then each --aug."""
    return ["none", *args.augs] if args.baseline else list(args.augs)


def control_names(args):
    """The probes without a trained VAE; they come with the baseline."""
    return list(CONTROLS) if args.baseline else []


def check_args(args):
    """Reject flag values the experiment cannot run with, before any work is done."""
    for name in ("epochs", "probe_epochs", "latent_dim"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.batch_size < 2:
        fail(f"--batch-size must be at least 2 (BatchNorm needs two images), got {args.batch_size}")
    if args.image_size < 32 or args.image_size % 32:
        fail(f"--image-size must be a positive multiple of 32 (five stride-2 layers), got {args.image_size}")
    if not vae_names(args):
        fail("--no-baseline leaves nothing to train: name an augmentation with --aug")
    if args.limit is not None and args.limit < 1:
        fail(f"--limit must be at least 1, got {args.limit}")
    if not (args.lr > 0 and args.probe_lr > 0 and args.beta >= 0 and args.strength >= 0):
        fail("--lr and --probe-lr must be positive, --beta and --strength non-negative")

# -----------------------------------------------------------------------------
# Data


def load_data(args, device):
    """Load, split off validation, resize once, move to the device: {split: (uint8 (N, 3, S, S), int64 (N,))}."""
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
          f"{args.image_size}x{args.image_size}, {num_classes} classes", flush=True)
    return splits, num_classes

# -----------------------------------------------------------------------------
# Stage 1: learn the augmentation


def train_step(model, optimizer, x, x_aug, beta, autocast_dtype):
    """One step of stage 1, the paper's idea: encode the augmented x_aug, score the reconstruction against the clean x.
    -> float32 tensor [loss, recon, kl] on the device (reading it would wait for the GPU, so the caller sums it)."""
    with autocast(x.device, autocast_dtype):
        x_logits, mu, logvar = model(x_aug)                      # (B, 3, H, W), (B, D), (B, D)
    parts = vae.elbo(x_logits, x, mu, logvar, beta)
    optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    optimizer.step()
    return torch.stack([parts.loss.detach(), parts.recon.mean().detach(), parts.kl.mean().detach()])  # (3,)


def augmented_batch(x_uint8, augment_fn, strength, generator):
    """uint8 batch -> (x, x_aug), both float (B, 3, H, W) in [0, 1], channels_last for the convolutions."""
    x = data.to_float(x_uint8).contiguous(memory_format=torch.channels_last)
    return x, augment_fn(x, strength, generator)


def train_vae(name, seed, splits, args, device, autocast_dtype, folder, progress):
    """Stage 1: train a VAE on (augment(x) -> x); checkpointed every epoch and on a signal, resumable."""
    torch.manual_seed(seed)           # every VAE of a seed starts from the same weights: a controlled comparison
    model = vae.VAE(args.latent_dim, args.image_size).to(device, memory_format=torch.channels_last)
    use_graph = args.cuda_graph == "on" and device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, capturable=use_graph)
    batch_rng, aug_rng = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    step_fn = cuda_graphed(train_step) if use_graph else train_step
    augment_fn, (x_train, y_train) = augment.by_name(name), splits["train"]
    steps = len(x_train) // args.batch_size
    path = folder / "checkpoint-vae.pt"
    st = {"epoch": 0, "step": 0, "history": [], "seconds": 0.0, "sums": torch.zeros(3, device=device)}
    if path.exists():
        st = restore_vae(path, model, optimizer, batch_rng, aug_rng, device)
    title = f"stage 1 [seed {seed}, {name}]"
    while st["epoch"] < args.epochs:
        if st["step"] == 0:
            st["epoch_rng"] = batch_rng.get_state()    # this epoch's batch order, kept for a mid-epoch resume
        else:
            batch_rng.set_state(st["epoch_rng"])       # resuming mid-epoch: draw the same order again
        model.train()
        t_start, checked = time.perf_counter(), st["step"]
        for step, (x_uint8, _) in enumerate(data.shuffled_batches(x_train, y_train, args.batch_size, batch_rng)):
            if step < st["step"]:
                continue                               # resuming mid-epoch: skip the steps already taken
            x, x_aug = augmented_batch(x_uint8, augment_fn, args.strength, aug_rng)
            st["sums"] += step_fn(model, optimizer, x, x_aug, args.beta, autocast_dtype)
            st["step"] += 1
            progress.vae_step_done()
            if progress.due() or STOP.is_set():        # reading the sums waits for the device: only now and then
                loss, recon, kl = (st["sums"] / st["step"]).tolist()
                check_finite(loss, f"{title} epoch {st['epoch'] + 1}, steps {checked + 1}-{st['step']}", folder)
                checked = st["step"]
                progress.print(f"{title} epoch {st['epoch'] + 1}/{args.epochs} step {st['step']}/{steps} "
                               f"loss {loss:.1f} = -recon {-recon:.1f} + kl {kl:.1f}")
            if STOP.is_set():
                st["seconds"] += time.perf_counter() - t_start
                save_vae(path, st, model, optimizer, batch_rng, aug_rng)
                raise Interrupted
        loss, recon, kl = (st["sums"] / steps).tolist()
        check_finite(loss, f"{title} epoch {st['epoch'] + 1}, steps {checked + 1}-{steps}", folder)
        st["seconds"] += time.perf_counter() - t_start
        row = {"train_loss": loss, "train_recon": recon, "train_kl": kl}
        row.update(evaluate_vae(model, splits["val"][0][:MEASURE_IMAGES], augment_fn, args.strength, args.beta,
                                autocast_dtype))
        st["history"].append({"run": name, "seed": seed, "stage": "vae", "epoch": st["epoch"] + 1, **row})
        st.update(epoch=st["epoch"] + 1, step=0, sums=torch.zeros(3, device=device))
        save_vae(path, st, model, optimizer, batch_rng, aug_rng)
        progress.print(f"{title} epoch {st['epoch']}/{args.epochs} done: train loss {loss:.1f}, val loss "
                       f"{row['val_loss_clean']:.1f} from clean, {row['val_loss_aug']:.1f} from augmented input; "
                       f"peak memory {peak_memory_mb():.0f} MB", force=True)
    images_per_s = args.epochs * steps * args.batch_size / max(st["seconds"], 1e-9)
    return model, st["history"], {"vae_seconds": st["seconds"], "vae_images_per_s": images_per_s}


@torch.no_grad()
def evaluate_vae(model, x_uint8, augment_fn, strength, beta, autocast_dtype):
    """-ELBO and per-pixel squared error of sigmoid(decode(mu)) against the clean x, from clean inputs and from
    inputs augmented with the VAE's own augmentation (a fixed draw, so epochs compare)."""
    x = data.to_float(x_uint8)                                              # (N, 3, H, W) in [0, 1]
    x_aug = augment_fn(x, strength, torch.Generator().manual_seed(MEASURE_SEED))
    metrics = {}
    for kind, x_in in (("clean", x), ("aug", x_aug)):
        x_logits, mu, logvar = reconstruct(model, x_in, autocast_dtype)
        metrics[f"val_loss_{kind}"] = vae.elbo(x_logits, x, mu, logvar, beta).loss.item()
        metrics[f"mse_{kind}"] = (torch.sigmoid(x_logits) - x).pow(2).mean().item()
    return metrics


@torch.no_grad()
def reconstruct(model, x_in, autocast_dtype):
    """Deterministic reconstruction in eval mode: decode(mu), no sampling. -> float32 x_logits, mu, logvar"""
    model.eval()
    with autocast(x_in.device, autocast_dtype):
        mu, logvar = model.encode(x_in.contiguous(memory_format=torch.channels_last))
        x_logits = model.decode(mu)                                              # (N, 3, H, W)
    return x_logits.float(), mu.float(), logvar.float()

# -----------------------------------------------------------------------------
# Stage 2: freeze the encoder and probe it


def encode_splits(model, splits, batch_size, autocast_dtype):
    """mu of every image of every split, from the frozen encoder: {split: float32 (N, D)}."""
    with autocast(splits["train"][0].device, autocast_dtype):
        return {split: probe.extract_features(model, x, batch_size) for split, (x, _) in splits.items()}


def pixel_features(splits):
    """The raw-pixel control: every image flattened, {split: float32 (N, 3 * H * W)} in [0, 1]."""
    return {split: data.to_float(x).flatten(1) for split, (x, _) in splits.items()}


def train_probe(title, features, splits, num_classes, seed, args, path, progress):
    """Stage 2: train the paper's head on frozen features {split: (N, D)}; resumable per epoch.
    -> head, per-epoch history, final train/val and test metrics."""
    labels = {split: y for split, (_, y) in splits.items()}
    torch.manual_seed(seed)
    head = probe.make_head(features["train"].shape[1], num_classes).to(features["train"].device)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.probe_lr)
    rng = torch.Generator().manual_seed(seed + 2)
    st = {"epoch": 0, "history": [], "seconds": 0.0}
    if path.exists():
        st = load_checkpoint(path)
        head.load_state_dict(st["head"])
        optimizer.load_state_dict(st["optimizer"])
        rng.set_state(st["rng"])
    while st["epoch"] < args.probe_epochs:
        t_start = time.perf_counter()
        loss = probe.train_epoch(head, optimizer, features["train"], labels["train"], args.batch_size, rng)
        check_finite(loss, f"{title} epoch {st['epoch'] + 1}", path.parent, hint="a lower --probe-lr")
        row = {"run": title, "seed": seed, "stage": "probe", "epoch": st["epoch"] + 1}
        for split in ("train", "val"):
            row.update({f"{split}_{k}": v for k, v in probe.evaluate(head, features[split], labels[split]).items()})
        st["history"].append(row)
        st.update(epoch=st["epoch"] + 1, seconds=st["seconds"] + time.perf_counter() - t_start)
        save_checkpoint(path, {**st, "head": head.state_dict(), "optimizer": optimizer.state_dict(),
                               "rng": rng.get_state()})
        progress.probe_epoch_done(time.perf_counter() - t_start)
        progress.print(f"{title} epoch {row['epoch']}/{args.probe_epochs} loss {row['train_loss']:.3f} "
                       f"train top-1 {row['train_top1']:.1f}% val top-1 {row['val_top1']:.1f}% "
                       f"top-5 {row['val_top5']:.1f}%", force=st["epoch"] == args.probe_epochs)
        if STOP.is_set():
            raise Interrupted
    stats = {f"test_{k}": v for k, v in probe.evaluate(head, features["test"], labels["test"]).items()}
    stats.update({k: v for k, v in st["history"][-1].items() if k.startswith(("train_", "val_"))},
                 probe_seconds=st["seconds"])
    return head, st["history"], stats

# -----------------------------------------------------------------------------
# Measure: what each VAE undid, what its encoder kept


def undone_share(x, x_aug, recon_from_aug, recon_from_clean):
    """Share of the augmentation's error that a reconstruction removes: 1 - (e(recon_from_aug) - e(recon_from_clean))
    / e(x_aug), e(.) the mean squared error against the clean x. 0: it reproduces x_aug; 1: as good as from x."""
    def error(y):
        return (y - x).pow(2).mean()
    return (1 - (error(recon_from_aug) - error(recon_from_clean)) / error(x_aug)).item()


@torch.no_grad()
def measure_augmentation(aug, vaes, heads, x_uint8, y, strength, autocast_dtype):
    """On test images, for the baseline and the `aug` VAE: reconstruction error from x and from x_aug, the share of
    the augmentation undone, how far mu moves (probe.latent_shift), and the probe's accuracy on x_aug."""
    x = data.to_float(x_uint8)                                               # (N, 3, H, W) in [0, 1]
    x_aug = augment.by_name(aug)(x, strength, torch.Generator().manual_seed(MEASURE_SEED))
    row = {"mse_augmented_input": (x_aug - x).pow(2).mean().item()}
    for role, name in (("baseline", "none"), ("augmented", aug)):
        from_clean, mu, _ = reconstruct(vaes[name], x, autocast_dtype)
        from_aug, mu_aug, _ = reconstruct(vaes[name], x_aug, autocast_dtype)
        from_clean, from_aug = torch.sigmoid(from_clean), torch.sigmoid(from_aug)   # x_hat in [0, 1]
        row[f"{role}_mse_from_clean"] = (from_clean - x).pow(2).mean().item()
        row[f"{role}_mse_from_aug"] = (from_aug - x).pow(2).mean().item()
        row[f"{role}_undone"] = undone_share(x, x_aug, from_aug, from_clean)
        row[f"{role}_latent_shift"] = probe.latent_shift(mu, mu_aug)
        row[f"{role}_top1_on_clean"] = probe.evaluate(heads[name], mu, y)["top1"]
        row[f"{role}_top1_on_aug"] = probe.evaluate(heads[name], mu_aug, y)["top1"]
    row["undone_beyond_baseline"] = row["augmented_undone"] - row["baseline_undone"]
    return row


@torch.no_grad()
def measure_kl(model, x_uint8, autocast_dtype):
    """Mean KL per image on clean test images, and how many latent dimensions carry more than 0.1 nat."""
    _, mu, logvar = reconstruct(model, data.to_float(x_uint8), autocast_dtype)
    kl = vae.kl_per_dimension(mu, logvar).mean(0)                            # (D,) nats, averaged over images
    return {"kl": kl.sum().item(), "informative_dims": int((kl > INFORMATIVE_NATS).sum())}

# -----------------------------------------------------------------------------
# One seed: every VAE, its probes and measurements, then the controls


def run_seed(seed, args, splits, num_classes, device, autocast_dtype, run_dir, progress):
    """Both stages for the baseline and each --aug, the two controls, and the measurements. -> records, histories"""
    records, histories, vaes, heads = [], {}, {}, {}
    x_test, y_test = (t[:MEASURE_IMAGES] for t in splits["test"])
    for name in vae_names(args):
        folder = run_dir / f"seed{seed}" / name
        model, vae_history, record = train_vae(name, seed, splits, args, device, autocast_dtype, folder, progress)
        features = encode_splits(model, splits, args.batch_size, autocast_dtype)
        head, probe_history, stats = train_probe(f"stage 2 [seed {seed}, {name}]", features, splits, num_classes,
                                                 seed, args, folder / "checkpoint-probe.pt", progress)
        *_, standardized = train_probe(f"stage 2 [seed {seed}, {name}, standardized]", probe.standardize(features),
                                       splits, num_classes, seed, args, folder / "checkpoint-probe-std.pt", progress)
        record.update(stats, std_test_top1=standardized["test_top1"], std_test_top5=standardized["test_top5"])
        record.update(measure_kl(model, x_test, autocast_dtype))
        vaes[name], heads[name], histories[name] = model, head, vae_history + probe_history
        if name != "none" and "none" in vaes:
            record.update(measure_augmentation(name, vaes, heads, x_test, y_test, args.strength, autocast_dtype))
        torch.save(model.state_dict(), folder / "vae.pt")
        torch.save(head.state_dict(), folder / "probe.pt")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in histories[name]))
        records.append({"seed": seed, "name": name, **record})
    torch.manual_seed(seed)                                   # the VAEs' common initial weights, never trained
    untrained = vae.VAE(args.latent_dim, args.image_size).to(device, memory_format=torch.channels_last)
    for name in control_names(args):
        features = pixel_features(splits) if name == "pixels" else encode_splits(untrained, splits, args.batch_size,
                                                                                  autocast_dtype)
        path = run_dir / f"seed{seed}" / name / "checkpoint-probe-std.pt"
        *_, stats = train_probe(f"stage 2 [seed {seed}, {name}, standardized]", probe.standardize(features), splits,
                                num_classes, seed, args, path, progress)
        records.append({"seed": seed, "name": name, "std_test_top1": stats["test_top1"],
                        "std_test_top5": stats["test_top5"]})
    return records, histories, vaes

# -----------------------------------------------------------------------------
# Report: results.md, results.json, pictures


def mean_std(values):
    """'41.5 +- 0.31' over seeds, three significant digits (the value alone for one seed; '' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    spread = f" +- {statistics.stdev(values):.2g}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3g}{spread}"


def markdown_table(records, names, columns):
    """One row per name, one cell per (title, key): mean +- std over the records (seeds) of that name."""
    lines = ["| run | n | " + " | ".join(title for title, _ in columns) + " |",
             "|---|---:|" + "---:|" * len(columns)]
    for name in names:
        rows = [r for r in records if r["name"] == name]
        cells = [mean_std([r.get(key) for r in rows]) for _, key in columns]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(run_dir, args, records, precision, wall_seconds):
    """results.json (every record, with args, machine and wall time) and results.md (mean +- std over seeds)."""
    summary = {"args": vars(args), "precision": precision, "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.platform(), "threads": torch.get_num_threads(),
               "wall_seconds_last_invocation": wall_seconds, "records": records}
    write_json(run_dir / "results.json", summary)
    sections = [
        f"# {args.dataset}, {args.image_size}x{args.image_size}, {args.epochs} VAE epochs (lr {args.lr:g}, beta "
        f"{args.beta:g}, strength {args.strength:g}), {args.probe_epochs} probe epochs, seeds {args.seeds} "
        f"(mean +- std over n seeds)",
        "## Probe on the frozen encoder (test %)\n\n`mu` is the paper's protocol; `standardized` divides every "
        "feature by its train-split std (the controls need it).\n\n" + markdown_table(records, [
            *vae_names(args), *control_names(args)], [
            ("top-1 (mu)", "test_top1"), ("top-5 (mu)", "test_top5"), ("top-1 (standardized)", "std_test_top1"),
            ("top-5 (standardized)", "std_test_top5"), ("KL nats/image", "kl"), ("dims > 0.1 nat", "informative_dims")]),
        "## How much of each augmentation is undone (per-pixel MSE against the clean test image)\n\n"
        + markdown_table(records, args.augs, [
            ("x_aug", "mse_augmented_input"), ("baseline from x_aug", "baseline_mse_from_aug"),
            ("augmented VAE from x_aug", "augmented_mse_from_aug"), ("baseline from x", "baseline_mse_from_clean"),
            ("augmented VAE from x", "augmented_mse_from_clean"), ("undone, baseline", "baseline_undone"),
            ("undone, augmented VAE", "augmented_undone"), ("undone beyond the baseline", "undone_beyond_baseline")]),
        f"## Which transformations keep the label\n\nTop-1 of each VAE's probe (trained on clean images) on the "
        f"first {MEASURE_IMAGES} test images, clean (x) and augmented (x_aug); mu shift: 0 = mu unchanged by the "
        f"augmentation, 1 = as far as another image's.\n\n" + markdown_table(records, args.augs, [
            ("baseline on x", "baseline_top1_on_clean"), ("baseline on x_aug", "baseline_top1_on_aug"),
            ("augmented VAE on x", "augmented_top1_on_clean"), ("augmented VAE on x_aug", "augmented_top1_on_aug"),
            ("mu shift, baseline", "baseline_latent_shift"), ("mu shift, augmented VAE", "augmented_latent_shift")]),
    ]
    if not args.baseline:
        del sections[2:]                                  # both tables compare with the baseline
    (run_dir / "results.md").write_text("\n\n".join(sections) + "\n")
    print("\n" + sections[1].split("\n\n")[-1] + f"\n(n: seeds per row; every table in {run_dir / 'results.md'})")


def to_pil(x):
    """float (3, H, W) in [0, 1] -> PIL image."""
    return Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


@torch.no_grad()
def draw_reconstructions(path, vaes, x_uint8, strength, image_size, num_images=8, scale=2):
    """The clean x, then per augmentation three rows: x_aug, the baseline's (if trained) and the augmented VAE's
    sigmoid(decode(mu)) from x_aug (the paper's Figures 1-4, every augmentation on one sheet)."""
    def x_hat(name, x_in):
        return torch.sigmoid(reconstruct(vaes[name], x_in, None)[0])        # (B, 3, H, W) in [0, 1]
    x = data.to_float(x_uint8[:num_images])                                    # (B, 3, H, W)
    rows, titles = [x], ["clean x"]
    if "none" in vaes:
        rows, titles = rows + [x_hat("none", x)], titles + ["VAE 'none'\nfrom x"]
    for aug in [name for name in vaes if name != "none"]:
        x_aug = augment.by_name(aug)(x, strength, torch.Generator().manual_seed(0))
        shown = [name for name in ("none", aug) if name in vaes]              # the baseline (if trained), then aug
        rows += [x_aug] + [x_hat(name, x_aug) for name in shown]
        titles += [f"x_aug\n({aug})"] + [f"VAE '{name}'\nfrom x_aug" for name in shown]
    size, left = image_size * scale, 110
    sheet = Image.new("RGB", (left + num_images * size, len(rows) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, row) in enumerate(zip(titles, rows)):
        draw.multiline_text((6, r * size + size // 2 - 12), title, "black", ImageFont.load_default())
        for c, img in enumerate(row):
            sheet.paste(to_pil(img).resize((size, size), Image.NEAREST), (left + c * size, r * size))
    sheet.save(path)


def draw_curves(path, histories):
    """Per-epoch probe top-1, top-5 and loss, train (thin) and validation (thick), one colour per VAE."""
    font = ImageFont.load_default()
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
               (227, 119, 194), (127, 127, 127)]
    panel_w, panel_h, margin = 360, 260, 48
    legend_rows = (len(histories) + 2) // 3
    sheet = Image.new("RGB", (3 * panel_w, panel_h + 14 + 14 * legend_rows), "white")
    draw = ImageDraw.Draw(sheet)
    epochs = max(r["epoch"] for h in histories.values() for r in h)
    for p, metric in enumerate(("top1", "top5", "loss")):
        x0, y0, x1, y1 = p * panel_w + margin, 20, (p + 1) * panel_w - 12, panel_h - 30
        values = [r[f"{s}_{metric}"] for h in histories.values() for r in h for s in ("train", "val")]
        low, high = min(values), max(values)
        high = high if high > low else low + 1

        def to_xy(epoch, value):
            return (x0 + (x1 - x0) * (epoch - 1) / max(epochs - 1, 1), y1 - (y1 - y0) * (value - low) / (high - low))
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, 4), {"top1": "top-1 (%)", "top5": "top-5 (%)", "loss": "cross-entropy"}[metric], "black", font)
        for i in range(5):                                                 # ticks on both axes
            value = low + (high - low) * i / 4
            draw.text((x0 - 44, to_xy(1, value)[1] - 5), f"{value:.3g}", "black", font)
        for epoch in sorted({round(1 + (epochs - 1) * i / 4) for i in range(5)}):
            draw.text((to_xy(epoch, low)[0] - 6, y1 + 4), f"{epoch}", "black", font)
        draw.text(((x0 + x1) // 2 - 14, y1 + 16), "epoch", "black", font)
        for colour, h in zip(colours, histories.values()):
            for split, width in (("train", 1), ("val", 3)):
                draw.line([to_xy(r["epoch"], r[f"{split}_{metric}"]) for r in h], fill=colour, width=width)
    for i, name in enumerate(histories):                                      # legend, three names a row
        draw.text((margin + 360 * (i % 3), panel_h + 12 + 14 * (i // 3)), f"{name}: thin train, thick val",
                  colours[i % len(colours)], font)
    sheet.save(path)

# -----------------------------------------------------------------------------
# The experiment, start to end


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = pick_device(args.device)
    run_dir = prepare_run_dir(args)                  # a run that continues keeps the precision it started with
    args.precision, reason = pick_precision(args.precision, device, args.image_size)
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else None
    tune_allocator()
    install_signal_handlers()
    print(f"{device}, {args.precision}: {reason}", flush=True)
    with exits_cleanly(run_dir):
        splits, num_classes = load_data(args, device)
        write_json(run_dir / "args.json", vars(args))
        progress = Progress(args, splits, num_classes, run_dir, device)
        records, first_seed = [], None
        for seed in args.seed_list:
            seed_records, histories, vaes = run_seed(seed, args, splits, num_classes, device, autocast_dtype,
                                                     run_dir, progress)
            records += seed_records
            first_seed = first_seed or (histories, vaes)
    histories, vaes = first_seed
    write_results(run_dir, args, records, args.precision, time.perf_counter() - t_start)
    draw_reconstructions(run_dir / "reconstructions.png", vaes, splits["test"][0], args.strength, args.image_size)
    draw_curves(run_dir / "curves.png", {name: [r for r in h if r["stage"] == "probe"] for name, h in histories.items()})
    print(f"wrote {run_dir}/: results.md, results.json, reconstructions.png, curves.png, "
          f"seed*/<run>/ (vae.pt, probe.pt, checkpoints)")

# -----------------------------------------------------------------------------
# Machinery: errors and signals, device and precision, CUDA graph, run folder and checkpoints, progress and time


STOP = threading.Event()  # set by SIGINT/SIGTERM; the training loops check it after every step


class Interrupted(Exception):
    """Raised after a checkpoint has been saved in answer to SIGINT/SIGTERM."""


def fail(message, status=2):
    """Stop with one clear line on stderr and no traceback: status 2 for usage and input errors."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def check_finite(loss, where, folder, hint="a lower --lr or --precision fp32"):
    """Stop with status 3 when the loss is NaN or infinite; the last checkpoint (the previous epoch) is kept."""
    if not math.isfinite(loss):
        fail(f"{where}: diverged, the loss is {loss}. The last good checkpoint is kept in {folder}; try {hint}", 3)


@contextlib.contextmanager
def exits_cleanly(run_dir):
    """Turn a data problem into its message and status 2, and a signal into the resume command and status 130."""
    try:
        yield
    except data.DataError as error:
        print(error, file=sys.stderr)
        raise SystemExit(2)
    except Interrupted:
        print(f"\nstopped by a signal; the checkpoint is saved. Resume with:\n"
              f"  python main.py --out {run_dir} --resume", file=sys.stderr)
        raise SystemExit(130)   # 128 + SIGINT, the shell's convention


def install_signal_handlers():
    """SIGINT/SIGTERM: let the current step finish and checkpoint; a second signal stops at once."""
    def request_stop(signum, frame):
        STOP.set()
        signal.signal(signum, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)


def tune_allocator():
    """Stop glibc from returning big activation buffers to the OS after every step (Linux only).

    By default malloc serves blocks above 128 KiB with mmap and frees them with munmap, so every step
    page-faults its activations in again; raising the mmap and trim thresholds keeps them in the heap
    (at 64x64, batch 128, on a 2-core CPU: 26,844 page faults per step before, 0 to ~1,100 after)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                           # musl or another libc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3        # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)           # the largest glibc accepts on 64-bit systems
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


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


def pick_precision(choice, device, image_size):
    """'fp32' or 'bf16' (autocast), and why. 'auto' follows rules measured with tests/bench.py (README, Speed),
    never a timed trial, so one command always picks the same."""
    if choice != "auto":
        return choice, "set by --precision, or kept from the run's start"
    if device.type == "cuda":
        return "fp32", "at batch 128 this network is launch-bound on a GPU, and bf16 autocast only adds cast kernels"
    if not cpu_has_native_bf16():
        return "fp32", "this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 would be emulated, ~10x slower"
    if image_size < 64:
        return "fp32", "below 64x64 bf16 is no faster than fp32 on such a CPU, so the exact one"
    return "bf16", "this CPU runs bf16 natively, faster than fp32 at 64x64 and up"


def cpu_has_native_bf16():
    """True where oneDNN runs bf16 in hardware (AVX512-BF16 or AMX); elsewhere it emulates it."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device, autocast_dtype):
    """bf16 autocast when autocast_dtype is set, a no-op context for plain fp32. No weight-cast cache, so a
    CUDA graph may capture it."""
    return torch.autocast(device.type, autocast_dtype or torch.float32, enabled=autocast_dtype is not None,
                          cache_enabled=False)


class cuda_graphed:
    """Wrap a training step (any function of tensors that returns a tensor) so that it is recorded once as a CUDA
    graph and then replayed: one launch for the whole forward, loss, backward and optimizer step instead of
    hundreds. The first WARMUP calls run eagerly on a side stream (the capture needs warmed-up kernels and
    optimizer state); the next one copies its tensor arguments into fixed buffers, captures, and from then on every
    call copies its new inputs into those buffers and replays. Every call is one real step: the result is the
    same training as the eager step. Needs Adam(capturable=True). PyTorch's notes, "CUDA Graphs":
    https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs"""
    WARMUP = 3

    def __init__(self, step):
        self.step, self.calls, self.graph = step, 0, None
        self.side_stream = torch.cuda.Stream()

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.WARMUP:
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                out = self.step(*args)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return out
        if self.graph is None:
            self.args = [a.clone() if torch.is_tensor(a) else a for a in args]   # the buffers the graph reads
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.step(*self.args)
        else:
            for buffer, a in zip(self.args, args):
                if torch.is_tensor(a):
                    buffer.copy_(a)
        self.graph.replay()
        return self.out.clone()


def prepare_run_dir(args):
    """Create the run folder. It holds a run once a checkpoint exists: then the same settings continue it (finished
    parts are skipped), other settings are refused; before that, a failed start leaves nothing in the way."""
    run_dir = Path(args.out)
    holds_run = run_dir.is_dir() and any(run_dir.rglob("checkpoint-*.pt"))
    if args.resume and not holds_run:
        fail(f"--resume: {run_dir} holds no run to continue")
    if holds_run and not args.overwrite:
        saved = json.loads((run_dir / "args.json").read_text()) if (run_dir / "args.json").exists() else vars(args)
        same = ("dataset", "strength", "epochs", "probe_epochs", "batch_size", "image_size", "lr", "probe_lr",
                "latent_dim", "beta", "limit", "precision")
        if args.precision == "auto" or args.resume:
            args.precision = saved["precision"]         # a run keeps the precision it started with
        differ = [f"--{key.replace('_', '-')} {saved.get(key)} (asked: {getattr(args, key)})"
                  for key in same if saved.get(key) != getattr(args, key)]
        if differ:
            fail(f"{run_dir} holds a run with other settings: {', '.join(differ)}; "
                 f"use another --out, or --overwrite to start over")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for old in run_dir.rglob("checkpoint-*.pt"):
                old.unlink()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """The saved state, or a clear error for a truncated or unreadable file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # torch raises several types for a damaged file
        fail(f"checkpoint {path} is truncated or unreadable ({type(e).__name__}); "
             f"delete it to redo that stage, or start over with --overwrite")


def save_vae(path, st, model, optimizer, batch_rng, aug_rng):
    """Everything stage 1 needs to continue exactly: weights, Adam's moments, the three random streams."""
    save_checkpoint(path, {**st, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                           "batch_rng": batch_rng.get_state(), "aug_rng": aug_rng.get_state(),
                           "torch_rng": torch.get_rng_state(),
                           "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []})


def restore_vae(path, model, optimizer, batch_rng, aug_rng, device):
    """Load what save_vae wrote into the live objects; return the loop's state (epoch, step, sums, history)."""
    st = load_checkpoint(path)
    model.load_state_dict(st.pop("model"))
    optimizer.load_state_dict(st.pop("optimizer"))
    batch_rng.set_state(st.pop("batch_rng"))
    aug_rng.set_state(st.pop("aug_rng"))
    torch.set_rng_state(st.pop("torch_rng"))      # the global stream draws eps in reparameterize
    cuda_rng = st.pop("cuda_rng")
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    st["sums"] = st["sums"].to(device)
    return st


def peak_memory_mb():
    """Peak resident memory of this process so far (Unix; NaN elsewhere), to show that it does not grow."""
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class Progress:
    """Progress lines every --log-every seconds with the ETA of the whole command, and once, after the first
    few stage-1 steps, the predicted wall time of everything still to do (all VAEs, all probes)."""
    WARMUP, FORECAST_AFTER = 3, 10     # steps skipped (slower: allocation, autotuning), then steps timed

    def __init__(self, args, splits, num_classes, run_dir, device):
        self.args, self.num_classes, self.device = args, num_classes, device
        self.steps_per_epoch = len(splits["train"][0]) // args.batch_size
        self.vae_steps_left, self.probe_epochs_left = 0, 0
        for seed in args.seed_list:
            for name in [*vae_names(args), *control_names(args)]:
                folder = run_dir / f"seed{seed}" / name
                if name not in CONTROLS:
                    self.vae_steps_left += self.steps_per_epoch * (args.epochs - saved_epoch(folder / "checkpoint-vae.pt"))
                    self.probe_epochs_left += args.probe_epochs - saved_epoch(folder / "checkpoint-probe.pt")
                self.probe_epochs_left += args.probe_epochs - saved_epoch(folder / "checkpoint-probe-std.pt")
        self.steps_seen, self.last_step, self.last_line = 0, time.perf_counter(), time.perf_counter()
        self.vae_step_seconds, self.probe_epoch_seconds = None, None

    def vae_step_done(self):
        """Count a stage-1 step and keep a running mean of the seconds per step."""
        now = time.perf_counter()
        seconds, self.last_step = now - self.last_step, now
        self.vae_steps_left -= 1
        self.steps_seen += 1
        if self.steps_seen == self.WARMUP:
            sync(self.device)
            self.window_start = time.perf_counter()
        elif self.steps_seen == self.WARMUP + self.FORECAST_AFTER:
            sync(self.device)
            self.vae_step_seconds = (time.perf_counter() - self.window_start) / self.FORECAST_AFTER
            self.forecast()
            self.last_step = time.perf_counter()
        elif self.vae_step_seconds and seconds < 5 * self.vae_step_seconds:   # not a step after an evaluation
            self.vae_step_seconds += 0.02 * (seconds - self.vae_step_seconds)

    def probe_epoch_done(self, seconds):
        self.probe_epochs_left -= 1
        if self.probe_epoch_seconds is not None:
            self.probe_epoch_seconds += 0.2 * (seconds - self.probe_epoch_seconds)

    def eta_seconds(self):
        if self.vae_step_seconds is None:
            return None
        return self.vae_steps_left * self.vae_step_seconds + self.probe_epochs_left * self.probe_epoch_seconds

    def forecast(self):
        """Print the predicted wall time of the rest of the command; over an hour, what the quick protocol costs."""
        self.probe_epoch_seconds = self.steps_per_epoch * seconds_per_head_step(self.args, self.num_classes, self.device)
        eta = self.eta_seconds()
        print(f"forecast: the whole command needs about {format_seconds(eta)} more on this machine "
              f"({self.vae_step_seconds * 1000:.0f} ms per stage-1 step)", flush=True)
        if eta > 3600 and (self.args.image_size > 32 or self.args.epochs > 10):
            vae_runs = len(self.args.seed_list) * len(vae_names(self.args))
            quick = (vae_runs * 10 * self.steps_per_epoch * seconds_per_vae_step(32, self.args, self.device)
                     + self.probe_epochs_left * self.probe_epoch_seconds)
            print(f"forecast: the quick protocol, --image-size 32 --epochs 10, makes the same comparison in about "
                  f"{format_seconds(quick)} here (the defaults are the paper's protocol)", flush=True)

    def due(self):
        return time.perf_counter() - self.last_line >= self.args.log_every

    def print(self, text, force=False):
        if not (force or self.due() or STOP.is_set()):
            return
        self.last_line = time.perf_counter()
        eta = self.eta_seconds()
        print(text + (f" | ETA {format_seconds(eta)}" if eta is not None else ""), flush=True)


def saved_epoch(path):
    """The number of epochs a checkpoint has finished (0 when there is none)."""
    return load_checkpoint(path)["epoch"] if path.exists() else 0


def format_seconds(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_head_step(args, num_classes, device, steps=20):
    """Time a few steps of a throwaway probe head (its own random stream: the run's draws do not change)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        head = probe.make_head(args.latent_dim, num_classes).to(device)
        optimizer = torch.optim.Adam(head.parameters(), lr=args.probe_lr)
        features = torch.randn(steps * args.batch_size, args.latent_dim, device=device)
        y = torch.randint(0, num_classes, (len(features),), device=device)
        probe.train_epoch(head, optimizer, features[:2 * args.batch_size], y[:2 * args.batch_size], args.batch_size,
                          torch.Generator())                                 # warm-up
        t_start = time.perf_counter()
        probe.train_epoch(head, optimizer, features, y, args.batch_size, torch.Generator())
        return (time.perf_counter() - t_start) / steps


def seconds_per_vae_step(image_size, args, device, steps=3):
    """Time a few stage-1 steps of a throwaway VAE at another image size (own random stream, as above)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = vae.VAE(args.latent_dim, image_size).to(device, memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        x = torch.rand(args.batch_size, 3, image_size, image_size, device=device)
        dtype = torch.bfloat16 if pick_precision("auto", device, image_size)[0] == "bf16" else None
        train_step(model, optimizer, x, x, args.beta, dtype)                  # warm-up
        sync(device)
        t_start = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, x, x, args.beta, dtype)
        sync(device)
        return (time.perf_counter() - t_start) / steps


if __name__ == "__main__":
    main()
