"""
Run the paper's experiment end to end: learn an augmentation with a VAE, then probe what its encoder kept.

    python main.py --dataset shapes                  # the whole experiment offline, about 1.2 minutes on 2 CPU cores
    python main.py --dataset cifar10 --aug crop      # the paper's protocol (100 + 40 epochs, 64x64)
    python main.py --dataset cifar10 --recipe ours   # the best on validation within ~30 CPU minutes per VAE
    python main.py --dataset cifar10 --aug crop,rotate --seeds 0,1,2 --image-size 32 --epochs 10   # a sweep

Method (Rajagopalan 2021, "Learned Data Augmentation"), once per seed, in the order of this file:
    1. stage 1 (train_vae): for every batch, x_aug = augment(x); minimise -ELBO(decode(z), x) with z ~ q(z | x_aug)
       (vae.train_step): augmented in, clean out. First the baseline "none" (clean in, clean out), then each --aug;
    2. stage 2 (train_probe): freeze the encoder, train the paper's head on mu, report top-1/top-5;
    3. controls: the head on standardized pixels and on the untrained encoder; a supervised ceiling (train_supervised);
    4. measure (measure_augmentation): the share of each augmentation a VAE undoes, the mu shift, the label kept;
    5. report: results.md and results.json (mean +- std over seeds, paired gaps), reconstructions.png, curves.png.
A first reading may stop at `main`: the machinery after it changes nothing in the method. Ctrl-C saves a checkpoint,
and the same command continues the run (the Ledger's docstring tells it step by step). What seeds what, so that the
VAEs of a seed differ only in their augmentation, and which split each stage reads: README, "Reading order".

Axes: B batch, C channels, H/W height/width, D latent size, K classes.
"""
import argparse
import contextlib
import hashlib
import io
import json
import math
import platform
import shlex
import signal
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
    import fcntl            # Unix: the run folder's lock
except ImportError:         # Windows: its own
    import msvcrt
    fcntl = None

# Per data set: the paper's settings for real data (the batch size is ours); ours for the offline `shapes` run.
PAPER = dict(epochs=100, probe_epochs=40, image_size=64, batch_size=128, lr=1e-4, beta=1.0)
DEFAULTS = {"cifar10": PAPER, "tinyimagenet": PAPER,
            "shapes": dict(epochs=6, probe_epochs=40, image_size=32, batch_size=128, lr=1e-3, beta=0.1)}
# Named flag sets: "paper" is the defaults; "ours" the best validation top-1 we measured on CIFAR-10 within about 30
# CPU minutes per VAE (README, "What moves the result"): the paper's crop VAE at 64x64, stopped after 20 epochs.
RECIPES = {"paper": {}, "ours": dict(aug="crop", image_size=64, epochs=20)}
VAL_FRACTION = 0.1        # 45,000 / 5,000 for CIFAR-10
SPLIT_SEED = 0            # the validation split never changes with --seeds
MEASURE_IMAGES = 1000     # test images measured and pictured; validation images stage 1 scores every epoch
MEASURE_SEED = 12345      # one fixed draw of augmentations for every measurement and picture, so VAEs and epochs compare
SAMPLE_SEED = 54321       # one fixed draw of z ~ N(0, I) for the samples in reconstructions.png
CONTROLS = ("pixels", "random-encoder", "supervised")
SUPERVISED_AUG = "crop"   # the ceiling trains on random crops, the usual supervised recipe
# What a continued run shares with the run in its folder; more augmentations or seeds extend it.
SETTINGS = ("dataset", "strength", "epochs", "probe_epochs", "batch_size", "image_size", "lr", "probe_lr",
            "latent_dim", "beta", "limit", "precision")
# What runs write in a run folder: --overwrite deletes exactly these.
OUTPUTS = ("args.json", "results.json", "results.md", "reconstructions.png", "curves.png", "seed*/*/vae.pt",
           "seed*/*/probe.pt", "seed*/*/metrics.jsonl", "seed*/*/checkpoint-*.pt")
CHECKPOINT_FORMAT = 2       # the layout Ledger.save writes; another is refused with one line
CHECKPOINT_KEYS = {"model", "optimizer", "generators", "torch_rng", "cuda_rng", "loop"}
MAX_SEED = 2 ** 32 - 1

# -----------------------------------------------------------------------------
# Settings


def build_parser():
    # No abbreviated flags: the command printed on Ctrl-C drops --overwrite, and only its full name can be found.
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), allow_abbrev=False)

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
    p.add_argument("--out", default=None, help="run folder; the same command continues the run in it "
                   "(default: runs/<dataset>-<aug>-seed<seeds>[-<recipe>])")
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
    p.add_argument("--overwrite", action="store_true", help="start over in a run folder that holds a run: delete "
                   "its checkpoints, weights, metrics, results and pictures")
    p.add_argument("--recipe", default="paper", choices=sorted(RECIPES),
                   help="a named set of the flags above (see RECIPES); flags given explicitly win (default: paper)")
    return p


def parse_args(argv=None):
    p = build_parser()
    # The data set and the recipe set defaults, so they are read on their own first; then explicit flags win.
    first = p.parse_known_args(argv)[0]
    p.set_defaults(**DEFAULTS[first.dataset] | RECIPES[first.recipe])
    args = p.parse_args(argv)
    args.augs = parse_augmentations(args.aug)
    args.seed_list = parse_seeds(args.seeds)
    # A list keeps its commas and a mix its '+', so that `crop,rotate` and `crop+rotate` never share a folder.
    recipe = "" if args.recipe == "paper" else f"-{args.recipe}"
    seeds = "+".join(map(str, args.seed_list))
    args.out = args.out or f"runs/{args.dataset}-{','.join(args.augs) or 'none'}-seed{seeds}{recipe}"
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
    for name in ("epochs", "probe_epochs", "latent_dim", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.batch_size < 2:
        fail(f"--batch-size must be at least 2 (BatchNorm needs two images), got {args.batch_size}")
    if args.image_size < 32 or args.image_size % 32:
        fail(f"--image-size must be a positive multiple of 32 (five stride-2 layers), got {args.image_size}")
    if not vae_names(args):
        fail("--no-baseline leaves nothing to train: name an augmentation with --aug")
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
    ledger = Ledger(session, (seed, name, "vae"), model, optimizer, [batch_rng, aug_rng],
                    f"stage 1 [seed {seed}, {name}]", ("loss", "recon", "kl"), "a lower --lr or --precision fp32")
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
                          "train_recon": recon, "train_kl": kl, **scores},
                         f"done: train loss {loss:.1f}, val loss {scores['val_loss_clean']:.1f} from clean, "
                         f"{scores['val_loss_aug']:.1f} from augmented input")
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
    ledger = Ledger(session, (seed, name, f"probe-{features_name}"), head, optimizer, [order_rng],
                    f"stage 2 [seed {seed}, {name}, {features_name}]", ("loss",), "a lower --probe-lr")
    for epoch in ledger.epochs():
        probe.train_epoch(head, optimizer, features["train"], labels["train"], args.batch_size, order_rng)
        row = {"run": name, "head": features_name, "seed": seed, "stage": "probe", "epoch": epoch + 1}
        for split in ("train", "val"):
            row |= {f"{split}_{k}": v for k, v in probe.evaluate(head, features[split], labels[split]).items()}
        ledger.end_epoch(row, f"loss {row['train_loss']:.3f} train top-1 {row['train_top1']:.1f}% val top-1 "
                              f"{row['val_top1']:.1f}% top-5 {row['val_top5']:.1f}%", every_epoch=False)
    test = probe.evaluate(head, features["test"], labels["test"])    # read once, after the last epoch
    record = {key: value for key, value in ledger.history[-1].items() if key.startswith(("train_", "val_"))}
    record |= {f"test_{k}": v for k, v in test.items()}
    return head, record | {"probe": features_name, "probe_seconds": ledger.seconds}, ledger.history

# -----------------------------------------------------------------------------
# The supervised ceiling: the same encoder and head, trained end to end on the labels


def train_supervised(seed, args, session):
    """The ceiling: the VAEs' initial encoder up to mu and every probe's initial head, trained together on
    SUPERVISED_AUG inputs with the VAEs' optimizer, learning rate, epochs and batch order. -> record, history"""
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
    ledger = Ledger(session, (seed, "supervised", "network"), network, optimizer, [batch_rng, aug_rng],
                    f"control [seed {seed}, supervised]", ("loss", "top-1 %", "top-5 %"),
                    "a lower --lr or --precision fp32")
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
                          **{f"val_{k}": v for k, v in val.items()}},
                         f"done: loss {loss:.3f} train top-1 {top1:.1f}% (augmented) val top-1 {val['top1']:.1f}% "
                         f"top-5 {val['top5']:.1f}%")
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
    """On the images x, for the baseline and the `aug` VAE: x_hat's error from x and from x_aug, what x_aug does to mu
    and to the probe (probe.invariance), and the share of the augmentation the `aug` VAE undoes (vae.undone_share)."""
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
    histories: dict        # run name -> per-epoch rows (a VAE's stage 1, then its probe; each control's own)


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
        _, controls[name], result.histories[name] = train_probe(name, "standardized", features, seed, args, session)
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


def write_results(folder, args, records, wall_seconds):
    """results.json (every record, with the settings, code version, machine and wall time) and results.md."""
    version = code_version()
    write_file(folder / "results.json", {
        "args": {key: value for key, value in vars(args).items() if key != "overwrite"}, "code": version,
        "precision": args.precision, "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.platform(), "threads": torch.get_num_threads(), "wall_seconds_last_invocation": wall_seconds,
        "records": records})
    rows = {"all": vae_names(args) + (list(CONTROLS) if args.baseline else []), "augs": args.augs}
    tables = [(title, intro, probe.markdown_table(records, rows[which], columns))
              for title, intro, which, columns in TABLES if which == "all" or args.baseline]   # 2 and 3 need 'none'
    sections = [f"# {args.dataset}, {args.image_size}x{args.image_size}, {args.epochs} VAE epochs (lr {args.lr:g}, "
                f"beta {args.beta:g}, strength {args.strength:g}), {args.probe_epochs} probe epochs, seeds {args.seeds} "
                f"(mean +- std over n seeds)\n\ncode {version['git_commit'] or 'outside git'}, files "
                f"{version['files_sha256']}; torch {torch.__version__}, {args.precision}"]
    sections += [f"## {title}\n\n" + (f"{intro}\n\n" if intro else "") + table for title, intro, table in tables]
    gaps = "\n".join(probe.paired_gap(records, aug) for aug in args.augs) if args.baseline else ""
    if gaps:
        sections.insert(2, gaps.replace("\n", "\n\n"))        # right below the probe table
    write_file(folder / "results.md", "\n\n".join(sections) + "\n")
    print(f"\n{tables[0][2]}\n(n: seeds per row; every table in {folder / 'results.md'})\n{gaps}")


def save_trained(folder, seed, result):
    """seed<k>/<run>/: every run's metrics.jsonl (a line per epoch); each VAE's vae.pt and probe.pt (CPU state_dicts)."""
    for name, history in result.histories.items():
        write_file(folder / f"seed{seed}" / name / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    for name, model in result.vaes.items():
        for file, network in (("vae.pt", model), ("probe.pt", result.heads[name])):
            write_file(folder / f"seed{seed}" / name / file, {k: v.cpu() for k, v in network.state_dict().items()})

# -----------------------------------------------------------------------------
# The experiment, start to end


def main(argv=None):
    t_start = time.perf_counter()
    if sys.version_info < (3, 10):
        fail(f"this program needs Python 3.10 or newer; this is {'.'.join(map(str, sys.version_info[:3]))}")
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        device = vae.pick_device(args.device)
    except ValueError as error:
        fail(str(error))
    vae.tune_allocator()
    with exits_cleanly(argv), run_folder(args) as folder:     # start, continue or refuse; the folder is held
        args.precision, reason = vae.pick_precision(args.precision, device, args.image_size)
        print(f"{device}, {args.precision}: {reason}", flush=True)
        splits, num_classes = load_data(args, device)
        write_file(folder / "args.json", {key: value for key, value in vars(args).items() if key != "overwrite"})
        session = start_session(args, folder, device, splits, num_classes)
        stop_between_steps()
        records = []
        for seed in args.seed_list:
            result = run_seed(seed, args, session)
            save_trained(folder, seed, result)
            records += result.records
            if seed == args.seed_list[0]:
                pictured = result                   # the pictures show the first seed's runs
        write_results(folder, args, records, time.perf_counter() - t_start)
        x_measure = data.to_float(splits["test"][0][:MEASURE_IMAGES])
        x_augs = {aug: fixed_draw(aug, x_measure, args.strength) for aug in pictured.vaes if aug != "none"}
        with session.autocast:                      # the draws the undo table measured
            sheet = vae.reconstruction_rows(pictured.vaes, x_measure, x_augs, SAMPLE_SEED)
        write_file(folder / "reconstructions.png", data.save_grid(*sheet))
        probe_rows = {name: [row for row in rows if row["stage"] != "vae"] for name, rows in pictured.histories.items()}
        write_file(folder / "curves.png", probe.draw_curves(probe_rows))
        print(f"wrote {folder}/: results.md, results.json, reconstructions.png, curves.png, seed*/<run>/", flush=True)
        if STOP.is_set():                           # a signal while the report was written let it finish
            print("stopped by a signal after the report was written; the run is complete", file=sys.stderr)
            raise SystemExit(130)

# -----------------------------------------------------------------------------
# Machinery: the run folder and its files, the Ledger that keeps each loop's books, the forecast, errors and signals


class Session(NamedTuple):
    """What one invocation settles once and every stage reads."""
    folder: Path
    device: torch.device
    autocast: object        # the precision's autocast (a no-op for fp32), entered around every forward pass
    graphed: bool           # stage 1 replays its step as a CUDA graph (--cuda-graph on a GPU)
    splits: dict            # {split: (uint8 images (N, 3, H, W), int64 labels (N,))} on the device
    num_classes: int
    forecast: "Forecast"


def start_session(args, folder, device, splits, num_classes):
    """Settle the run's autocast, CUDA graph and forecast: what the checkpoints leave to do, timed in short trials."""
    forecast = Forecast(planned_loops(args, len(splits["train"][1])), folder, args.log_every)
    graphed = args.cuda_graph and device.type == "cuda"
    autocast = vae.autocast_context(device, args.precision)
    session = Session(folder, device, autocast, graphed, splits, num_classes, forecast)
    left = {kind for kind, units in forecast.left.items() if units}      # the kinds of work still to do
    forecast.rate = time_trials(session, args, left)
    trial = f" ({forecast.rate['vae step'] * 1000:.0f} ms per stage-1 step in a trial)" if "vae step" in left else ""
    print(f"forecast: the whole command needs about {format_seconds(forecast.seconds_left())} more on this "
          f"machine{trial}; the ETA follows each finished epoch", flush=True)
    return session


@contextlib.contextmanager
def run_folder(args):
    """Lock the run folder (one process works in it at a time), then start over, continue or refuse. --overwrite
    deletes the files runs write (OUTPUTS) and the run folders left empty. Once a checkpoint exists, the same command
    continues the run, more --aug or --seeds extend it, other SETTINGS than args.json's are refused."""
    folder = Path(args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / "lock", "a+b")
    except OSError as error:
        fail(f"cannot write to the output folder {folder}: {error.strerror}")
    with lock:
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            fail(f"{folder} is in use by another run of main.py; wait for it to end, or use another --out")
        if args.overwrite:
            try:
                for path in [path for pattern in OUTPUTS for path in folder.glob(pattern)]:
                    path.unlink()
                for path in [*folder.glob("seed*/*"), *folder.glob("seed*")]:      # the deeper first
                    if path.is_dir() and not any(path.iterdir()):
                        path.rmdir()
            except OSError as error:
                fail(f"--overwrite cannot delete {error.filename} ({error.strerror})")
        elif any(folder.glob("seed*/*/checkpoint-*.pt")):
            path = folder / "args.json"
            try:
                saved = json.loads(path.read_text())
                saved = {key: saved[key] for key in SETTINGS}
            except (OSError, ValueError, TypeError, KeyError) as error:
                fail(f"{path} is missing, damaged or written by another version of main.py ({type(error).__name__}):"
                     f" the run in {folder} cannot continue without it; use another --out, or --overwrite to start over")
            args.precision = saved["precision"] if args.precision == "auto" else args.precision    # the run's own
            differ = [f"--{key.replace('_', '-')} {value} (asked: {getattr(args, key)})"
                      for key, value in saved.items() if value != getattr(args, key)]
            if differ:
                fail(f"{folder} holds a run with other settings: {', '.join(differ)}; use another --out, or "
                     f"--overwrite to start over")
        yield folder


def write_file(path, content):
    """Write content as the name says (.pt torch.save, .png PNG, .json JSON, else text) with data.write_atomically, so
    a crash, a full disk or a second writer never leaves a torn file; a failure is one line, the old file kept."""
    buffer = io.BytesIO()                       # serialized whole first: torch.save on a full disk is no OSError
    if path.suffix == ".pt":
        torch.save(content, buffer)
    elif path.suffix == ".png":
        content.save(buffer, "PNG")
    else:
        buffer.write((json.dumps(content, indent=2) + "\n" if path.suffix == ".json" else content).encode())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data.write_atomically(path, lambda file: file.write(buffer.getvalue()))
    except OSError as error:
        fail(f"cannot write {path} ({error.strerror or error}); the last good copy, if any, is kept")


def code_version():
    """Which code wrote the numbers: a hash of the five files; the git commit, '+changes' if they differ from it."""
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


def checkpoint_path(folder, key):
    seed, name, part = key
    return folder / f"seed{seed}" / name / f"checkpoint-{part}.pt"


def read_checkpoint(path, mmap=False):
    """What a Ledger saved at `path`, None where nothing is. Tensors and plain values only (weights_only): a file
    cannot run code. A damaged file, or one of another layout, is one line and status 2."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:   # torch raises several types for a damaged or refused file
        fail(f"checkpoint {path} is truncated, unreadable or holds more than tensors ({type(error).__name__}); "
             f"delete it to redo that stage, or start over with --overwrite")
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT or not CHECKPOINT_KEYS <= saved.keys():
        fail(f"checkpoint {path} was written by another version of main.py; use another --out, or --overwrite")
    return saved


class Ledger:
    """The books of one training loop, kept out of its sight: where it stands (epoch, step, the epoch's summed
    [loss, ...]), its checkpoint, the NaN check, progress lines and the forecast. The loop calls it, never the reverse.

    Stop and continue, step by step (stage 1 and the ceiling; a probe stops at the end of its epoch):
    1. Ctrl-C or SIGTERM only sets STOP (stop_between_steps); the step under way finishes.
    2. `add` sees STOP: it puts the batch-order generator (generators[0]) back where it stood when the epoch began,
       leaves the augmentation generator and the global stream (eps) as they are, saves the checkpoint (weights, Adam,
       generators, random states, epoch, step, sums), then raises KeyboardInterrupt; `main` prints how to continue.
    3. That command: a new Ledger loads the checkpoint into the fresh model, optimizer and generators.
    4. The epoch draws the same batch order again and skips the `step` batches done (shuffled_batches(skip=step));
       augmentations and eps go on where they stopped: the steps of an uninterrupted run, on the CPU to the bit."""

    def __init__(self, session, key, model, optimizer, generators, title, parts, hint):
        assert key in session.forecast.loops, f"{key} runs, but planned_loops does not count it: the forecast misses it"
        self.forecast = session.forecast
        self.kind, self.epochs_total, self.steps = session.forecast.loops[key]     # as planned; steps per epoch
        self.device = session.device
        self.model = model
        self.optimizer = optimizer
        self.generators = generators
        self.title = title                      # the loop's own words: its name in progress lines,
        self.parts = parts                      # what each step's tensor holds,
        self.hint = hint                        # and what to try when its loss diverges
        self.path = checkpoint_path(session.folder, key)
        saved = read_checkpoint(self.path)
        loop = self.load(saved) if saved else {"epoch": 0, "step": 0, "sums": None, "history": [], "seconds": 0.0}
        self.epoch = loop["epoch"]
        self.step = loop["step"]
        self.sums = loop["sums"]
        self.history = loop["history"]
        self.seconds = loop["seconds"]

    def epochs(self):
        """The epochs still to train, numbered from 0; each notes the batch order's state and starts the clock."""
        while self.epoch < self.epochs_total:
            self.order_state = self.generators[0].get_state()
            self.t_start = time.perf_counter()
            self.first_step = self.step
            yield self.epoch

    def add(self, parts):
        """Count one step's [loss, ...], a tensor on the device; print a progress line when due; stop on a signal."""
        self.sums = parts if self.sums is None else self.sums + parts
        self.step += 1
        if self.forecast.due() or STOP.is_set():         # reading the sums waits for the device: only now and then
            means = ", ".join(f"{name} {value:.1f}" for name, value in zip(self.parts, self.means()))
            self.forecast.print(f"{self.title} epoch {self.epoch + 1}/{self.epochs_total} "
                                f"step {self.step}/{self.steps} {means}")
        if STOP.is_set():
            self.seconds += time.perf_counter() - self.t_start
            self.generators[0].set_state(self.order_state)
            self.save()
            raise KeyboardInterrupt

    def means(self):
        """The epoch's means so far of what `add` summed (this waits for the device), the loss checked."""
        values = (self.sums / self.step).tolist()
        self.check_finite(values[0], f"epoch {self.epoch + 1}, by step {self.step}")
        return values

    def end_epoch(self, row, line, every_epoch=True):
        """Check the loss, keep the row, save, print `line` (or, not every_epoch, when due and after the last)."""
        self.check_finite(row["train_loss"], f"epoch {self.epoch + 1}")
        seconds = time.perf_counter() - self.t_start
        self.history = self.history + [row]
        self.epoch += 1
        self.step = 0
        self.sums = None
        self.seconds += seconds
        self.forecast.epoch_done(self.kind, seconds, self.steps - self.first_step)
        self.save()
        self.forecast.print(f"{self.title} epoch {self.epoch}/{self.epochs_total} {line}",
                            force=every_epoch or self.epoch == self.epochs_total)
        if STOP.is_set():
            raise KeyboardInterrupt

    def check_finite(self, loss, where):
        """A NaN or infinite loss stops the run with status 3; the last checkpoint (the previous epoch's) is kept."""
        if not math.isfinite(loss):
            fail(f"{self.title} {where}: diverged, the loss is {loss}. The last good checkpoint is kept in "
                 f"{self.path.parent}; try {self.hint}", 3)

    def save(self):
        """All the loop needs to go on exactly: weights, optimizer, generators, random streams, where it stands."""
        write_file(self.path, {
            "format": CHECKPOINT_FORMAT, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "generators": [g.get_state() for g in self.generators], "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "loop": {"epoch": self.epoch, "step": self.step, "sums": self.sums, "history": self.history,
                     "seconds": self.seconds}})

    def load(self, saved):
        """Put a checkpoint into the live objects, on this run's device. -> where the loop stands"""
        self.model.load_state_dict(saved["model"])
        for group in saved["optimizer"]["param_groups"]:
            group["capturable"] = self.optimizer.defaults.get("capturable", False)   # load_state_dict places `step` by it
        self.optimizer.load_state_dict(saved["optimizer"])
        for generator, generator_state in zip(self.generators, saved["generators"]):
            generator.set_state(generator_state)
        torch.set_rng_state(saved["torch_rng"])
        if saved["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        return {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in saved["loop"].items()}


def planned_loops(args, train_images):
    """Every training loop the command runs, keyed as its checkpoint: {(seed, run, part): (kind, epochs, units per
    epoch)}, a unit being a step of stage 1 or the ceiling, an epoch of a probe (tested against a run's checkpoints)."""
    steps = train_images // args.batch_size
    loops = {}
    for seed in args.seed_list:
        for name in vae_names(args):
            loops[(seed, name, "vae")] = ("vae step", args.epochs, steps)
            loops[(seed, name, "probe-mu")] = ("probe epoch, mu", args.probe_epochs, 1)
        if args.baseline:
            loops[(seed, "pixels", "probe-standardized")] = ("probe epoch, pixels", args.probe_epochs, 1)
            loops[(seed, "random-encoder", "probe-standardized")] = ("probe epoch, mu", args.probe_epochs, 1)
            loops[(seed, "supervised", "network")] = ("supervised step", args.epochs, steps)
    return loops


class Forecast:
    """How long the command still needs: per kind of work, the planned units the checkpoints do not count as done, at
    the seconds per unit of a short trial, then of all units of that kind measured. It also paces the progress lines."""

    def __init__(self, loops, folder, log_every):
        self.loops = loops
        self.left = {}                        # kind -> units still to do
        for key, (kind, epochs, per_epoch) in loops.items():
            saved = read_checkpoint(checkpoint_path(folder, key), mmap=True) or {"loop": {"epoch": 0, "step": 0}}
            done = saved["loop"]["epoch"] * per_epoch + saved["loop"]["step"]     # as the loop's Ledger will find it
            self.left[kind] = self.left.get(kind, 0) + epochs * per_epoch - done
        self.rate = {}                        # kind -> seconds per unit: the trial's, then the mean measured
        self.spent = {}                       # kind -> [seconds, units] measured so far
        self.log_every = log_every
        self.last_line = time.perf_counter()

    def epoch_done(self, kind, seconds, units):
        """An epoch of work of `kind` ended: `units` units of it (the rest was done before a stop) in `seconds`."""
        self.left[kind] -= units
        spent = self.spent.setdefault(kind, [0.0, 0])
        spent[0] += seconds
        spent[1] += units
        if spent[1]:
            self.rate[kind] = spent[0] / spent[1]

    def seconds_left(self):
        return sum(units * self.rate[kind] for kind, units in self.left.items() if units)

    def due(self):
        return time.perf_counter() - self.last_line >= self.log_every

    def print(self, text, force=False):
        if force or self.due() or STOP.is_set():
            self.last_line = time.perf_counter()
            print(f"{text} | ETA {format_seconds(self.seconds_left())}", flush=True)


def time_trials(session, args, kinds):
    """Seconds per unit of each kind in `kinds`: the mean of three on throwaway networks and the first training images,
    after one untimed (a probe epoch on an eighth of the images, scaled up). The run's random streams are untouched."""
    x_train, y_train = session.splits["train"]
    x_uint8, y = x_train[:args.batch_size], y_train[:args.batch_size]
    rows = min(len(y_train), max(len(y_train) // 8, 2 * args.batch_size))
    generator = torch.Generator().manual_seed(0)

    def probe_epoch(features):                 # a head trained an epoch on `rows` rows and scored on them
        head = probe.make_head(features[:1].shape[1], session.num_classes).to(session.device)
        optimizer = torch.optim.Adam(head.parameters(), lr=args.probe_lr)
        return lambda: (probe.train_epoch(head, optimizer, features, y_train[:rows], args.batch_size, generator),
                        probe.evaluate(head, features, y_train[:rows]))
    seconds = {}
    with torch.random.fork_rng(devices=[session.device] if session.device.type == "cuda" else []):
        head = probe.make_head(args.latent_dim, session.num_classes).to(session.device)
        network = probe.Supervised(new_vae(0, args, session.device), head)    # Adam skips what a step leaves alone
        adam = torch.optim.Adam(network.parameters(), lr=args.lr)
        trials = {"vae step": lambda: vae.train_step(network.encoder, adam, *augmented_batch(
                      x_uint8, augment.crop, args.strength, generator), args.beta, session.autocast),
                  "supervised step": lambda: probe.supervised_step(network, adam, augmented_batch(
                      x_uint8, augment.crop, args.strength, generator)[1], y, session.autocast),
                  "probe epoch, mu": probe_epoch(torch.randn(rows, args.latent_dim, device=session.device)),
                  "probe epoch, pixels": probe_epoch(probe.Features(x_train[:rows], lambda x: x.flatten(1)))}
        for kind in kinds:
            trials[kind]()                     # untimed: caches, allocator, lazy initialisation
            vae.sync(session.device)
            start = time.perf_counter()
            for _ in range(3):
                trials[kind]()
            vae.sync(session.device)
            seconds[kind] = (time.perf_counter() - start) / 3 * (len(y_train) / rows if "probe" in kind else 1)
    return seconds


def format_seconds(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.1f} min"


STOP = threading.Event()  # set by SIGINT/SIGTERM once training has begun; the Ledger reads it after every step


def fail(message, status=2):
    """Stop with one clear line on stderr and no traceback: status 2 for usage and input errors."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(status)


@contextlib.contextmanager
def exits_cleanly(argv):
    """A data problem ends in one line and status 2. A signal ends in status 130: at once before training, with
    nothing to save; from stop_between_steps on, once a Ledger has saved, with the command that continues the run (argv
    without --overwrite). On the way out the signal handlers are restored and STOP is cleared."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in handlers:
        signal.signal(sig, signal.default_int_handler)        # raises KeyboardInterrupt, for SIGTERM too
    try:
        yield
    except data.DataError as error:
        fail(str(error))
    except KeyboardInterrupt:   # before training, the signal's own; from then on a Ledger's, once it has saved
        if STOP.is_set():
            command = shlex.join(["python", "main.py", *[arg for arg in argv if arg != "--overwrite"]])
            print(f"\nstopped by a signal; the checkpoint is saved. Continue with the same command:\n  {command}",
                  file=sys.stderr)
        else:
            print("\nstopped by a signal before training began; nothing to save", file=sys.stderr)
        raise SystemExit(130)   # 128 + SIGINT, the shell's convention
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        STOP.clear()


def stop_between_steps():
    """From now on SIGINT/SIGTERM only set STOP: the step finishes and its Ledger saves; a second stops at once."""
    def request_stop(signum, frame):
        STOP.set()
        signal.signal(signum, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, request_stop)


if __name__ == "__main__":
    main()
