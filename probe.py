"""
Stage 2: measure what the frozen encoder learned, with a small classifier ("probe") on its features.

Protocol (Rajagopalan 2021, the paper's evaluation): freeze the VAE's encoder; the feature of an image is the
posterior mean mu = encode(x)[0], not a sample z; train the paper's head on top of it:

    logits = ReLU(BN(W2 . tanh(BN(W1 . mu))))      W1: D -> 32,  W2: 32 -> K
    loss   = cross-entropy(logits, y),  Adam, learning rate 1e-4, ~40 epochs

and report top-1 and top-5 accuracy on train and validation after every epoch, test once at the end.
We keep the paper's head as it is, including its odd final ReLU: it clips every negative logit to 0,
so a class can only win by a positive logit, and a class whose logit turns negative for every image
gets no gradient again (a "dead" class: tests/test_probe.py shows one on five separable clusters).
The encoder is frozen, so mu is computed once for every image and the head trains on the cached (N, D)
tensor. Controls (ours): the same head on raw pixels and on an untrained encoder's mu; both need
`standardize` (the untrained mu spreads by ~1e-3, below BatchNorm's epsilon). `latent_shift` measures how
far an augmentation moves mu. main.py owns the epoch loop (so it can checkpoint every epoch) and the
autocast; this file never imports vae.py, it takes any model with an `encode` method.

Axes: B batch, N images, D feature size, K classes.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import data

HIDDEN = 32   # the paper's head width

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


def standardize(features):
    """Per feature, subtract the train split's mean and divide by its std: {split: (N, D)} -> same shapes."""
    mean, std = features["train"].mean(0), features["train"].std(0).clamp(min=1e-6)   # (D,), (D,)
    return {split: (f - mean) / std for split, f in features.items()}


def latent_shift(mu, mu_aug):
    """How far an augmentation moves mu, relative to the distance between two different images:
    mean ||mu_aug_i - mu_i|| / mean ||mu_i - mu_(i+1)||. 0: invariant; 1: as far as another image."""
    moved = (mu_aug - mu).norm(dim=1).mean()                     # (N, D) -> scalar
    typical = (mu - mu.roll(1, dims=0)).norm(dim=1).mean()       # image i against image i - 1
    return (moved / typical).item()

# -----------------------------------------------------------------------------
# The head, and how it is scored


def make_head(feature_dim, num_classes):
    """The paper's probe: Linear -> 32, BatchNorm, Tanh; Linear -> K, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Linear(feature_dim, HIDDEN), nn.BatchNorm1d(HIDDEN), nn.Tanh(),
        nn.Linear(HIDDEN, num_classes), nn.BatchNorm1d(num_classes), nn.ReLU())


def topk_accuracy(logits, y, k):
    """Percent of rows whose label is among the k largest logits. (N, K), (N,) -> float"""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices                  # (N, k)
    return 100.0 * (top == y[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def evaluate(head, features, y):
    """Cross-entropy, top-1 and top-5 of the head in eval mode on (N, D) features."""
    head.eval()
    logits = head(features)                              # (N, K)
    return {"loss": F.cross_entropy(logits, y).item(),
            "top1": topk_accuracy(logits, y, 1), "top5": topk_accuracy(logits, y, 5)}

# -----------------------------------------------------------------------------
# One epoch of training


def train_epoch(head, optimizer, features, y, batch_size, generator):
    """One pass over the cached features in a random order (the last incomplete batch is dropped)."""
    head.train()
    order = torch.randperm(len(y), generator=generator).to(features.device)   # (N,)
    for idx in order[: len(y) // batch_size * batch_size].split(batch_size):  # (B,) each
        loss = F.cross_entropy(head(features[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return loss.item()
