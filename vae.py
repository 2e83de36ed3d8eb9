"""
The variational autoencoder of stage 1, and its loss: the negative evidence lower bound (ELBO).

The paper's whole idea is an asymmetry: the encoder sees an *augmented* image x_aug, the decoder must
reconstruct the *clean* image x. What the encoder learns to keep is what survives the augmentation.

    encode:          x_aug -> (mu, logvar)        q(z | x_aug) = N(mu, diag(exp(logvar)))
    reparameterize:  z = mu + exp(logvar / 2) * eps,  eps ~ N(0, I)
    decode:          z -> x_logits                p(x | z) = Bernoulli(sigmoid(x_logits)) per pixel
    elbo:            log p(x | z) - beta * KL(q(z | x_aug) || N(0, I)),  beta = 1 is the true ELBO
    KL in closed form (Kingma & Welling 2014, appendix B):
                     KL = -1/2 * sum_d (1 + logvar_d - mu_d^2 - exp(logvar_d))

Follows Rajagopalan (2021), "Learned Data Augmentation", its model description: five 3x3 stride-2 convolutions
(32..512 channels, BatchNorm, ReLU), two linear heads for a 128-d latent, a mirrored transposed-conv decoder.
What we chose: the likelihood is a Bernoulli over pixel intensities in [0, 1] (the decoder emits logits,
x_hat = sigmoid(x_logits) is the reconstructed image); the decoder is an exact mirror of the encoder
(five stride-2 transposed convolutions, the last one straight to 3 channels), rather than the common
template's extra full-resolution layers. `train_step` is one step of stage 1: the paper's idea in six lines.
Then what a trained VAE does: its held-out loss, how much of the latent it uses (KL per dimension) and how much
of an augmentation it undoes:
    undone = (e_base(x_aug) - e(x_aug)) / (e_base(x_aug) - e_base(x)),  e = squared error against the clean x
0 when the VAE reconstructs the augmented view no better than the baseline VAE (trained on clean images)
does, 1 when as well as the baseline reconstructs the clean image: a VAE that ignores its input or blurs
cannot score well. Last, running it, which changes no result: the device, glibc's allocator kept from unmapping
big buffers (`tune_allocator`), the precision that suits the device (`pick_precision`) and, on a GPU, `train_step`
replayed as one CUDA graph (`cuda_graphed`).
Called by main.py (stage 1, its measurements, its device settings); probe.py only uses `encode`.

Axes: B batch, C channels, H/W height/width, D latent size.
"""
import contextlib
import ctypes
import sys
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ENCODER_CHANNELS = (32, 64, 128, 256, 512)  # the paper's five conv layers
LATENT_DIM = 128                            # the paper's latent size
INFORMATIVE_NATS = 0.1                      # a latent dimension whose mean KL exceeds this carries information

# -----------------------------------------------------------------------------
# The model


def conv_block(in_channels, out_channels):
    """3x3 stride-2 convolution that halves H and W, then BatchNorm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def deconv_block(in_channels, out_channels):
    """3x3 stride-2 transposed convolution that doubles H and W, then BatchNorm and ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class VAE(nn.Module):
    def __init__(self, latent_dim=LATENT_DIM, image_size=64, channels=ENCODER_CHANNELS):
        super().__init__()
        num_halvings = len(channels)
        assert image_size % 2 ** num_halvings == 0, f"image_size must be a multiple of {2 ** num_halvings}"
        self.latent_dim = latent_dim
        self.bottom_size = image_size // 2 ** num_halvings   # 2 at 64x64, 1 at 32x32
        flat_dim = channels[-1] * self.bottom_size ** 2       # 2048 at 64x64
        widths = (3,) + tuple(channels)                       # 3, 32, 64, ..., 512
        self.encoder = nn.Sequential(*[conv_block(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.fc_mu = nn.Linear(flat_dim, latent_dim)          # two parallel heads on one feature
        self.fc_logvar = nn.Linear(flat_dim, latent_dim)
        self.fc_decode = nn.Linear(latent_dim, flat_dim)
        up = widths[::-1]                                     # 512, 256, ..., 32, 3
        self.decoder = nn.Sequential(*[deconv_block(a, b) for a, b in zip(up[:-2], up[1:-1])])
        # The last layer maps to pixel logits: no BatchNorm or ReLU, the likelihood applies the sigmoid.
        self.to_logits = nn.ConvTranspose2d(up[-2], up[-1], 3, stride=2, padding=1, output_padding=1)

    def encode(self, x_aug):
        """(B, 3, H, W) float in [0, 1] -> mu, logvar, each (B, D).

        mu is the posterior mean; it, not a sample z, is the feature the probe (stage 2) reads."""
        h = self.encoder(x_aug).flatten(1)          # (B, 512 * bottom_size**2)
        return self.fc_mu(h), self.fc_logvar(h)     # (B, D), (B, D)

    def reparameterize(self, mu, logvar):
        """Sample z ~ N(mu, exp(logvar)) as a differentiable function of mu and logvar. (B, D) -> (B, D)"""
        # The randomness lives in eps, which does not depend on the parameters, so gradients
        # flow through mu and std into the encoder (Kingma & Welling 2014, section 2.4).
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + std * eps

    def decode(self, z):
        """(B, D) -> x_logits (B, 3, H, W); the reconstructed image is x_hat = sigmoid(x_logits) in [0, 1]."""
        h = self.fc_decode(z)                                             # (B, 512 * bottom_size**2)
        h = h.view(len(z), -1, self.bottom_size, self.bottom_size)        # (B, 512, bottom, bottom)
        return self.to_logits(self.decoder(h))                            # (B, 3, H, W)

    @torch.no_grad()
    def reconstruct(self, x_in):
        """Deterministic reconstruction in eval mode, no sampling: x_hat = sigmoid(decode(mu)) (B, 3, H, W) in [0, 1],
        and mu, logvar (B, D), all float32 (an autocast around the call runs the layers in bf16). The model is left
        in the mode it was in."""
        was_training = self.training
        self.eval()
        mu, logvar = self.encode(x_in)
        x_hat = torch.sigmoid(self.decode(mu).float())
        self.train(was_training)
        return x_hat, mu.float(), logvar.float()

    @torch.no_grad()
    def sample(self, num_images, generator=None):
        """Images from the prior: x_hat = sigmoid(decode(z)), z ~ N(0, I) drawn on the CPU generator (the same
        draws on any device). -> (num_images, 3, H, W) float32 in [0, 1]; the model is left in its mode."""
        was_training = self.training
        self.eval()
        z = torch.randn(num_images, self.latent_dim, generator=generator)              # (N, D)
        x_hat = torch.sigmoid(self.decode(z.to(self.fc_decode.weight.device)).float())   # (N, 3, H, W)
        self.train(was_training)
        return x_hat

    def forward(self, x_aug):
        """(B, 3, H, W) augmented image -> (x_logits (B, 3, H, W), mu (B, D), logvar (B, D))."""
        mu, logvar = self.encode(x_aug)
        z = self.reparameterize(mu, logvar)          # (B, D)
        return self.decode(z), mu, logvar

# -----------------------------------------------------------------------------
# The loss


class ELBO(NamedTuple):
    loss: torch.Tensor    # scalar: negative ELBO averaged over the batch (what we minimise)
    recon: torch.Tensor   # (B,): log p(x | z) per image, summed over pixels (higher is better)
    kl: torch.Tensor      # (B,): KL(q(z | x_aug) || N(0, I)) per image, summed over latent dims


def kl_per_dimension(mu, logvar):
    """Closed-form KL(N(mu_d, exp(logvar_d)) || N(0, 1)) of every latent dimension. (B, D) -> (B, D) nats

    A dimension whose KL stays near 0 for every image carries no information about it: the posterior
    ignores the input there ("posterior collapse"); `kl_summary` counts the dimensions above 0.1 nat."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu, logvar):
    """Closed-form KL(N(mu, exp(logvar)) || N(0, I)), summed over D. (B, D) -> (B,)"""
    return kl_per_dimension(mu, logvar).sum(dim=1)


def elbo(x_logits, x, mu, logvar, beta=1.0):
    """The ELBO of a batch, with the *clean* image x as the target.

    x_logits (B, 3, H, W) decoder output; x (B, 3, H, W) clean image in [0, 1]; mu, logvar (B, D).
    recon = log Bernoulli(x | sigmoid(x_logits)) summed over pixels, i.e. minus the binary cross-entropy;
    for intensities strictly between 0 and 1 this is the usual unnormalised Bernoulli VAE likelihood.
    beta weighs the KL; beta = 1 is the ELBO itself. Any other value optimises a different objective
    (beta-VAE). We could not inspect the paper's code; the widely copied PyTorch-VAE template (AntixK)
    scales the KL by batch_size / dataset_size (about 0.003 for CIFAR-10), which makes the model nearly a
    plain autoencoder. Computed in float32 even under autocast.
    """
    x_logits, mu, logvar = x_logits.float(), mu.float(), logvar.float()
    bce = F.binary_cross_entropy_with_logits(x_logits, x.float(), reduction="none")  # (B, 3, H, W)
    recon = -bce.flatten(1).sum(1)                                                  # (B,)
    kl = kl_divergence(mu, logvar)                                                  # (B,)
    loss = -(recon - beta * kl).mean()                                              # scalar
    return ELBO(loss, recon, kl)


def train_step(model, optimizer, x, x_aug, beta, autocast):
    """One step of stage 1, the paper's idea: encode the augmented x_aug, score the reconstruction against the clean x.
    autocast: the run's precision context (bf16 autocast or a no-op). -> float32 tensor [loss, recon, kl] (3,) on the
    device, batch means (reading it would make the host wait for a GPU, so the caller sums it)."""
    with autocast:
        x_logits, mu, logvar = model(x_aug)                      # (B, 3, H, W), (B, D), (B, D)
    parts = elbo(x_logits, x, mu, logvar, beta)                  # the target is the clean x
    optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    optimizer.step()
    return torch.stack([parts.loss.detach(), parts.recon.mean().detach(), parts.kl.mean().detach()])  # (3,)

# -----------------------------------------------------------------------------
# What a trained VAE does: its loss on held-out images, the latent it uses, the augmentation it undoes


@torch.no_grad()
def validate(model, x, x_aug, beta=1.0):
    """-ELBO with z = mu (no sampling) and per-pixel squared error of x_hat against the clean x, from x and from
    x_aug, in eval mode (the model is left in its mode): {"val_loss_clean", "mse_clean", "val_loss_aug", "mse_aug"}."""
    was_training = model.training
    model.eval()
    metrics = {}
    for kind, x_in in (("clean", x), ("aug", x_aug)):
        mu, logvar = model.encode(x_in)                                 # (N, D) each
        x_logits = model.decode(mu)                                     # (N, 3, H, W)
        metrics[f"val_loss_{kind}"] = elbo(x_logits, x, mu, logvar, beta).loss.item()
        metrics[f"mse_{kind}"] = (torch.sigmoid(x_logits.float()) - x).pow(2).mean().item()
    model.train(was_training)
    return metrics


def kl_summary(mu, logvar):
    """How much of the latent a set of images uses: mean KL per image (nats) and the number of informative
    dimensions, those whose KL averaged over the images exceeds INFORMATIVE_NATS. (N, D), (N, D) -> dict"""
    kl = kl_per_dimension(mu, logvar).mean(0)                            # (D,) nats, averaged over images
    return {"kl": kl.sum().item(), "informative_dims": int((kl > INFORMATIVE_NATS).sum())}


def undone_share(x, x_hat_from_aug, baseline_from_aug, baseline_from_clean):
    """How much of an augmentation a VAE undoes, against the baseline VAE (trained on clean images) on the same x_aug:
    (e_base(x_aug) - e(x_aug)) / (e_base(x_aug) - e_base(x)), e(.) the mean squared error of a reconstruction
    against the clean x. 0: no better than the baseline from x_aug; 1: as good as the baseline from x (as if never
    augmented). A VAE that ignores its input, or blurs, scores at or below a sharp baseline's 0. None when the
    augmentation costs the baseline nothing (strength 0): there is nothing to undo."""
    def error(y):
        return (y - x).pow(2).mean().item()
    damage = error(baseline_from_aug) - error(baseline_from_clean)      # what the augmentation costs the baseline
    if damage <= 0:
        return None
    return (error(baseline_from_aug) - error(x_hat_from_aug)) / damage

def reconstruction_rows(vaes, x, x_augs, sample_seed, num_images=8):
    """The paper's Figures 1-4 on one sheet, as rows and titles for data.save_grid: the clean x and the baseline's
    x_hat from it (if trained); per augmentation its x_aug (x_augs: {name: (N, 3, H, W)}) and the baseline's and the
    augmented VAE's x_hat from it; last, each VAE's samples from the prior, every VAE decoding the same z."""
    rows = [x[:num_images]]
    titles = ["clean x"]
    if "none" in vaes:
        rows.append(vaes["none"].reconstruct(x[:num_images])[0])
        titles.append("VAE 'none'\nfrom x")
    for aug, x_aug in x_augs.items():
        shown = [name for name in ("none", aug) if name in vaes]            # the baseline (if trained), then aug
        rows += [x_aug[:num_images]] + [vaes[name].reconstruct(x_aug[:num_images])[0] for name in shown]
        titles += [f"x_aug\n({aug})"] + [f"VAE '{name}'\nfrom x_aug" for name in shown]
    for name, model in vaes.items():                                        # the same z for every VAE
        rows.append(model.sample(num_images, torch.Generator().manual_seed(sample_seed)))
        titles.append(f"VAE '{name}'\nprior samples")
    return rows, titles

# -----------------------------------------------------------------------------
# Running it: the device, the allocator, the precision that suits them, and on a GPU the step as one CUDA graph


def pick_device(name):
    """'auto' -> CUDA when present, else CPU; a device that is absent is a ValueError that says why. A GPU is made the
    current device before anything is made on it, so that streams and graphs land on it."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name} was asked for, but this PyTorch sees {torch.cuda.device_count()} CUDA "
                             f"GPU(s), so no CUDA device {device.index}; use --device cpu")
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True   # shapes never change: let cuDNN time and pick its kernels once
    return device


def tune_allocator():
    """Keep glibc from handing big activation buffers back to the OS after every step, so that the next step need not
    page-fault them in again (Linux with glibc; elsewhere there is nothing to do). At 64x64 stage 1 ran 1.06x as fast
    with it on a 2-core CPU (README, Speed)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                                     # musl or another libc
        return
    M_TRIM_THRESHOLD = -1                               # from glibc's malloc.h
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)            # the largest glibc accepts on 64-bit systems
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_precision(choice, device, image_size):
    """'fp32' or 'bf16' (autocast), and why. 'auto' follows rules measured with tests/bench.py (README, Speed),
    never a timed trial, so one command always picks the same."""
    if choice != "auto":
        return choice, "set by --precision, or kept from the run's start"
    if device.type == "cuda":
        return "fp32", "at batch 128 this network is launch-bound on a GPU, and bf16 autocast only adds cast kernels"
    native = cpu_has_native_bf16()
    if native is None:
        return "fp32", "this PyTorch cannot tell whether the CPU has bf16 instructions, so the exact fp32"
    if not native:
        return "fp32", "this CPU has no bf16 instructions (AVX512-BF16 or AMX): bf16 would be emulated, 0.41x of fp32"
    if image_size < 64:
        return "fp32", "below 64x64 bf16 gained 1.0x-1.2x where measured (README, Speed), so the exact fp32"
    return "bf16", "this CPU runs bf16 natively, faster than fp32 at 64x64 and up"


def cpu_has_native_bf16():
    """True where the CPU has bf16 instructions (AVX512-BF16 or AMX) and oneDNN to use them, None where this PyTorch
    cannot tell. (oneDNN's own "bf16 supported" is true on every AVX-512 CPU, which emulates bf16.)"""
    try:
        return torch.backends.mkldnn.is_available() and (torch.cpu._is_avx512_bf16_supported()
                                                         or torch.cpu._is_amx_tile_supported())
    except AttributeError:                      # private functions: a PyTorch without them cannot tell
        return None


def autocast_context(device, precision):
    """The run's autocast, built once: bf16, or a no-op for fp32 (no weight-cast cache: a CUDA graph captures it)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, torch.bfloat16, cache_enabled=False)


class cuda_graphed:
    """Wrap a training step (a function of tensors that returns a tensor) so that it is recorded once as a CUDA graph
    and replayed: one launch for the whole forward, loss, backward and Adam step instead of hundreds. The first
    WARMUP calls run eagerly on a side stream (the capture needs warm kernels and optimizer state), the next captures
    into fixed buffers, every later call copies its inputs into them and replays: every call is one real step. Needs
    Adam(capturable=True) and the run's device current. https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs"""
    WARMUP = 3

    def __init__(self, step):
        self.step = step
        self.calls = 0
        self.graph = None
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
