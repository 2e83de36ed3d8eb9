"""
Stage 2: measure what the frozen encoder learned, with a small classifier ("probe") on its features.

Protocol (Rajagopalan 2021, the paper's evaluation): freeze the VAE's encoder; the feature of an image is the
posterior mean mu = encode(x)[0], not a sample z; train the paper's head on top of it:

    logits = ReLU(BN(W2 . tanh(BN(W1 . mu))))      W1: D -> 32,  W2: 32 -> K
    loss   = cross-entropy(logits, y),  Adam, learning rate 1e-4, ~40 epochs

and report top-1 and top-5 accuracy on train and validation after every epoch, and on test once, after the
head's last epoch (nothing is chosen on the test set). We keep the paper's head as it is, including its odd final
ReLU: it clips every negative logit to 0, so a class can only win by a positive logit, and a class whose logit
turns negative for every image gets no gradient again (a "dead" class; tests/test_probe.py shows, on five
separable clusters, a class whose logit is clipped to 0 on every one of its own images). `dead_classes` counts
them and `make_head(..., final_relu=False)` is the same head without that ReLU; main.py runs neither (on CIFAR-10
and Tiny ImageNet both changed nothing, README). The encoder is frozen, so mu is computed once for every image
and the head trains on the cached (N, D) tensor. Controls (ours):
the same head on raw pixels and on an untrained encoder's mu, both standardized with the train split's statistics
(the untrained mu spreads by ~1e-3, below BatchNorm's epsilon), and a ceiling, `Supervised`: the encoder up to mu
and the head trained end to end on the labels, one `supervised_step` at a time. Raw pixels are standardized
batch by batch (`Features`), since a float copy of Tiny ImageNet's would not fit a laptop. `latent_shift` and
`invariance` measure what an augmentation does to mu and to the probe's answer; `markdown_table` shows every
run's numbers as mean +- std over seeds and `paired_gap` compares a VAE's probe with the baseline's seed by seed
(a paired t-test); `draw_curves` plots the heads'
per-epoch numbers (the paper's Figures 5-7). main.py drives the epochs (it checkpoints every one) and owns the
autocast; this file never imports vae.py, it takes any model with an `encode` method.

Axes: B batch, N images, D feature size, K classes.
"""
import math
import statistics

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data

HIDDEN = 32             # the paper's head width
EVAL_BATCH = 10_000     # rows per forward pass when scoring: one CIFAR-10 or Tiny ImageNet test set
PIXEL_BLOCK = 1024      # pixel columns standardized at a time: a float copy of 1,024 columns, not of all
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]     # one per run in the learning curves (matplotlib's tab10 order)
# Two-sided 5% critical values of Student's t for 1-30 degrees of freedom (any statistics table); beyond 30 the
# value for 30 is used, which only makes the test a little stricter.
T_CRITICAL = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
              2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)

# -----------------------------------------------------------------------------
# Frozen features


@torch.no_grad()
def extract_features(model, x, batch_size):
    """mu for every image: uint8 (N, 3, H, W) on the model's device -> float32 (N, D)."""
    model.eval()                   # BatchNorm uses its running statistics, not the batch's
    model.requires_grad_(False)    # the encoder is frozen: nothing here will ever be trained
    features = []
    for x_batch in x.split(batch_size):
        mu, _ = model.encode(data.to_float(x_batch))                 # (B, D)
        features.append(mu.float())
    return torch.cat(features)                                       # (N, D) float32


class Features:
    """Features made batch by batch from uint8 images (N, 3, H, W), for sets too large to keep as float32:
    features[index] = make(images[index] as float in [0, 1]). Anything here that reads features reads it so."""

    def __init__(self, x_uint8, make):
        self.x_uint8, self.make = x_uint8, make

    def __len__(self):
        return len(self.x_uint8)

    def __getitem__(self, index):
        return self.make(data.to_float(self.x_uint8[index]))       # (B, ...) features of those images


def standardize(features):
    """Per feature, subtract the train split's mean and divide by its std: {split: (N, D)} -> same shapes."""
    mean, std = features["train"].mean(0), features["train"].std(0).clamp(min=1e-6)   # (D,), (D,)
    return {split: (f - mean) / std for split, f in features.items()}


def standardized_pixels(images):
    """The raw-pixel control: every image flattened, each pixel standardized as `standardize` does, made batch by
    batch: {split: uint8 (N, 3, H, W)} -> {split: Features of (B, 3 * H * W)}. For Tiny ImageNet a float32 copy
    of all pixels would take 5.4 GB (110,000 x 12,288 x 4 bytes); the mean and std go a block of columns at a time."""
    flat = images["train"].flatten(1)                                # (N, 3 * H * W) uint8
    means, stds = [], []
    for start in range(0, flat.shape[1], PIXEL_BLOCK):               # (N, PIXEL_BLOCK) float32 at a time
        block = data.to_float(flat[:, start:start + PIXEL_BLOCK])
        means.append(block.mean(0))
        stds.append(block.std(0))
    mean, std = torch.cat(means), torch.cat(stds).clamp(min=1e-6)    # (3 * H * W,) each
    return {split: Features(x, lambda x_float: (x_float.flatten(1) - mean) / std) for split, x in images.items()}


def latent_shift(mu, mu_aug):
    """How far an augmentation moves mu, relative to the distance between two different images:
    mean ||mu_aug_i - mu_i|| / mean ||mu_i - mu_(i+1)||. 0: invariant; 1: as far as another image."""
    moved = (mu_aug - mu).norm(dim=1).mean()                     # (N, D) -> scalar
    typical = (mu - mu.roll(1, dims=0)).norm(dim=1).mean()       # image i against image i - 1
    return (moved / typical).item()


def invariance(head, mu, mu_aug, y):
    """What an augmentation does to the frozen encoder: how far it moves mu, and the probe's top-1 on the clean
    images (mu) and on their augmented views (mu_aug)."""
    return {"latent_shift": latent_shift(mu, mu_aug), "top1_on_clean": evaluate(head, mu, y)["top1"],
            "top1_on_aug": evaluate(head, mu_aug, y)["top1"]}

# -----------------------------------------------------------------------------
# The head, the supervised ceiling, and how they are scored


def make_head(feature_dim, num_classes, final_relu=True):
    """The paper's probe: Linear -> 32, BatchNorm, Tanh; Linear -> K, BatchNorm, ReLU (or without that ReLU)."""
    layers = [nn.Linear(feature_dim, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(),
              nn.Linear(HIDDEN, num_classes), nn.BatchNorm1d(num_classes)]
    return nn.Sequential(*layers, *([nn.ReLU()] if final_relu else []))


class Supervised(nn.Module):
    """The supervised ceiling: an encoder's mu, then the paper's head, both trained on the labels.
    (B, 3, H, W) float in [0, 1] -> logits (B, K)"""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x):
        mu, _ = self.encoder.encode(x)                   # (B, D)
        return self.head(mu)                             # (B, K)


def supervised_step(network, optimizer, x_aug, y, autocast):
    """One step of the ceiling: cross-entropy of the head on the encoder's mu, from an augmented batch.
    -> float32 tensor [loss, top-1 %, top-5 %] (3,) on the device (the caller sums it)."""
    with autocast:
        logits = network(x_aug).float()                          # (B, K)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    hits = logits.detach().topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]     # (B, 5)
    return torch.stack([loss.detach(), 100 * hits[:, 0].float().mean(), 100 * hits.any(dim=1).float().mean()])


def topk_accuracy(logits, y, k):
    """Percent of rows whose label is among the k largest logits. (N, K), (N,) -> float"""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices                  # (N, k)
    return 100.0 * (top == y[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def predict(head, features, batch_size=EVAL_BATCH):
    """The head's float32 logits in eval mode for every row of features (a tensor or Features). -> (N, K)"""
    head.eval()
    starts = range(0, len(features), batch_size)
    return torch.cat([head(features[start:start + batch_size]).float() for start in starts])   # (N, K)


def evaluate(head, features, y, batch_size=EVAL_BATCH):
    """Cross-entropy, top-1 and top-5 of the head in eval mode on features (N, D)."""
    logits = predict(head, features, batch_size)         # (N, K)
    return {"loss": F.cross_entropy(logits, y).item(),
            "top1": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5)}


def dead_classes(head, features):
    """How many classes get a logit of 0 from the final ReLU on every image: such a class never wins, and
    its logit gets no gradient again."""
    return int((predict(head, features).amax(dim=0) <= 0).sum())

# -----------------------------------------------------------------------------
# One epoch of training


def train_epoch(head, optimizer, features, y, batch_size, generator):
    """One pass over the cached features in a random order (the last incomplete batch is dropped).
    -> the epoch's mean training loss (read once, at the end: it waits for the device)."""
    head.train()
    order = torch.randperm(len(y), generator=generator).to(y.device)            # (N,)
    batches = order[: len(y) // batch_size * batch_size].split(batch_size)     # (B,) each
    total = torch.zeros((), device=y.device)
    for idx in batches:
        loss = F.cross_entropy(head(features[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return total.item() / len(batches)

# -----------------------------------------------------------------------------
# Comparing runs over seeds: tables of mean +- std, and a run against the baseline seed by seed


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


def paired_gap(records, aug):
    """The gap in test top-1 between `aug` and the baseline, seed by seed (a seed's VAEs share weights and batch
    order, so they are pairs): the mean and std of the differences, how many agree in sign, and a paired t-test,
    t = mean / (std / sqrt(n)) against the two-sided 5% critical value for n - 1 degrees of freedom."""
    top1 = {name: {r["seed"]: r["test_top1"] for r in records if r["name"] == name} for name in (aug, "none")}
    differences = [top1[aug][seed] - top1["none"][seed] for seed in top1[aug] if seed in top1["none"]]
    n = len(differences)
    mean = statistics.mean(differences)
    line = f"{aug} - none, paired by seed: {mean:+.1f} points of test top-1"
    if n < 2:
        return f"{line}, one seed: no test (--seeds 0,1,2 gives one)"
    std = statistics.stdev(differences)
    agree = sum(d * mean > 0 for d in differences)
    t = mean / (std / math.sqrt(n)) if std > 0 else math.copysign(math.inf, mean) if mean else 0.0
    critical = T_CRITICAL[min(n - 1, len(T_CRITICAL)) - 1]
    verdict = "a real difference at the 5% level" if abs(t) > critical else "not distinguishable from chance at 5%"
    return (f"{line} (std {std:.1f}, {agree} of {n} seeds agree in sign); paired t = {t:.2f}, two-sided 5% critical "
            f"value {critical} for {n - 1} df: {verdict}")

# -----------------------------------------------------------------------------
# Learning curves


def draw_curves(histories):
    """Per-epoch top-1, top-5 and loss of each run's head (train thin, validation thick) in three panels, as a
    picture: {run: [row, ...]} with rows as the training loops write them (epoch, train_top1, val_top1, ...).
    Colours repeat from the ninth run on; the legend names each run in its curve's colour. -> PIL.Image"""
    font, panel_w, panel_h, margin = ImageFont.load_default(), 360, 260, 48
    sheet = Image.new("RGB", (3 * panel_w, panel_h + 14 + 14 * ((len(histories) + 2) // 3)), "white")
    draw = ImageDraw.Draw(sheet)
    epochs = max(r["epoch"] for h in histories.values() for r in h)
    for p, (metric, label) in enumerate((("top1", "top-1 (%)"), ("top5", "top-5 (%)"), ("loss", "cross-entropy"))):
        x0, y0, x1, y1 = p * panel_w + margin, 20, (p + 1) * panel_w - 12, panel_h - 30
        values = [r[f"{split}_{metric}"] for h in histories.values() for r in h for split in ("train", "val")]
        low, high = min(values), max(values)
        high = high if high > low else low + 1

        def to_xy(epoch, value):
            return x0 + (x1 - x0) * (epoch - 1) / max(epochs - 1, 1), y1 - (y1 - y0) * (value - low) / (high - low)
        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.text((x0, 4), label, "black", font)
        for i in range(5):                                                 # five ticks on each axis
            value, epoch = low + (high - low) * i / 4, round(1 + (epochs - 1) * i / 4)
            draw.text((x0 - 44, to_xy(1, value)[1] - 5), f"{value:.3g}", "black", font)
            draw.text((to_xy(epoch, low)[0] - 6, y1 + 4), f"{epoch}", "black", font)
        draw.text(((x0 + x1) // 2 - 14, y1 + 16), "epoch", "black", font)
        for i, h in enumerate(histories.values()):
            colour = COLOURS[i % len(COLOURS)]
            for split, width in (("train", 1), ("val", 3)):
                draw.line([to_xy(r["epoch"], r[f"{split}_{metric}"]) for r in h], fill=colour, width=width)
    for i, name in enumerate(histories):                                   # legend, three names a row
        draw.text((margin + panel_w * (i % 3), panel_h + 12 + 14 * (i // 3)), f"{name}: thin train, thick val",
                  COLOURS[i % len(COLOURS)], font)
    return sheet
