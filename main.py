"""
Run the paper's experiment end to end: learn an augmentation with a VAE, then probe what its encoder kept.

    python main.py --dataset shapes                  # the whole experiment offline, about 1.5 minutes on 2 CPU cores
    python main.py --dataset cifar10 --aug crop      # the paper's protocol (100 + 40 epochs, 64x64)
    python main.py --dataset cifar10 --recipe ours   # our best setting within ~30 CPU minutes per VAE (RECIPES)
    python main.py --dataset cifar10 --aug crop,rotate --seeds 0,1,2 --image-size 32 --epochs 10   # a sweep

Method (Rajagopalan 2021, "Learned Data Augmentation"), once per seed, in the order of this file:
    1. stage 1 (train_vae): for every batch, x_aug = augment(x); minimise -ELBO(decode(z), x) with z ~ q(z | x_aug):
       augmented in, clean out. First the baseline "none" (clean in, clean out), then each --aug, all from the same
       initial weights and batch order;
    2. stage 2 (train_probe): freeze the encoder, train the paper's head on mu, report top-1/top-5;
    3. controls: that head on raw pixels and on the untrained encoder (the VAEs' common start), and a ceiling
       (train_supervised): that encoder and head trained end to end on the labels;
    4. measure (measure_augmentation): how much of the augmentation each VAE undoes, how far it moves mu, and
       whether the probe still finds the label;
    5. report: results.md and results.json (mean +- std over seeds), reconstructions.png, curves.png.
The machinery comes last (run folder and checkpoints, progress, device and precision, CUDA graph, errors and
signals); nothing in it changes the method. A run folder is resumable: the same command continues it.

Axes: B batch, C channels, H/W height/width, D latent size, K classes.
"""
import argparse
import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

import augment
import data
import probe
import vae

# Per data set: the paper's settings for real data (the batch size is ours); ours for the offline `shapes` run.
PAPER = dict(epochs=100, probe_epochs=40, image_size=64, batch_size=128, lr=1e-4, beta=1.0)
DEFAULTS = {"cifar10": PAPER, "tinyimagenet": PAPER,
            "shapes": dict(epochs=6, probe_epochs=40, image_size=32, batch_size=128, lr=1e-3, beta=0.1)}
# Named flag sets: "paper" is the defaults; "ours" the best we measured on CIFAR-10 within about 30 CPU minutes per
# VAE (README, "What moves the result"): 64x64, a KL weight of 0.1, ten times the paper's learning rate, 20 epochs.
RECIPES = {"paper": {}, "ours": dict(aug="crop", image_size=64, beta=0.1, lr=1e-3, epochs=20)}
VAL_FRACTION = 0.1        # 45,000 / 5,000 for CIFAR-10; the test set is only read at the very end
SPLIT_SEED = 0            # the validation split never changes with --seeds
MEASURE_IMAGES = 1000     # test images for the reconstruction, invariance and KL measurements
MEASURE_SEED = 12345      # one fixed draw of augmentations for every measurement and picture, so VAEs and epochs compare
CONTROLS = ("pixels", "random-encoder", "supervised")
SUPERVISED_AUG = "crop"   # the ceiling trains on random crops, the usual supervised recipe
# Stage-2 heads: name -> (prefix of its numbers in results.json, final ReLU). "mu" is the paper's protocol for a VAE,
# "standardized" the controls'; "no-relu" drops the head's final ReLU, on the features of the row's protocol.
PROBES = {"mu": ("", True), "standardized": ("std_", True), "no-relu": ("norelu_", False)}
# What a continued run shares with the run in its folder; more augmentations or seeds extend it.
SETTINGS = ("dataset", "strength", "epochs", "probe_epochs", "batch_size", "image_size", "lr", "probe_lr",
            "latent_dim", "beta", "limit", "precision")

# -----------------------------------------------------------------------------
# Settings


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())

    def per_dataset(key):
        return "default: " + ", ".join(f"{name} {values[key]:g}" for name, values in DEFAULTS.items())
    p.add_argument("--dataset", default="cifar10", choices=sorted(data.LOADERS), help="data set (default: %(default)s)")
    p.add_argument("--aug", default="crop", help=f"augmentations to learn, comma-separated, from "
                   f"{', '.join(augment.AUGMENTATIONS)}; '+' mixes them, as in crop+hue-saturation (default: %(default)s)")
    p.add_argument("--baseline", default=True, action=argparse.BooleanOptionalAction, help="also train the baseline "
                   "'none' and the three controls (--no-baseline: only the --aug VAEs) (default: on)")
    p.add_argument("--seeds", "--seed", default="0", help="comma-separated seeds; each repeats everything, "
                   "and seeds weights, batch order and augmentations (default: %(default)s)")
    p.add_argument("--strength", type=float, default=1.0, help="augmentation strength (0 = identity) (default: %(default)s)")
    p.add_argument("--data-dir", default="./data", help="where data sets are found or downloaded (default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<dataset>-<aug>-seed<seeds>[-<recipe>])")
    p.add_argument("--epochs", type=int, default=None, help=f"stage-1 VAE epochs ({per_dataset('epochs')})")
    p.add_argument("--probe-epochs", type=int, default=None, help=f"stage-2 epochs ({per_dataset('probe_epochs')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"both stages ({per_dataset('batch_size')})")
    p.add_argument("--image-size", type=int, default=None, help=f"a multiple of 32 ({per_dataset('image_size')})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate of the VAE ({per_dataset('lr')})")
    p.add_argument("--probe-lr", type=float, default=1e-4, help="Adam learning rate of the probe (default: %(default)s)")
    p.add_argument("--latent-dim", type=int, default=vae.LATENT_DIM, help="latent size D (default: %(default)s)")
    p.add_argument("--beta", type=float, default=None, help=f"KL weight; 1 is the true ELBO ({per_dataset('beta')})")
    p.add_argument("--limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: what measured fastest for this network on this device and image size (default: %(default)s)")
    p.add_argument("--cuda-graph", action="store_true", help="replay stage 1's step as one CUDA graph (default: off)")
    p.add_argument("--log-every", type=float, default=2.0, help="seconds between progress lines (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its own settings "
                   "(--device, --cuda-graph and --log-every are this invocation's)")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a run")
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="a named set of the flags above (see RECIPES); flags given explicitly win (default: paper)")
    p.set_defaults(**RECIPES[p.parse_known_args(argv)[0].recipe])
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    recipe = "" if args.recipe == "paper" else f"-{args.recipe}"
    args.out = args.out or f"runs/{args.dataset}-{args.aug.replace(',', '+')}-seed{args.seeds.replace(',', '+')}{recipe}"
    args.augs, args.seed_list = parse_augmentations(args.aug), parse_seeds(args.seeds)
    check_args(args)
    return args


def parse_augmentations(text):
    """'crop,rotate' -> ['crop', 'rotate']; 'none' (the baseline) is implied; 'crop+hue-saturation' is one mix."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(part not in augment.AUGMENTATIONS for name in names for part in name.split("+")):
        fail(f"--aug {text!r}: use names from {', '.join(augment.AUGMENTATIONS)}, comma-separated "
             f"(join names with '+' to mix them)")
    return [name for name in dict.fromkeys(names) if name != "none"]


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]."""
    try:
        return list(dict.fromkeys(int(seed) for seed in text.split(",")))
    except ValueError:
        fail(f"--seeds {text!r}: use whole numbers, comma-separated, such as 0,1,2")


def vae_names(args):
    """The VAEs each seed trains: the baseline 'none' (unless --no-baseline), then each --aug."""
    return ["none", *args.augs] if args.baseline else list(args.augs)


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


def train_step(model, optimizer, x, x_aug, beta, ctx):
    """One step of stage 1, the paper's idea: encode the augmented x_aug, score the reconstruction against the clean x.
    -> float32 tensor [loss, recon, kl] on the device (reading it would wait for the GPU, so the caller sums it)."""
    with ctx:
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


def new_vae(seed, args, device):
    """The VAE every run of a seed starts from: weights drawn from the seed, channels_last for the convolutions."""
    torch.manual_seed(seed)
    return vae.VAE(args.latent_dim, args.image_size).to(device, memory_format=torch.channels_last)


def train_vae(name, seed, args, run):
    """Stage 1: train a VAE on (augment(x) -> x); checkpointed every epoch and on a signal, resumable to the step.
    -> model, record (seconds, images/s), per-epoch history"""
    model = new_vae(seed, args, run.device)        # every VAE of a seed starts alike: a controlled comparison
    graphed = args.cuda_graph and run.device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, capturable=graphed)
    step_fn = cuda_graphed(train_step) if graphed else train_step
    batch_rng, aug_rng = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    augment_fn, (x_train, y_train) = augment.by_name(name), run.splits["train"]
    x_val = data.to_float(run.splits["val"][0][:MEASURE_IMAGES])             # (N, 3, H, W), scored every epoch
    x_val_aug = fixed_draw(name, x_val, args.strength)
    steps, title, path = len(x_train) // args.batch_size, f"stage 1 [seed {seed}, {name}]", run.path(seed, name, "vae")
    loop = load_checkpoint(path, model, optimizer, [batch_rng, aug_rng]) or \
        {"epoch": 0, "step": 0, "sums": torch.zeros(3, device=run.device), "history": [], "seconds": 0.0}
    run.progress.found_done(steps=loop["epoch"] * steps + loop["step"])
    while loop["epoch"] < args.epochs:
        epoch_start, t_start = batch_rng.get_state(), time.perf_counter()   # a resume draws this epoch's order again
        first_step = loop["step"]
        model.train()
        for x_uint8, _ in data.shuffled_batches(x_train, y_train, args.batch_size, batch_rng, skip=loop["step"]):
            x, x_aug = augmented_batch(x_uint8, augment_fn, args.strength, aug_rng)
            loop["sums"] += step_fn(model, optimizer, x, x_aug, args.beta, run.ctx)
            loop["step"] += 1
            run.progress.step_done()
            if run.progress.due() or STOP.is_set():       # reading the sums waits for the device: only now and then
                loss, recon, kl = mean_parts(loop, f"{title} epoch {loop['epoch'] + 1}", path.parent)
                run.progress.print(f"{title} epoch {loop['epoch'] + 1}/{args.epochs} step {loop['step']}/{steps} "
                                   f"loss {loss:.1f} = -recon {-recon:.1f} + kl {kl:.1f}")
            if STOP.is_set():
                loop["seconds"] += time.perf_counter() - t_start
                batch_rng.set_state(epoch_start)
                save_checkpoint(path, model, optimizer, [batch_rng, aug_rng], loop)
                raise Interrupted
        loss, recon, kl = mean_parts(loop, f"{title} epoch {loop['epoch'] + 1}", path.parent)
        with run.ctx:
            row = {"run": name, "seed": seed, "stage": "vae", "epoch": loop["epoch"] + 1, "train_loss": loss,
                   "train_recon": recon, "train_kl": kl, **vae.evaluate(model, x_val, x_val_aug, args.beta)}
        loop.update(epoch=row["epoch"], step=0, sums=torch.zeros(3, device=run.device), history=loop["history"] + [row],
                    seconds=loop["seconds"] + time.perf_counter() - t_start)
        save_checkpoint(path, model, optimizer, [batch_rng, aug_rng], loop)
        if loop_steps := steps - first_step:          # none when a resume found the epoch's steps all done
            run.progress.step_seconds = (time.perf_counter() - t_start) / loop_steps   # the ETA follows the load
        run.progress.print(f"{title} epoch {row['epoch']}/{args.epochs} done: train loss {loss:.1f}, val loss "
                           f"{row['val_loss_clean']:.1f} from clean, {row['val_loss_aug']:.1f} from augmented input; "
                           f"{peak_memory(run.device)}", force=True)
    images_per_s = args.epochs * steps * args.batch_size / max(loop["seconds"], 1e-9)
    return model, {"vae_seconds": loop["seconds"], "vae_images_per_s": images_per_s}, loop["history"]


def mean_parts(loop, where, folder):
    """The epoch's mean loss, recon and kl so far (this waits for the device); a NaN or infinite loss stops the run."""
    loss, recon, kl = (loop["sums"] / loop["step"]).tolist()
    check_finite(loss, f"{where}, by step {loop['step']}", folder)
    return loss, recon, kl


# -----------------------------------------------------------------------------
# Stage 2: freeze the encoder and probe it


class Probe(NamedTuple):
    head: torch.nn.Module
    history: list          # one row per epoch: train and validation loss, top-1 and top-5
    stats: dict            # final train, val and test numbers, named with the head's prefix (PROBES)


def train_probe(name, head_name, features, seed, args, run):
    """Stage 2: train one of the PROBES heads on frozen features {split: (N, D)}; checkpointed every epoch."""
    prefix, final_relu = PROBES[head_name]
    labels = {split: y for split, (_, y) in run.splits.items()}
    title, path = f"stage 2 [seed {seed}, {name}, {head_name}]", run.path(seed, name, f"probe-{head_name}")
    torch.manual_seed(seed)
    head = probe.make_head(features["train"][:1].shape[1], run.num_classes, final_relu).to(run.device)
    optimizer, rng = torch.optim.Adam(head.parameters(), lr=args.probe_lr), torch.Generator().manual_seed(seed + 2)
    loop = load_checkpoint(path, head, optimizer, [rng]) or {"epoch": 0, "history": [], "seconds": 0.0}
    run.progress.found_done(epochs=loop["epoch"])
    while loop["epoch"] < args.probe_epochs:
        t_start = time.perf_counter()
        loss = probe.train_epoch(head, optimizer, features["train"], labels["train"], args.batch_size, rng)
        check_finite(loss, f"{title} epoch {loop['epoch'] + 1}", path.parent, hint="a lower --probe-lr")
        row = {"run": name, "head": head_name, "seed": seed, "stage": "probe", "epoch": loop["epoch"] + 1}
        for split in ("train", "val"):
            row.update({f"{split}_{k}": v for k, v in probe.evaluate(head, features[split], labels[split]).items()})
        loop.update(epoch=row["epoch"], history=loop["history"] + [row],
                    seconds=loop["seconds"] + time.perf_counter() - t_start)
        save_checkpoint(path, head, optimizer, [rng], loop)
        run.progress.epoch_done(time.perf_counter() - t_start)
        run.progress.print(f"{title} epoch {row['epoch']}/{args.probe_epochs} loss {row['train_loss']:.3f} "
                           f"train top-1 {row['train_top1']:.1f}% val top-1 {row['val_top1']:.1f}% "
                           f"top-5 {row['val_top5']:.1f}%", force=row["epoch"] == args.probe_epochs)
        if STOP.is_set():
            raise Interrupted
    stats = {f"test_{k}": v for k, v in probe.evaluate(head, features["test"], labels["test"]).items()}
    stats.update({k: v for k, v in loop["history"][-1].items() if k.startswith(("train_", "val_"))},
                 probe_seconds=loop["seconds"])
    return Probe(head, loop["history"], {prefix + key: value for key, value in stats.items()})


def probe_all(name, features_by_head, seed, args, run):
    """Stage 2 with each head of {head name: features}, the first being the row's protocol.
    -> one record of all their numbers and the first head's dead classes; the first Probe"""
    probes = [train_probe(name, head_name, features, seed, args, run) for head_name, features in features_by_head.items()]
    record = {key: value for p in probes for key, value in p.stats.items()}
    record["dead_classes"] = probe.dead_classes(probes[0].head, next(iter(features_by_head.values()))["train"])
    return record, probes[0]


def encode(model, splits, batch_size, ctx):
    """mu of every image of every split, from the frozen encoder: {split: float32 (N, D)}."""
    with ctx:
        return {split: probe.extract_features(model, x, batch_size) for split, (x, _) in splits.items()}

# -----------------------------------------------------------------------------
# The supervised ceiling: the same encoder and head, trained end to end on the labels


def supervised_step(network, optimizer, x_aug, y, ctx):
    """One step of the ceiling: cross-entropy of the head on the encoder's mu. -> [loss, top-1 %, top-5 %] (3,)"""
    with ctx:
        logits = network(x_aug).float()                          # (B, K)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    hits = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]     # (B, 5)
    return torch.stack([loss.detach(), 100 * hits[:, 0].float().mean(), 100 * hits.any(dim=1).float().mean()])


def train_supervised(seed, args, run):
    """The ceiling: the VAEs' initial encoder up to mu and the paper's head, trained together on SUPERVISED_AUG inputs
    with the VAEs' optimizer, learning rate and epochs; checkpointed every epoch (a stopped epoch is redone).
    -> record (test numbers), per-epoch history"""
    network = probe.Supervised(new_vae(seed, args, run.device), probe.make_head(args.latent_dim, run.num_classes))
    optimizer = torch.optim.Adam(network.to(run.device).parameters(), lr=args.lr)
    batch_rng, aug_rng = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    augment_fn, (x_train, y_train) = augment.by_name(SUPERVISED_AUG), run.splits["train"]
    images = {split: probe.Features(x, lambda x_float: x_float) for split, (x, _) in run.splits.items()}
    title, path = f"control [seed {seed}, supervised]", run.path(seed, "supervised", "network")
    loop = load_checkpoint(path, network, optimizer, [batch_rng, aug_rng]) or \
        {"epoch": 0, "history": [], "seconds": 0.0}
    run.progress.found_done(steps=loop["epoch"] * (len(x_train) // args.batch_size))
    while loop["epoch"] < args.epochs:
        t_start, sums, network = time.perf_counter(), torch.zeros(3, device=run.device), network.train()
        for step, (x_uint8, y) in enumerate(data.shuffled_batches(x_train, y_train, args.batch_size, batch_rng), 1):
            _, x_aug = augmented_batch(x_uint8, augment_fn, args.strength, aug_rng)
            sums += supervised_step(network, optimizer, x_aug, y, run.ctx)
            run.progress.step_done()
            if STOP.is_set():
                raise Interrupted
        loss, top1, top5 = (sums / step).tolist()
        check_finite(loss, f"{title} epoch {loop['epoch'] + 1}", path.parent)
        with run.ctx:
            val = probe.evaluate(network, images["val"], run.splits["val"][1], args.batch_size)
        row = {"run": "supervised", "seed": seed, "stage": "supervised", "epoch": loop["epoch"] + 1, "train_loss": loss,
               "train_top1": top1, "train_top5": top5, **{f"val_{k}": v for k, v in val.items()}}
        loop.update(epoch=row["epoch"], history=loop["history"] + [row],
                    seconds=loop["seconds"] + time.perf_counter() - t_start)
        save_checkpoint(path, network, optimizer, [batch_rng, aug_rng], loop)
        run.progress.print(f"{title} epoch {row['epoch']}/{args.epochs} loss {loss:.3f} train top-1 {top1:.1f}% "
                           f"(augmented) val top-1 {val['top1']:.1f}% top-5 {val['top5']:.1f}%", force=True)
    with run.ctx:
        test = probe.evaluate(network, images["test"], run.splits["test"][1], args.batch_size)
    return {f"test_{k}": v for k, v in test.items()} | {"supervised_seconds": loop["seconds"]}, loop["history"]

# -----------------------------------------------------------------------------
# Measure: what each VAE undid, what its encoder kept


def fixed_draw(aug, x, strength):
    """The one fixed draw of an augmentation that every measurement and picture uses: float x -> x_aug."""
    return augment.by_name(aug)(x, strength, torch.Generator().manual_seed(MEASURE_SEED))


def measure_augmentation(aug, vaes, heads, x, y, strength, ctx):
    """On the measurement images x, for the baseline and the `aug` VAE: x_hat's error from x and from x_aug, the
    share of the augmentation undone (vae.undone_share), and what it does to mu and to the probe (probe.invariance)."""
    x_aug = fixed_draw(aug, x, strength)
    row = {"mse_augmented_input": (x_aug - x).pow(2).mean().item()}
    for role, name in (("baseline", "none"), ("augmented", aug)):
        with ctx:
            (from_clean, mu, _), (from_aug, mu_aug, _) = vaes[name].reconstruct(x), vaes[name].reconstruct(x_aug)
        row |= {f"{role}_mse_from_clean": (from_clean - x).pow(2).mean().item(),
                f"{role}_mse_from_aug": (from_aug - x).pow(2).mean().item(),
                f"{role}_undone": vae.undone_share(x, x_aug, from_aug, from_clean),
                **{f"{role}_{key}": value for key, value in probe.invariance(heads[name], mu, mu_aug, y).items()}}
    return row | {"undone_beyond_baseline": row["augmented_undone"] - row["baseline_undone"]}

# -----------------------------------------------------------------------------
# One seed: every VAE, its probes and measurements, then the controls


def run_seed(seed, args, run):
    """Both stages for the baseline and each --aug, the measurements, and the three controls.
    -> records, the trained VAEs, each run's per-epoch history (stage 1 and its paper-protocol probe)"""
    records, vaes, heads, histories = [], {}, {}, {}
    x_measure, y_measure = data.to_float(run.splits["test"][0][:MEASURE_IMAGES]), run.splits["test"][1][:MEASURE_IMAGES]
    for name in vae_names(args):
        model, record, vae_history = train_vae(name, seed, args, run)
        features = encode(model, run.splits, args.batch_size, run.ctx)
        probed, mu_probe = probe_all(name, {"mu": features, "standardized": probe.standardize(features),
                                            "no-relu": features}, seed, args, run)
        with run.ctx:
            _, mu, logvar = model.reconstruct(x_measure)
        record |= probed | vae.kl_summary(mu, logvar)
        vaes[name], heads[name], histories[name] = model, mu_probe.head, vae_history + mu_probe.history
        if name != "none" and "none" in vaes:
            record |= measure_augmentation(name, vaes, heads, x_measure, y_measure, args.strength, run.ctx)
        folder = run.path(seed, name, "vae").parent
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, folder / "vae.pt")
        torch.save({k: v.cpu() for k, v in mu_probe.head.state_dict().items()}, folder / "probe.pt")
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in histories[name]))
        records.append({"seed": seed, "name": name, **record})
    if args.baseline:
        images = {split: x for split, (x, _) in run.splits.items()}
        untrained = probe.standardize(encode(new_vae(seed, args, run.device), run.splits, args.batch_size, run.ctx))
        controls = {name: probe_all(name, {"standardized": features, "no-relu": features}, seed, args, run)[0]
                    for name, features in (("pixels", probe.standardized_pixels(images)), ("random-encoder", untrained))}
        controls["supervised"], histories["supervised"] = train_supervised(seed, args, run)
        floor, ceiling = controls["random-encoder"]["std_test_top1"], controls["supervised"]["test_top1"]
        for record in records:     # each VAE's share of the way from the untrained encoder to the ceiling, if above
            record["ceiling_share"] = 100 * (record["test_top1"] - floor) / (ceiling - floor) if ceiling > floor else None
        records += [{"seed": seed, "name": name, **record} for name, record in controls.items()]
    return records, vaes, histories

# -----------------------------------------------------------------------------
# Report: results.md, results.json, pictures

# The tables of results.md: title, intro, whose rows ("all" runs or the "augs"), columns (title, record key).
TABLES = [
    ("Probe on the frozen encoder (test %)", "`mu` is the paper's protocol; `standardized` divides every feature by "
     "its train-split std (the controls need it); `supervised` is the encoder and head trained on the labels. Dead "
     "classes and the head without its final ReLU use the row's protocol (mu for a VAE, standardized for a control); "
     "the last column places a VAE's top-1 (mu) between the untrained encoder (0) and the supervised ceiling (100).",
     "all", [("top-1 (mu)", "test_top1"), ("top-5 (mu)", "test_top5"), ("top-1 (standardized)", "std_test_top1"),
             ("top-5 (standardized)", "std_test_top5"), ("dead classes", "dead_classes"),
             ("top-1, no final ReLU", "norelu_test_top1"), ("top-5, no final ReLU", "norelu_test_top5"),
             ("KL nats/image", "kl"), ("dims > 0.1 nat", "informative_dims"), ("% of the way to supervised", "ceiling_share")]),
    ("How much of each augmentation is undone (per-pixel MSE against the clean test image)", "", "augs",
     [("x_aug", "mse_augmented_input"), ("baseline from x_aug", "baseline_mse_from_aug"),
      ("augmented VAE from x_aug", "augmented_mse_from_aug"), ("baseline from x", "baseline_mse_from_clean"),
      ("augmented VAE from x", "augmented_mse_from_clean"), ("undone, baseline", "baseline_undone"),
      ("undone, augmented VAE", "augmented_undone"), ("undone beyond the baseline", "undone_beyond_baseline")]),
    ("Which transformations keep the label", f"Top-1 of each VAE's probe (trained on clean images) on the first "
     f"{MEASURE_IMAGES} test images, clean (x) and augmented (x_aug); mu shift: 0 = mu unchanged by the "
     f"augmentation, 1 = as far as another image's.", "augs",
     [("baseline on x", "baseline_top1_on_clean"), ("baseline on x_aug", "baseline_top1_on_aug"),
      ("augmented VAE on x", "augmented_top1_on_clean"), ("augmented VAE on x_aug", "augmented_top1_on_aug"),
      ("mu shift, baseline", "baseline_latent_shift"), ("mu shift, augmented VAE", "augmented_latent_shift")]),
]


def mean_std(values):
    """'41.5 +- 0.31' over seeds, three significant digits (the value alone for one seed; '' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return ""
    spread = f" +- {statistics.stdev(values):.2g}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.3g}{spread}"


def markdown_table(records, names, columns):
    """One row per name, one cell per (title, key): mean +- std over the records (seeds) of that name."""
    lines = ["| run | n | " + " | ".join(title for title, _ in columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name in names:
        rows = [r for r in records if r["name"] == name]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(mean_std([r.get(key) for r in rows]) for _, key in columns)
                     + " |")
    return "\n".join(lines)


def write_results(run_dir, args, records, wall_seconds):
    """results.json (every record, with args, machine and wall time) and results.md (mean +- std over seeds)."""
    write_json(run_dir / "results.json", {
        "args": vars(args), "precision": args.precision, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.platform(), "threads": torch.get_num_threads(),
        "wall_seconds_last_invocation": wall_seconds, "records": records})
    rows = {"all": vae_names(args) + (list(CONTROLS) if args.baseline else []), "augs": args.augs}
    tables = [(title, intro, markdown_table(records, rows[which], columns)) for title, intro, which, columns in TABLES
              if which == "all" or args.baseline]         # the other two compare with the baseline
    sections = [f"# {args.dataset}, {args.image_size}x{args.image_size}, {args.epochs} VAE epochs (lr {args.lr:g}, "
                f"beta {args.beta:g}, strength {args.strength:g}), {args.probe_epochs} probe epochs, seeds {args.seeds} "
                f"(mean +- std over n seeds)"]
    sections += [f"## {title}\n\n" + (f"{intro}\n\n" if intro else "") + table for title, intro, table in tables]
    gaps = "\n".join(gap_to_baseline(records, aug) for aug in args.augs if args.baseline)
    if gaps:
        sections.insert(2, gaps)                            # right below the probe table
    (run_dir / "results.md").write_text("\n\n".join(sections) + "\n")
    print(f"\n{tables[0][2]}\n(n: seeds per row; every table in {run_dir / 'results.md'})\n{gaps}")


def gap_to_baseline(records, aug):
    """'crop - none: +1.2 points of top-1 (mu), beyond the seeds' spread (std up to 0.4)', or within, or one seed only."""
    top1 = [[r["test_top1"] for r in records if r["name"] == name] for name in (aug, "none")]
    gap = statistics.mean(top1[0]) - statistics.mean(top1[1])
    if min(len(values) for values in top1) < 2:
        return f"{aug} - none: {gap:+.1f} points of top-1 (mu), one seed (--seeds 0,1,2 shows the spread)"
    spread = max(statistics.stdev(values) for values in top1)
    return f"{aug} - none: {gap:+.1f} points of top-1 (mu), {'beyond' if abs(gap) > spread else 'within'} the " \
           f"seeds' spread (std up to {spread:.1f})"


def draw_reconstructions(path, vaes, x, strength, ctx, num_images=8):
    """The clean x, then per augmentation three rows: x_aug, the baseline's (if trained) and the augmented VAE's
    x_hat from x_aug (the paper's Figures 1-4, every augmentation on one sheet), from the measured draw."""
    rows, titles = [x[:num_images]], ["clean x"]
    with ctx:
        if "none" in vaes:
            rows, titles = rows + [vaes["none"].reconstruct(x[:num_images])[0]], titles + ["VAE 'none'\nfrom x"]
        for aug in [name for name in vaes if name != "none"]:
            x_aug = fixed_draw(aug, x, strength)[:num_images]                  # the images the undo table measured
            shown = [name for name in ("none", aug) if name in vaes]            # the baseline (if trained), then aug
            rows += [x_aug] + [vaes[name].reconstruct(x_aug)[0] for name in shown]
            titles += [f"x_aug\n({aug})"] + [f"VAE '{name}'\nfrom x_aug" for name in shown]
    data.save_grid(path, rows, titles)

# -----------------------------------------------------------------------------
# The experiment, start to end


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    device = pick_device(args.device)
    run_dir, args = open_run(args)                   # a run that continues keeps the precision it started with
    args.precision, reason = pick_precision(args.precision, device, args.image_size)
    tune_allocator()
    install_signal_handlers()
    print(f"{device}, {args.precision}: {reason}", flush=True)
    with exits_cleanly(run_dir):
        splits, num_classes = load_data(args, device)
        write_json(run_dir / "args.json", vars(args))
        run = Run(run_dir, device, autocast_context(device, args.precision), splits, num_classes,
                  Progress(args, len(splits["train"][0]) // args.batch_size, device))
        records, first_seed = [], None
        for seed in args.seed_list:
            seed_records, vaes, histories = run_seed(seed, args, run)
            records += seed_records
            first_seed = first_seed or (vaes, histories)
    vaes, histories = first_seed
    write_results(run_dir, args, records, time.perf_counter() - t_start)
    draw_reconstructions(run_dir / "reconstructions.png", vaes, data.to_float(splits["test"][0][:MEASURE_IMAGES]),
                         args.strength, run.ctx)
    probe_histories = {name: [row for row in h if row["stage"] != "vae"] for name, h in histories.items()}
    probe.draw_curves(run_dir / "curves.png", probe_histories)
    print(f"wrote {run_dir}/: results.md, results.json, reconstructions.png, curves.png, "
          f"seed*/<run>/ (vae.pt, probe.pt, metrics.jsonl, checkpoints)")

# -----------------------------------------------------------------------------
# Machinery: the run folder and checkpoints, progress, device and precision, CUDA graph, errors and signals


class Run(NamedTuple):
    """What one invocation settles once and every stage reads."""
    folder: Path
    device: torch.device
    ctx: object             # the precision's autocast (a no-op for fp32), entered around every forward pass
    splits: dict            # {split: (uint8 images (N, 3, H, W), int64 labels (N,))} on the device
    num_classes: int
    progress: "Progress"

    def path(self, seed, name, part):
        """The one place that names checkpoints: <run folder>/seed<k>/<run>/checkpoint-<part>.pt."""
        return self.folder / f"seed{seed}" / name / f"checkpoint-{part}.pt"


def open_run(args):
    """Decide once whether to start, continue or refuse. A folder holds a run once a checkpoint exists: --resume
    continues it with its saved settings, the same command continues it (finished parts are skipped), other
    settings are refused unless --overwrite starts over. -> run folder, the settings to run with"""
    run_dir = Path(args.out)
    checkpoints = list(run_dir.glob("seed*/*/checkpoint-*.pt"))
    if args.resume and not checkpoints:
        fail(f"--resume: {run_dir} holds no run to continue")
    if checkpoints and not args.overwrite:
        saved = json.loads((run_dir / "args.json").read_text())
        if args.resume:
            args = argparse.Namespace(**{**saved, "resume": True, "device": args.device, "cuda_graph": args.cuda_graph,
                                         "log_every": args.log_every})
        elif args.precision == "auto":
            args.precision = saved["precision"]             # a run keeps the precision it started with
        differ = [f"--{key.replace('_', '-')} {saved[key]} (asked: {getattr(args, key)})"
                  for key in SETTINGS if saved[key] != getattr(args, key)]
        if differ:
            fail(f"{run_dir} holds a run with other settings: {', '.join(differ)}; "
                 f"use another --out, or --overwrite to start over")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for old in checkpoints if args.overwrite else []:
            old.unlink()
    except OSError as e:
        fail(f"cannot write to the output folder {run_dir}: {e.strerror}")
    return run_dir, args


def write_json(path, obj):
    """Write JSON atomically: a temporary file, then a rename."""
    Path(f"{path}.tmp").write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(f"{path}.tmp", path)


def save_checkpoint(path, model, optimizer, generators, loop):
    """All a loop needs to continue exactly: weights, optimizer, its generators, the global random stream (eps in
    reparameterize) and the CUDA one of the run's device, and the loop's state; atomically, as write_json."""
    device = next(model.parameters()).device
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": loop,
                "generators": [g.get_state() for g in generators], "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def load_checkpoint(path, model, optimizer, generators):
    """Load what save_checkpoint wrote into the live objects, on this run's device. -> the loop's state (None without
    a checkpoint). The optimizer keeps its own `capturable` (this run's device and --cuda-graph), whatever was saved."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        loop = state["loop"]
    except Exception as e:   # torch raises several types for a damaged file; an older main.py wrote no "loop"
        fail(f"checkpoint {path} is truncated, unreadable or from an older main.py ({type(e).__name__}); "
             f"delete it to redo that stage, or start over with --overwrite")
    device = next(model.parameters()).device
    model.load_state_dict(state["model"])
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = optimizer.defaults.get("capturable", False)   # load_state_dict places `step` by it
    optimizer.load_state_dict(state["optimizer"])
    for generator, saved in zip(generators, state["generators"]):
        generator.set_state(saved)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in loop.items()}


class Progress:
    """A line every --log-every seconds, ending with the time the whole command still needs: the stage-1 steps and
    probe epochs left, times what one of each took here (the TIMED_STEPS steps after the first TIMED_FROM, which
    allocate, autotune and record the CUDA graph; a probe epoch as long as the first). A resumed loop subtracts what it
    finds done."""
    TIMED_FROM, TIMED_STEPS = 5, 10

    def __init__(self, args, steps_per_epoch, device):
        networks, seeds = len(vae_names(args)) + args.baseline, len(args.seed_list)   # the ceiling trains like a VAE
        heads = len(vae_names(args)) * len(PROBES) + 4 * args.baseline                # two heads per control
        self.steps_left = seeds * networks * args.epochs * steps_per_epoch
        self.epochs_left = seeds * heads * args.probe_epochs
        self.log_every, self.device, self.steps_taken, self.last_line = args.log_every, device, 0, time.perf_counter()
        self.step_seconds = self.epoch_seconds = None
        self.slow = args.image_size > 32 or args.epochs > 10

    def found_done(self, steps=0, epochs=0):
        self.steps_left, self.epochs_left = self.steps_left - steps, self.epochs_left - epochs

    def step_done(self):
        self.steps_left, self.steps_taken = self.steps_left - 1, self.steps_taken + 1
        if self.steps_taken in (self.TIMED_FROM, self.TIMED_FROM + self.TIMED_STEPS):
            sync(self.device)                                      # the GPU runs ahead of the host
            if self.steps_taken == self.TIMED_FROM:
                self.timer = time.perf_counter()
                return
            self.step_seconds = (time.perf_counter() - self.timer) / self.TIMED_STEPS
            print(f"forecast: the whole command needs about {format_seconds(self.eta_seconds())} more on this machine "
                  f"({self.step_seconds * 1000:.0f} ms per stage-1 step"
                  + (")" if self.epoch_seconds else "; the probes are timed at their first epoch)"), flush=True)
            if self.eta_seconds() > 3600 and self.slow:
                print("forecast: --image-size 32 --epochs 10 makes the same comparison in a fraction of this "
                      "(README, First steps)", flush=True)

    def epoch_done(self, seconds):
        self.epochs_left, self.epoch_seconds = self.epochs_left - 1, self.epoch_seconds or seconds

    def eta_seconds(self):
        if self.step_seconds is not None:
            return self.steps_left * self.step_seconds + self.epochs_left * (self.epoch_seconds or 0)

    def due(self):
        return time.perf_counter() - self.last_line >= self.log_every

    def print(self, text, force=False):
        if force or self.due() or STOP.is_set():
            self.last_line, eta = time.perf_counter(), self.eta_seconds()
            print(text + (f" | ETA {format_seconds(eta)}" if eta is not None else ""), flush=True)


def format_seconds(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def peak_memory(device):
    """Peak memory so far, to show that it does not grow: this process's resident memory (Linux), and the GPU's."""
    import resource
    text = f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB"    # ru_maxrss: KiB
    return text + (f", GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB" if device.type == "cuda" else "")


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; a device that is absent is a usage error. A GPU is made the current
    device before anything is made on it, so that streams and graphs land on it."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            fail(f"--device {name} was asked for, but this PyTorch sees {torch.cuda.device_count()} CUDA GPU(s), "
                 f"so no CUDA device {device.index}; use --device cpu")
        torch.cuda.set_device(device)
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


def autocast_context(device, precision):
    """The run's autocast, built once: bf16, or a no-op for fp32. No weight-cast cache, so a CUDA graph may capture it."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, torch.bfloat16, cache_enabled=False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class cuda_graphed:
    """Wrap a training step (a function of tensors that returns a tensor) so that it is recorded once as a CUDA graph
    and replayed: one launch for the whole forward, loss, backward and Adam step instead of hundreds. The first
    WARMUP calls run eagerly on a side stream (the capture needs warm kernels and optimizer state), the next captures
    into fixed buffers, every later call copies its inputs into them and replays: every call is one real step. Needs
    Adam(capturable=True) and the run's device current. https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs"""
    WARMUP = 3

    def __init__(self, step):
        self.step, self.calls, self.graph = step, 0, None
        self.side_stream = torch.cuda.Stream()

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.WARMUP:
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "This instance was constructed with capturable=True")  # expected here
                out = self.step(*args)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return out
        if self.graph is None:
            self.args = [a.clone() if torch.is_tensor(a) else a for a in args]   # the buffers the graph reads
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self.step(*self.args)
        for buffer, a in zip(self.args, args):
            if torch.is_tensor(a) and a is not buffer:
                assert (a.shape, a.dtype) == (buffer.shape, buffer.dtype), f"the graph replays {buffer.shape} " \
                    f"{buffer.dtype}, not {a.shape} {a.dtype}"
                buffer.copy_(a)
        self.graph.replay()
        return self.out.clone()


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
    """Keep glibc from handing big activation buffers back to the OS after every step (Linux only): by default it
    serves blocks above 128 KiB with mmap and unmaps them on free, so every step page-faults its activations in
    again (at 64x64, batch 128, 2-core CPU: 26,844 page faults per step; with these thresholds 0 to ~1,100)."""
    import ctypes                                       # only this tweak talks to the C library
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                                     # musl or another libc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3         # from glibc's malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)            # the largest glibc accepts on 64-bit systems
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


if __name__ == "__main__":
    main()
