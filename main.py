"""
Run the paper's experiment end to end: learn an augmentation with a VAE, then probe what its encoder kept.

    python main.py --dataset shapes                  # the whole experiment offline, about 1.5 minutes on 2 CPU cores
    python main.py --dataset cifar10 --aug crop      # the paper's protocol (100 + 40 epochs, 64x64)
    python main.py --dataset cifar10 --recipe ours   # the best on validation within ~30 CPU minutes per VAE
    python main.py --dataset cifar10 --aug crop,rotate --seeds 0,1,2 --image-size 32 --epochs 10   # a sweep

Method (Rajagopalan 2021, "Learned Data Augmentation"), once per seed, in the order of this file:
    1. stage 1 (train_vae): for every batch, x_aug = augment(x); minimise -ELBO(decode(z), x) with z ~ q(z | x_aug)
       (vae.train_step): augmented in, clean out. First the baseline "none" (clean in, clean out), then each --aug;
    2. stage 2 (train_probe): freeze the encoder, train the paper's head on mu, report top-1/top-5;
    3. controls: the head on standardized raw pixels and on the untrained encoder (the VAEs' common start), and a
       ceiling (train_supervised): that encoder and head trained end to end on the labels;
    4. measure (measure_augmentation): how much of the augmentation each VAE undoes, how far it moves mu, and
       whether the probe still finds the label;
    5. report: results.md and results.json (mean +- std over seeds, paired gaps), reconstructions.png, curves.png.
A first reading may stop at `main`: the machinery after it (run folder, checkpoints, the Ledger that keeps each
training loop's books, the forecast, device and precision, CUDA graph, errors and signals) changes nothing in the
method. A run folder is resumable: the same command continues it.

What seeds what (k: a --seeds entry), so that the VAEs of a seed differ only in their augmentation:
    train/validation split       data.split_validation with SPLIT_SEED: the same for every k
    VAE weights                  torch.manual_seed(k) in new_vae: every VAE of k, the untrained control, the ceiling's
                                 encoder; it also restarts the global stream that draws eps, alike for every VAE of k
    stage-1 batch order          Generator(k): every VAE of k and the ceiling
    augmentation draws           Generator(k + 1): every VAE of k and the ceiling
    head weights                 torch.manual_seed(k) before make_head: every probe of k and the ceiling's head
    probe batch order            Generator(k + 2)
    measurements, pictures       Generator(MEASURE_SEED) draws x_aug, Generator(SAMPLE_SEED) the prior's z
Which split each stage reads: stage 1 and the ceiling train on train and score validation every epoch; a probe
trains on train, scores train and validation every epoch and test once, after its last epoch; the measurements and
pictures read the first MEASURE_IMAGES test images. Nothing is chosen on the test set. A checkpoint holds the
weights, the optimizer, the loop's generators, the global (and CUDA) random state and the Ledger's place.

Axes: B batch, C channels, H/W height/width, D latent size, K classes.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

import augment
import data
import probe
import vae

try:
    import fcntl            # Unix: the run folder's lock, and the peak memory in the progress lines
    import resource
except ImportError:         # Windows: its own lock, and no peak memory
    import msvcrt
    fcntl = resource = None

# Per data set: the paper's settings for real data (the batch size is ours); ours for the offline `shapes` run.
PAPER = dict(epochs=100, probe_epochs=40, image_size=64, batch_size=128, lr=1e-4, beta=1.0)
DEFAULTS = {"cifar10": PAPER, "tinyimagenet": PAPER,
            "shapes": dict(epochs=6, probe_epochs=40, image_size=32, batch_size=128, lr=1e-3, beta=0.1)}
# Named flag sets: "paper" is the defaults; "ours" the best validation top-1 we measured on CIFAR-10 within about 30
# CPU minutes per VAE (README, "What moves the result"): the paper's crop VAE at 64x64, stopped after 20 epochs.
RECIPES = {"paper": {}, "ours": dict(aug="crop", image_size=64, epochs=20)}
VAL_FRACTION = 0.1        # 45,000 / 5,000 for CIFAR-10
SPLIT_SEED = 0            # the validation split never changes with --seeds
MEASURE_IMAGES = 1000     # test images for the reconstruction, invariance and KL measurements
MEASURE_SEED = 12345      # one fixed draw of augmentations for every measurement and picture, so VAEs and epochs compare
SAMPLE_SEED = 54321       # one fixed draw of z ~ N(0, I) for the samples in reconstructions.png
CONTROLS = ("pixels", "random-encoder", "supervised")
SUPERVISED_AUG = "crop"   # the ceiling trains on random crops, the usual supervised recipe
# What a continued run shares with the run in its folder; more augmentations or seeds extend it.
SETTINGS = ("dataset", "strength", "epochs", "probe_epochs", "batch_size", "image_size", "lr", "probe_lr",
            "latent_dim", "beta", "limit", "precision")
INVOCATION = ("device", "cuda_graph", "log_every")   # what --resume takes from the command line; the rest is saved
MIN_PYTHON = (3, 10)
MAX_SEED = 2 ** 32 - 1

# -----------------------------------------------------------------------------
# Settings


def build_parser():
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
    p.add_argument("--strength", type=float, default=1.0, help=f"augmentation strength, 0 (identity) to below "
                   f"{augment.MAX_STRENGTH:g} (default: %(default)s)")
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
                   "(only --device, --cuda-graph and --log-every may be given with it)")
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a run")
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="a named set of the flags above (see RECIPES); flags given explicitly win (default: paper)")
    return p


def parse_args(argv=None):
    p = build_parser()
    # A recipe changes defaults, so it is read on its own first; the real parse then lets explicit flags win.
    p.set_defaults(**RECIPES[p.parse_known_args(argv)[0].recipe])
    args = p.parse_args(argv)
    if args.resume:
        check_resume_flags(given_flags(p, argv))
    for key, value in DEFAULTS[args.dataset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    recipe = "" if args.recipe == "paper" else f"-{args.recipe}"
    args.out = args.out or f"runs/{args.dataset}-{args.aug.replace(',', '+')}-seed{args.seeds.replace(',', '+')}{recipe}"
    args.augs = parse_augmentations(args.aug)
    args.seed_list = parse_seeds(args.seeds)
    check_args(args)
    return args


def given_flags(parser, argv):
    """The names of the flags written on the command line. argparse fills in a default only where the namespace it
    is given lacks the attribute, so a namespace pre-filled with a marker shows which ones the user set."""
    unset = object()
    marked = argparse.Namespace(**{key: unset for key in vars(parser.parse_args([]))})
    return {key for key, value in vars(parser.parse_args(argv, namespace=marked)).items() if value is not unset}


def check_resume_flags(given):
    """--resume runs with the saved settings: a flag that would change them is refused rather than ignored."""
    if "overwrite" in given:
        fail("--resume continues the run in --out and --overwrite starts it over: give one of them")
    fixed = sorted(given - {"out", "resume", *INVOCATION})
    if fixed:
        names = ", ".join(f"--{key.replace('_', '-')}" for key in fixed)
        fail(f"--resume continues the run with the settings it was started with; leave out {names} "
             f"(only --device, --cuda-graph and --log-every may change), or start another run with another --out")


def parse_augmentations(text):
    """'crop,rotate' -> ['crop', 'rotate']; 'none' (the baseline) is implied; 'crop+hue-saturation' is one mix."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names or any(part not in augment.AUGMENTATIONS for name in names for part in name.split("+")):
        fail(f"--aug {text!r}: use names from {', '.join(augment.AUGMENTATIONS)}, comma-separated "
             f"(join names with '+' to mix them)")
    return [name for name in dict.fromkeys(names) if name != "none"]


def parse_seeds(text):
    """'0,1,2' -> [0, 1, 2]; every seed a whole number from 0 to MAX_SEED."""
    try:
        seeds = list(dict.fromkeys(int(seed) for seed in text.split(",")))
    except ValueError:
        seeds = []
    if not seeds or not all(0 <= seed <= MAX_SEED for seed in seeds):
        fail(f"--seeds {text!r}: use whole numbers from 0 to {MAX_SEED}, comma-separated, such as 0,1,2")
    return seeds


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
    if not (args.lr > 0 and args.probe_lr > 0 and args.beta >= 0):
        fail("--lr and --probe-lr must be positive, --beta non-negative")
    if not 0 <= args.strength < augment.MAX_STRENGTH:
        fail(f"--strength must be at least 0 and below {augment.MAX_STRENGTH:g}, where the crops' smallest box "
             f"shrinks to nothing; got {args.strength:g}")

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
    splits = {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}
    splits = {k: (data.resize(x, args.image_size).to(device), y.to(device)) for k, (x, y) in splits.items()}
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    print(f"{args.dataset}: {len(x_train)} train, {len(x_val)} val, {len(x_test)} test images at "
          f"{args.image_size}x{args.image_size}, {num_classes} classes", flush=True)
    return splits, num_classes

# -----------------------------------------------------------------------------
# Stage 1: learn the augmentation


def augmented_batch(x_uint8, augment_fn, strength, generator):
    """uint8 batch -> (x, x_aug), both float (B, 3, H, W) in [0, 1], channels_last for the convolutions."""
    x = data.to_float(x_uint8).contiguous(memory_format=torch.channels_last)
    return x, augment_fn(x, strength, generator)


def new_vae(seed, args, device):
    """The VAE every run of a seed starts from: weights drawn from the seed, channels_last for the convolutions."""
    torch.manual_seed(seed)
    return vae.VAE(args.latent_dim, args.image_size).to(device, memory_format=torch.channels_last)


def train_vae(name, seed, args, session):
    """Stage 1: train the VAE `name` on (augment(x) -> x) from the seed's common start.
    -> model, record (seconds, images/s), per-epoch history"""
    model = new_vae(seed, args, session.device)             # every VAE of a seed starts alike: a controlled comparison
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, capturable=session.graphed)
    step = vae.cuda_graphed(vae.train_step) if session.graphed else vae.train_step
    batch_rng = torch.Generator().manual_seed(seed)          # the batch order: the same for every VAE of the seed
    aug_rng = torch.Generator().manual_seed(seed + 1)        # the augmentation's draws
    augment_fn = augment.by_name(name)
    x_train, y_train = session.splits["train"]
    x_val = data.to_float(session.splits["val"][0][:MEASURE_IMAGES])         # (N, 3, H, W), scored every epoch
    x_val_aug = fixed_draw(name, x_val, args.strength)
    ledger = session.ledger(seed, name, "vae", model, optimizer, [batch_rng, aug_rng], args.epochs,
                            parts=("loss", "recon", "kl"))
    for epoch in ledger.epochs():
        # Train: the encoder sees the augmented x_aug, the loss scores the reconstruction against the clean x.
        model.train()
        for x_uint8, _ in data.shuffled_batches(x_train, y_train, args.batch_size, batch_rng, skip=ledger.step):
            x, x_aug = augmented_batch(x_uint8, augment_fn, args.strength, aug_rng)
            ledger.add(step(model, optimizer, x, x_aug, args.beta, session.autocast))
        # Evaluate: the validation loss from clean and from augmented input, both scored against the clean x.
        loss, recon, kl = ledger.means()
        with session.autocast:
            scores = vae.validate(model, x_val, x_val_aug, args.beta)
        ledger.end_epoch({"run": name, "seed": seed, "stage": "vae", "epoch": epoch + 1, "train_loss": loss,
                          "train_recon": recon, "train_kl": kl, **scores})
    images = args.epochs * (len(x_train) // args.batch_size) * args.batch_size
    return model, {"vae_seconds": ledger.seconds, "vae_images_per_s": images / max(ledger.seconds, 1e-9)}, ledger.history

# -----------------------------------------------------------------------------
# Stage 2: freeze the encoder and probe it


def frozen_mu(model, args, session):
    """mu of every image of every split from the frozen encoder: {split: float32 (N, D)}."""
    with session.autocast:
        return {split: probe.extract_features(model, x, args.batch_size) for split, (x, _) in session.splits.items()}


def train_probe(name, features_name, features, seed, args, session):
    """Stage 2: the paper's head on frozen features {split: (N, D)}: "mu" for a VAE (the paper's protocol),
    "standardized" for a control. -> head, record (its last epoch's train and val numbers, test), history"""
    labels = {split: y for split, (_, y) in session.splits.items()}
    torch.manual_seed(seed)                                  # every head of a seed starts alike
    head = probe.make_head(features["train"][:1].shape[1], session.num_classes).to(session.device)
    optimizer = torch.optim.Adam(head.parameters(), lr=args.probe_lr)
    order_rng = torch.Generator().manual_seed(seed + 2)
    ledger = session.ledger(seed, name, f"probe-{features_name}", head, optimizer, [order_rng], args.probe_epochs)
    for epoch in ledger.epochs():
        probe.train_epoch(head, optimizer, features["train"], labels["train"], args.batch_size, order_rng)
        row = {"run": name, "head": features_name, "seed": seed, "stage": "probe", "epoch": epoch + 1}
        for split in ("train", "val"):
            row |= {f"{split}_{k}": v for k, v in probe.evaluate(head, features[split], labels[split]).items()}
        ledger.end_epoch(row)
    test = probe.evaluate(head, features["test"], labels["test"])    # read once, after the last epoch
    record = {key: value for key, value in ledger.history[-1].items() if key.startswith(("train_", "val_"))}
    record |= {f"test_{k}": v for k, v in test.items()}
    return head, record | {"probe": features_name, "probe_seconds": ledger.seconds}, ledger.history

# -----------------------------------------------------------------------------
# The supervised ceiling: the same encoder and head, trained end to end on the labels


def train_supervised(seed, args, session):
    """The ceiling: the VAEs' initial encoder up to mu and the paper's head (started as every probe's head), trained
    together on SUPERVISED_AUG inputs with the VAEs' optimizer, learning rate, epochs and batch order.
    -> record (test numbers), per-epoch history"""
    encoder = new_vae(seed, args, session.device)
    torch.manual_seed(seed)                                  # the head starts as every probe's head of the seed
    head = probe.make_head(args.latent_dim, session.num_classes)
    network = probe.Supervised(encoder, head).to(session.device)
    optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
    batch_rng = torch.Generator().manual_seed(seed)          # the VAEs' batch order
    aug_rng = torch.Generator().manual_seed(seed + 1)
    augment_fn = augment.by_name(SUPERVISED_AUG)
    x_train, y_train = session.splits["train"]
    images = {split: probe.Features(x, lambda x_float: x_float) for split, (x, _) in session.splits.items()}
    ledger = session.ledger(seed, "supervised", "network", network, optimizer, [batch_rng, aug_rng], args.epochs,
                            parts=("loss", "top-1 %", "top-5 %"))
    for epoch in ledger.epochs():
        # Train on augmented batches, like stage 1, but scored on the labels.
        network.train()
        for x_uint8, y in data.shuffled_batches(x_train, y_train, args.batch_size, batch_rng, skip=ledger.step):
            _, x_aug = augmented_batch(x_uint8, augment_fn, args.strength, aug_rng)
            ledger.add(probe.supervised_step(network, optimizer, x_aug, y, session.autocast))
        # Evaluate on the validation images.
        loss, top1, top5 = ledger.means()
        with session.autocast:
            val = probe.evaluate(network, images["val"], session.splits["val"][1], args.batch_size)
        ledger.end_epoch({"run": "supervised", "seed": seed, "stage": "supervised", "epoch": epoch + 1,
                          "train_loss": loss, "train_top1": top1, "train_top5": top5,
                          **{f"val_{k}": v for k, v in val.items()}})
    with session.autocast:
        test = probe.evaluate(network, images["test"], session.splits["test"][1], args.batch_size)
    record = {key: value for key, value in ledger.history[-1].items() if key.startswith("val_")}
    record |= {f"test_{k}": v for k, v in test.items()}
    return record | {"supervised_seconds": ledger.seconds}, ledger.history

# -----------------------------------------------------------------------------
# Measure: what each VAE undid, what its encoder kept


def fixed_draw(aug, x, strength):
    """The one fixed draw of an augmentation that every measurement and picture uses: float x -> x_aug."""
    return augment.by_name(aug)(x, strength, torch.Generator().manual_seed(MEASURE_SEED))


def measure_augmentation(aug, vaes, heads, x, y, strength, autocast):
    """On the measurement images x, for the baseline and the `aug` VAE: x_hat's error from x and from x_aug, what the
    augmentation does to mu and to the probe (probe.invariance), and how much of it the `aug` VAE undoes
    (vae.undone_share: 0 no better than the baseline, 1 as good as from the clean x)."""
    x_aug = fixed_draw(aug, x, strength)
    row = {"mse_augmented_input": (x_aug - x).pow(2).mean().item()}
    x_hat = {}
    for role, name in (("baseline", "none"), ("augmented", aug)):
        with autocast:
            from_clean, mu, _ = vaes[name].reconstruct(x)
            from_aug, mu_aug, _ = vaes[name].reconstruct(x_aug)
        x_hat[role] = {"clean": from_clean, "aug": from_aug}
        row[f"{role}_mse_from_clean"] = (from_clean - x).pow(2).mean().item()
        row[f"{role}_mse_from_aug"] = (from_aug - x).pow(2).mean().item()
        row |= {f"{role}_{key}": value for key, value in probe.invariance(heads[name], mu, mu_aug, y).items()}
    baseline = x_hat["baseline"]
    row["undone"] = vae.undone_share(x, x_hat["augmented"]["aug"], baseline["aug"], baseline["clean"])
    return row

# -----------------------------------------------------------------------------
# One seed: every VAE, its probe and measurements, then the controls


class SeedResult(NamedTuple):
    records: list          # one per run: its test numbers and measurements
    vaes: dict             # run name -> trained VAE
    heads: dict            # run name -> its probe's head
    histories: dict        # run name -> per-epoch rows (stage 1, then its probe; the ceiling's own)


def run_seed(seed, args, session):
    """Both stages for the baseline and each --aug, the measurements, then the three controls."""
    result = SeedResult([], {}, {}, {})
    x_measure = data.to_float(session.splits["test"][0][:MEASURE_IMAGES])      # (N, 3, H, W)
    y_measure = session.splits["test"][1][:MEASURE_IMAGES]
    for name in vae_names(args):
        model, record, vae_history = train_vae(name, seed, args, session)
        head, probed, probe_history = train_probe(name, "mu", frozen_mu(model, args, session), seed, args, session)
        with session.autocast:
            _, mu, logvar = model.reconstruct(x_measure)
        record |= probed | vae.kl_summary(mu, logvar)
        result.vaes[name] = model
        result.heads[name] = head
        result.histories[name] = vae_history + probe_history
        if name != "none" and "none" in result.vaes:
            record |= measure_augmentation(name, result.vaes, result.heads, x_measure, y_measure, args.strength,
                                           session.autocast)
        result.records.append({"seed": seed, "name": name, **record})
    if args.baseline:
        result.records.extend(run_controls(seed, args, session, result))
    return result


def run_controls(seed, args, session, result):
    """The head on standardized raw pixels and on the untrained encoder's standardized mu, and the supervised
    ceiling; each VAE's record gains its share of the way from the untrained encoder (0) to the ceiling (100)."""
    images = {split: x for split, (x, _) in session.splits.items()}
    untrained_mu = frozen_mu(new_vae(seed, args, session.device), args, session)
    controls = {}
    for name, features in (("pixels", probe.standardized_pixels(images)),
                           ("random-encoder", probe.standardize(untrained_mu))):
        _, controls[name], _ = train_probe(name, "standardized", features, seed, args, session)
    controls["supervised"], result.histories["supervised"] = train_supervised(seed, args, session)
    floor = controls["random-encoder"]["test_top1"]
    ceiling = controls["supervised"]["test_top1"]
    for record in result.records:
        record["ceiling_share"] = 100 * (record["test_top1"] - floor) / (ceiling - floor) if ceiling > floor else None
    return [{"seed": seed, "name": name, **record} for name, record in controls.items()]

# -----------------------------------------------------------------------------
# Report: results.md, results.json, pictures, the trained networks


# The tables of results.md: title, intro, whose rows ("all" runs or the "augs"), columns (title, record key).
TABLES = [
    ("Probe on the frozen encoder (test %)", "A VAE's row is the paper's head on `mu`; a control's is that head on "
     "standardized features (each divided by its train-split std); `supervised` is the encoder and head trained on "
     "the labels. The last column places a VAE's top-1 between the untrained encoder (0) and the ceiling (100).",
     "all", [("top-1", "test_top1"), ("top-5", "test_top5"), ("val top-1", "val_top1"), ("KL nats/image", "kl"),
             ("dims > 0.1 nat", "informative_dims"), ("% of the way to supervised", "ceiling_share")]),
    ("How much of each augmentation is undone (per-pixel MSE against the clean test image)", "undone = (baseline "
     "from x_aug - augmented VAE from x_aug) / (baseline from x_aug - baseline from x): 0 no better than the "
     "baseline, 1 as good as the baseline from the clean image.", "augs",
     [("x_aug", "mse_augmented_input"), ("baseline from x_aug", "baseline_mse_from_aug"),
      ("augmented VAE from x_aug", "augmented_mse_from_aug"), ("baseline from x", "baseline_mse_from_clean"),
      ("augmented VAE from x", "augmented_mse_from_clean"), ("undone", "undone")]),
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
        cells = [mean_std([r.get(key) for r in rows]) for _, key in columns]
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(folder, args, records, wall_seconds):
    """results.json (every record, with the settings, code version, machine and wall time) and results.md."""
    version = code_version()
    write_file(folder / "results.json", json_bytes({
        "args": saved_settings(args), "code": version, "precision": args.precision, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.platform(), "threads": torch.get_num_threads(),
        "wall_seconds_last_invocation": wall_seconds, "records": records}))
    rows = {"all": vae_names(args) + (list(CONTROLS) if args.baseline else []), "augs": args.augs}
    tables = [(title, intro, markdown_table(records, rows[which], columns)) for title, intro, which, columns in TABLES
              if which == "all" or args.baseline]           # the other two compare with the baseline
    sections = [f"# {args.dataset}, {args.image_size}x{args.image_size}, {args.epochs} VAE epochs (lr {args.lr:g}, "
                f"beta {args.beta:g}, strength {args.strength:g}), {args.probe_epochs} probe epochs, seeds {args.seeds} "
                f"(mean +- std over n seeds)\n\ncode {version['git_commit'] or 'outside git'}, files "
                f"{version['files_sha256']}; torch {torch.__version__}, {args.precision}"]
    sections += [f"## {title}\n\n" + (f"{intro}\n\n" if intro else "") + table for title, intro, table in tables]
    gaps = "\n".join(probe.paired_gap(records, aug) for aug in args.augs) if args.baseline else ""
    if gaps:
        sections.insert(2, gaps.replace("\n", "\n\n"))        # right below the probe table
    write_file(folder / "results.md", ("\n\n".join(sections) + "\n").encode())
    print(f"\n{tables[0][2]}\n(n: seeds per row; every table in {folder / 'results.md'})\n{gaps}")


def draw_reconstructions(vaes, x, strength, autocast, num_images=8):
    """The clean x; then per augmentation x_aug and the baseline's (if trained) and the augmented VAE's x_hat from
    it (the paper's Figures 1-4 on one sheet, from the measured draw); last, each VAE's samples from the prior."""
    rows = [x[:num_images]]
    titles = ["clean x"]
    with autocast:
        if "none" in vaes:
            rows.append(vaes["none"].reconstruct(x[:num_images])[0])
            titles.append("VAE 'none'\nfrom x")
        for aug in [name for name in vaes if name != "none"]:
            x_aug = fixed_draw(aug, x, strength)[:num_images]                  # the images the undo table measured
            shown = [name for name in ("none", aug) if name in vaes]            # the baseline (if trained), then aug
            rows += [x_aug] + [vaes[name].reconstruct(x_aug)[0] for name in shown]
            titles += [f"x_aug\n({aug})"] + [f"VAE '{name}'\nfrom x_aug" for name in shown]
        for name, model in vaes.items():                                        # decode(z), z ~ N(0, I): the same z
            rows.append(model.sample(num_images, torch.Generator().manual_seed(SAMPLE_SEED)))
            titles.append(f"VAE '{name}'\nprior samples")
    return data.save_grid(rows, titles)


def save_trained(folder, seed, result):
    """seed<k>/<run>/: vae.pt and probe.pt (state_dicts, CPU tensors) and metrics.jsonl (one line per epoch)."""
    for name, model in result.vaes.items():
        run_folder = folder / f"seed{seed}" / name
        write_file(run_folder / "vae.pt", tensor_bytes({k: v.cpu() for k, v in model.state_dict().items()}))
        write_file(run_folder / "probe.pt", tensor_bytes({k: v.cpu() for k, v in result.heads[name].state_dict().items()}))
        write_file(run_folder / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in result.histories[name]).encode())

# -----------------------------------------------------------------------------
# The experiment, start to end


def main(argv=None):
    t_start = time.perf_counter()
    check_python()
    args = parse_args(argv)
    device = pick_device(args.device)
    install_signal_handlers()
    tune_allocator()
    with exits_cleanly(args.out):
        args, lock = open_run(args)                 # start, continue or refuse; a continued run keeps its settings
        with lock:
            args.precision, reason = pick_precision(args.precision, device, args.image_size)
            print(f"{device}, {args.precision}: {reason}", flush=True)
            splits, num_classes = load_data(args, device)
            write_file(Path(args.out) / "args.json", json_bytes(saved_settings(args)))
            session = start_session(args, device, splits, num_classes)
            records = []
            for seed in args.seed_list:
                result = run_seed(seed, args, session)
                save_trained(session.folder, seed, result)
                records += result.records
                if seed == args.seed_list[0]:
                    pictured = result                   # the pictures show the first seed's VAEs
            write_results(session.folder, args, records, time.perf_counter() - t_start)
            x_measure = data.to_float(splits["test"][0][:MEASURE_IMAGES])
            sheet = draw_reconstructions(pictured.vaes, x_measure, args.strength, session.autocast)
            write_file(session.folder / "reconstructions.png", png_bytes(sheet))
            probe_rows = {name: [row for row in rows if row["stage"] != "vae"] for name, rows in pictured.histories.items()}
            write_file(session.folder / "curves.png", png_bytes(probe.draw_curves(probe_rows)))
            print(f"wrote {session.folder}/: results.md, results.json, reconstructions.png, curves.png, "
                  f"seed*/<run>/ (vae.pt, probe.pt, metrics.jsonl, checkpoints)")
            exit_if_stopped()

# -----------------------------------------------------------------------------
# Machinery: the run folder and its files, checkpoints, the Ledger, the forecast, device and precision, CUDA graph,
# errors and signals


class Session(NamedTuple):
    """What one invocation settles once and every stage reads."""
    folder: Path
    device: torch.device
    autocast: object        # the precision's autocast (a no-op for fp32), entered around every forward pass
    graphed: bool           # stage 1 replays its step as a CUDA graph (--cuda-graph on a GPU)
    splits: dict            # {split: (uint8 images (N, 3, H, W), int64 labels (N,))} on the device
    num_classes: int
    plan: "Plan"

    def ledger(self, seed, name, part, model, optimizer, generators, epochs, parts=("loss",)):
        """The books of one training loop (see Ledger), continued from its checkpoint if there is one."""
        return Ledger(self, (seed, name, part), model, optimizer, generators, epochs, parts)


def start_session(args, device, splits, num_classes):
    """Settle the run's device, precision and forecast; the forecast's first estimate comes from short trials."""
    autocast = autocast_context(device, args.precision)
    graphed = args.cuda_graph and device.type == "cuda"
    jobs = planned_jobs(args, {split: len(y) for split, (_, y) in splits.items()})
    session = Session(Path(args.out), device, autocast, graphed, splits, num_classes, None)
    plan = Plan(jobs, time_trials(session, args), args.log_every)
    plan.found_done(session.folder)
    plan.forecast(slow=args.image_size > 32 or args.epochs > 10)
    return session._replace(plan=plan)


def open_run(args):
    """Decide once whether to start, continue or refuse, then hold the folder. A folder holds a run once a checkpoint
    exists: --resume continues it with its saved settings, the same command continues it (finished parts are
    skipped), other settings are refused unless --overwrite starts over. -> the settings to run with, the lock"""
    folder = Path(args.out)
    checkpoints = list(folder.glob("seed*/*/checkpoint-*.pt"))
    if args.resume and not checkpoints:
        fail(f"--resume: {folder} holds no run to continue")
    if checkpoints and not args.overwrite:
        saved = read_settings(folder)
        if args.resume:
            invocation = {key: getattr(args, key) for key in ("out", *INVOCATION)}
            args = argparse.Namespace(**{**saved, **invocation, "resume": True, "overwrite": False})
        elif args.precision == "auto":
            args.precision = saved["precision"]             # a run keeps the precision it started with
        differ = [f"--{key.replace('_', '-')} {saved[key]} (asked: {getattr(args, key)})"
                  for key in SETTINGS if saved[key] != getattr(args, key)]
        if differ:
            fail(f"{folder} holds a run with other settings: {', '.join(differ)}; "
                 f"use another --out, or --overwrite to start over")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        fail(f"cannot write to the output folder {folder}: {error.strerror}")
    lock = lock_folder(folder)
    for old in folder.glob("seed*/*/checkpoint-*.pt") if args.overwrite else []:
        old.unlink()                                         # asked for by --overwrite, under the lock
    return args, lock


def saved_settings(args):
    """What args.json keeps: every setting, never --resume or --overwrite (they say what to do, not what the run is)."""
    return {key: value for key, value in vars(args).items() if key not in ("resume", "overwrite")}


def read_settings(folder):
    """The settings in <folder>/args.json, beside its checkpoints; one line and status 2 when missing or damaged."""
    path = folder / "args.json"
    needed = (*SETTINGS, "aug", "augs", "baseline", "seeds", "seed_list", "data_dir", "recipe")
    try:
        saved = json.loads(path.read_text())
        missing = [key for key in needed if key not in saved]
    except (OSError, ValueError, TypeError) as error:
        fail(f"{path} is missing or damaged ({type(error).__name__}); it holds the settings of the run in {folder}, "
             f"so the run cannot continue: use another --out, or --overwrite to start over")
    if missing:
        fail(f"{path} lacks {', '.join(missing)}: it was written by another version of main.py; "
             f"use another --out, or --overwrite to start over")
    return saved


def lock_folder(folder):
    """Hold the run folder for this process's lifetime: a second process on it is refused (one line, status 2).
    -> the open lock file; closing it releases the lock."""
    lock = open(folder / "lock", "a+b")
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        lock.close()
        fail(f"{folder} is in use by another run of main.py; wait for it to end, or use another --out")
    return lock


def write_file(path, payload):
    """Write bytes durably and atomically (data.write_atomically: a temporary file of its own beside `path`, fsynced,
    then renamed), so a crash, a full disk or a second writer never leaves a torn file. A failure is one line and
    status 2; the file that was there is kept."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data.write_atomically(path, lambda file: file.write(payload))
    except OSError as error:
        fail(f"cannot write {path} ({error.strerror or error}); the last good copy, if any, is kept")


def json_bytes(obj):
    return (json.dumps(obj, indent=2) + "\n").encode()


def tensor_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def code_version():
    """Which code wrote the numbers: a hash of the five files, and the git commit when run from a checkout (marked
    '+changes' when those files differ from it)."""
    here = Path(__file__).resolve().parent
    files = [f"{name}.py" for name in ("data", "augment", "vae", "probe", "main")]
    digest = hashlib.sha256(b"".join((here / name).read_bytes() for name in files)).hexdigest()[:12]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=here, capture_output=True,
                                 text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = changed = ""
    return {"files_sha256": digest, "git_commit": commit + ("+changes" if commit and changed else "") or None}


CHECKPOINT_FORMAT = 2       # the layout save_checkpoint writes; another is refused with one line


def save_checkpoint(path, model, optimizer, generators, state):
    """All a loop needs to continue exactly: weights, optimizer, its generators, the global random stream (eps in
    reparameterize) and the CUDA one of the run's device, and the Ledger's state; written as write_file does."""
    device = next(model.parameters()).device
    write_file(path, tensor_bytes({
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "loop": state,
        "generators": [g.get_state() for g in generators], "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}))


def load_checkpoint(path, model, optimizer, generators):
    """Load what save_checkpoint wrote into the live objects, on this run's device. -> the Ledger's state (None
    without a checkpoint). Tensors and plain values only (weights_only): a file cannot run code. The optimizer keeps
    its own `capturable` (this run's device and --cuda-graph), whatever was saved."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved["loop"]
        layout = saved.get("format")
    except Exception as error:   # torch raises several types for a damaged or refused file
        fail(f"checkpoint {path} is truncated, unreadable or holds more than tensors ({type(error).__name__}); "
             f"delete it to redo that stage, or start over with --overwrite")
    if layout != CHECKPOINT_FORMAT:
        fail(f"checkpoint {path} was written by another version of main.py; use another --out, or --overwrite "
             f"to start over")
    device = next(model.parameters()).device
    model.load_state_dict(saved["model"])
    for group in saved["optimizer"]["param_groups"]:
        group["capturable"] = optimizer.defaults.get("capturable", False)   # load_state_dict places `step` by it
    optimizer.load_state_dict(saved["optimizer"])
    for generator, generator_state in zip(generators, saved["generators"]):
        generator.set_state(generator_state)
    torch.set_rng_state(saved["torch_rng"])
    if saved["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"], device)
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in state.items()}


# What a Ledger prints at an epoch's end, by the row's stage, and what to try when its loss diverges.
EPOCH_LINE = {"vae": "train loss {train_loss:.1f}, val loss {val_loss_clean:.1f} from clean, {val_loss_aug:.1f} "
                     "from augmented input",
              "probe": "loss {train_loss:.3f} train top-1 {train_top1:.1f}% val top-1 {val_top1:.1f}% top-5 {val_top5:.1f}%",
              "supervised": "loss {train_loss:.3f} train top-1 {train_top1:.1f}% (augmented) val top-1 "
                            "{val_top1:.1f}% top-5 {val_top5:.1f}%"}
DIVERGED_HINT = {"vae": "a lower --lr or --precision fp32", "probe": "a lower --probe-lr",
                 "supervised": "a lower --lr or --precision fp32"}


class Ledger:
    """The books of one training loop, kept where the loop does not see them: where it stands (epoch, step, the
    epoch's summed [loss, ...]), its checkpoint (loaded at the start, saved every epoch and on a signal), the stop
    signal, the NaN check, progress lines and the forecast. The loop calls it; it never calls the loop. The first
    generator orders the batches: a stop mid-epoch saves it as it was when the epoch began, so the resumed epoch
    draws the same order and skips the steps already taken."""

    def __init__(self, session, key, model, optimizer, generators, epochs, parts):
        seed, name, part = key
        self.session = session
        self.key = key
        self.epochs_total = epochs
        self.parts = parts                      # what each step's tensor holds, for the progress lines
        self.model = model
        self.optimizer = optimizer
        self.generators = generators
        self.path = session.folder / f"seed{seed}" / name / f"checkpoint-{part}.pt"
        self.title = {"vae": f"stage 1 [seed {seed}, {name}]", "network": f"control [seed {seed}, {name}]"}.get(
            part, f"stage 2 [seed {seed}, {name}, {part.removeprefix('probe-')}]")
        state = load_checkpoint(self.path, model, optimizer, generators) or \
            {"epoch": 0, "step": 0, "sums": None, "history": [], "seconds": 0.0}
        self.epoch = state["epoch"]
        self.step = state["step"]
        self.sums = state["sums"]
        self.history = state["history"]
        self.seconds = state["seconds"]
        self.steps = session.plan.start(key, self.epoch, self.step)     # steps per epoch, for the progress lines

    def epochs(self):
        """The epochs still to train, numbered from 0; each starts the clock and notes the batch order's state."""
        while self.epoch < self.epochs_total:
            self.order_state = self.generators[0].get_state()
            self.t_start = time.perf_counter()
            self.first_step = self.step
            yield self.epoch

    def add(self, parts):
        """Count one step's [loss, ...] (kept on the device); now and then print a progress line; on a signal save
        the checkpoint and stop."""
        self.sums = parts if self.sums is None else self.sums + parts
        self.step += 1
        self.session.plan.done(self.key)
        if self.session.plan.due() or STOP.is_set():         # reading the sums waits for the device: only now and then
            means = ", ".join(f"{name} {value:.1f}" for name, value in zip(self.parts, self.means()))
            self.session.plan.print(f"{self.title} epoch {self.epoch + 1}/{self.epochs_total} step {self.step}/"
                                    f"{self.steps} {means}")
        if STOP.is_set():
            self.seconds += time.perf_counter() - self.t_start
            self.generators[0].set_state(self.order_state)     # the resumed epoch draws this order again
            self.save()
            raise Interrupted

    def means(self):
        """The epoch's means so far of what `add` summed (this waits for the device); a NaN or infinite loss stops
        the run with status 3, keeping the last checkpoint."""
        values = (self.sums / self.step).tolist()
        check_finite(values[0], f"{self.title} epoch {self.epoch + 1}, by step {self.step}", self.path.parent,
                     DIVERGED_HINT["vae"])
        return values

    def end_epoch(self, row):
        """Close the epoch: check its loss, keep its row, save the checkpoint, print its line; stop on a signal."""
        stage = row["stage"]
        check_finite(row["train_loss"], f"{self.title} epoch {self.epoch + 1}", self.path.parent, DIVERGED_HINT[stage])
        seconds = time.perf_counter() - self.t_start
        self.session.plan.epoch_done(self.key, seconds, self.step - self.first_step)
        self.history = self.history + [row]
        self.epoch += 1
        self.step = 0
        self.sums = None
        self.seconds += seconds
        self.save()
        memory = f"; {peak_memory(self.session.device)}" if stage == "vae" else ""
        self.session.plan.print(f"{self.title} epoch {self.epoch}/{self.epochs_total} " + ("" if stage == "probe" else
                                "done: ") + EPOCH_LINE[stage].format(**row) + memory,
                                force=stage != "probe" or self.epoch == self.epochs_total)
        if STOP.is_set():
            raise Interrupted

    def save(self):
        save_checkpoint(self.path, self.model, self.optimizer, self.generators, {
            "epoch": self.epoch, "step": self.step, "sums": self.sums, "history": self.history, "seconds": self.seconds})


class Job(NamedTuple):
    kind: str               # what one unit of it is: "vae step", "supervised step", "probe epoch, <D> features"
    epochs: int
    units_per_epoch: int


def planned_jobs(args, sizes):
    """Every training loop the command runs, keyed as its checkpoint is, in run_seed's order: {(seed, run, part): Job}.
    sizes: {split: images}. A test checks that these are exactly the checkpoints a run writes."""
    steps = sizes["train"] // args.batch_size
    mu = f"probe epoch, {args.latent_dim} features"
    jobs = {}
    for seed in args.seed_list:
        for name in vae_names(args):
            jobs[(seed, name, "vae")] = Job("vae step", args.epochs, steps)
            jobs[(seed, name, "probe-mu")] = Job(mu, args.probe_epochs, 1)
        if args.baseline:
            jobs[(seed, "pixels", "probe-standardized")] = Job(f"probe epoch, {3 * args.image_size ** 2} features",
                                                               args.probe_epochs, 1)
            jobs[(seed, "random-encoder", "probe-standardized")] = Job(mu, args.probe_epochs, 1)
            jobs[(seed, "supervised", "network")] = Job("supervised step", args.epochs, steps)
    return jobs


class Plan:
    """How long the whole command still needs: the units of work left in every planned job (a stage-1 step, a ceiling
    step, a probe epoch on features of some width), each times the seconds one
    unit of its kind takes here, first from short trials (time_trials), then from the loops' own epochs. Also decides
    when a progress line is due."""

    def __init__(self, jobs, unit_seconds, log_every):
        self.jobs = jobs
        self.left = {key: job.epochs * job.units_per_epoch for key, job in jobs.items()}
        self.unit_seconds = unit_seconds      # kind -> seconds per unit: the trials' first, then measured
        self.measured = {}                    # kind -> (seconds, units) of the loops so far
        self.log_every = log_every
        self.last_line = time.perf_counter()

    def start(self, key, epoch, step):
        """A loop begins (or is found in a checkpoint) with `epoch` epochs and `step` steps done. -> units per epoch"""
        assert key in self.jobs, f"{key} runs, but planned_jobs does not count it: the forecast would miss it"
        job = self.jobs[key]
        self.left[key] = (job.epochs - epoch) * job.units_per_epoch - step
        return job.units_per_epoch

    def found_done(self, folder):
        """Count what the checkpoints in a continued run's folder say is done, before the first forecast."""
        for key in self.jobs:
            seed, name, part = key
            path = folder / f"seed{seed}" / name / f"checkpoint-{part}.pt"
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["loop"]
                self.start(key, state["epoch"], state["step"])
            except Exception:       # none yet, or one the Ledger will report in its own words
                pass

    def done(self, key):
        self.left[key] -= 1

    def epoch_done(self, key, seconds, steps):
        """An epoch of `key` took `seconds` (its `steps` steps, if it counts steps): from now on a unit of its kind
        costs what every unit of that kind measured so far took on average (one slow epoch does not swing the ETA)."""
        job = self.jobs[key]
        units = 1 if job.units_per_epoch == 1 else steps
        if job.units_per_epoch == 1:
            self.left[key] -= 1
        total_seconds, total_units = self.measured.get(job.kind, (0.0, 0))
        self.measured[job.kind] = (total_seconds + seconds, total_units + units)
        if total_units + units:
            self.unit_seconds[job.kind] = (total_seconds + seconds) / (total_units + units)

    def eta_seconds(self):
        return sum(left * self.unit_seconds[self.jobs[key].kind] for key, left in self.left.items())

    def forecast(self, slow):
        per_step = self.unit_seconds["vae step"] * 1000
        print(f"forecast: the whole command needs about {format_seconds(self.eta_seconds())} more on this machine "
              f"({per_step:.0f} ms per stage-1 step in a short trial; the ETA follows each finished epoch)", flush=True)
        if self.eta_seconds() > 3600 and slow:
            print("forecast: --image-size 32 --epochs 10 makes the same comparison in a fraction of this "
                  "(README, First steps)", flush=True)

    def due(self):
        return time.perf_counter() - self.last_line >= self.log_every

    def print(self, text, force=False):
        if force or self.due() or STOP.is_set():
            self.last_line = time.perf_counter()
            print(f"{text} | ETA {format_seconds(self.eta_seconds())}", flush=True)


def time_trials(session, args):
    """Seconds per unit of each kind of work the Plan counts, from a few units of each on throwaway networks and
    the first training images. The run's random streams are untouched (fork_rng, fresh generators)."""
    x_uint8, y = (tensor[:args.batch_size] for tensor in session.splits["train"])
    x_train, y_train = session.splits["train"]
    rows = min(len(y_train), max(len(y_train) // 8, 2 * args.batch_size))   # a probe epoch is timed on an eighth
    epoch_scale = len(y_train) / rows
    score_scale = (len(y_train) + len(session.splits["val"][1])) / rows
    generator = torch.Generator().manual_seed(0)
    devices = [session.device] if session.device.type == "cuda" else []
    seconds = {}
    with torch.random.fork_rng(devices=devices):
        model = vae.VAE(args.latent_dim, args.image_size).to(session.device, memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        seconds["vae step"] = timed(session.device, lambda: vae.train_step(
            model, optimizer, *augmented_batch(x_uint8, augment.crop, args.strength, generator), args.beta,
            session.autocast))
        network = probe.Supervised(model, probe.make_head(args.latent_dim, session.num_classes).to(session.device))
        optimizer = torch.optim.Adam(network.parameters(), lr=args.lr)
        seconds["supervised step"] = timed(session.device, lambda: probe.supervised_step(
            network, optimizer, augmented_batch(x_uint8, augment.crop, args.strength, generator)[1], y,
            session.autocast))
        for width, features in ((args.latent_dim, torch.randn(rows, args.latent_dim, device=session.device)),
                                (3 * args.image_size ** 2, probe.Features(x_train[:rows], lambda x: x.flatten(1)))):
            head = probe.make_head(width, session.num_classes).to(session.device)
            optimizer = torch.optim.Adam(head.parameters(), lr=args.probe_lr)
            train = timed(session.device, lambda: probe.train_epoch(
                head, optimizer, features, y_train[:rows], args.batch_size, generator), repeats=1)
            score = timed(session.device, lambda: probe.evaluate(head, features, y_train[:rows]), repeats=1)
            seconds[f"probe epoch, {width} features"] = train * epoch_scale + score * score_scale
    return seconds


def timed(device, work, repeats=5, warmup=2):
    """Seconds one call of work() takes, the mean of `repeats` calls after `warmup` (the GPU waited for)."""
    for _ in range(warmup):
        work()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    sync(device)
    return (time.perf_counter() - start) / repeats


def format_seconds(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


def peak_memory(device):
    """Peak memory so far, to show that it does not grow: this process's resident memory (where the OS tells it:
    Unix), and the GPU's."""
    text = f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB" if resource else ""
    if device.type == "cuda":
        text += f"{', ' if text else 'peak memory '}GPU {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB"
    return text or "peak memory not known on this system"


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


STOP = threading.Event()  # set by SIGINT/SIGTERM; the Ledger checks it after every step and epoch


class Interrupted(Exception):
    """Raised after a checkpoint has been saved in answer to SIGINT/SIGTERM."""


def fail(message, status=2):
    """Stop with one clear line on stderr and no traceback: status 2 for usage and input errors."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


def check_python(version=sys.version_info):
    if tuple(version[:2]) < MIN_PYTHON:
        fail(f"this program needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is {version[0]}.{version[1]}")


def check_finite(loss, where, folder, hint):
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


def exit_if_stopped():
    """A signal that came while the report was written let it finish; now the run stops as it would elsewhere."""
    if STOP.is_set():
        print("stopped by a signal; the report was finished first, and the run is complete", file=sys.stderr)
        raise SystemExit(130)


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
    M_TRIM_THRESHOLD = -1                               # from glibc's malloc.h
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)            # the largest glibc accepts on 64-bit systems
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


if __name__ == "__main__":
    main()
