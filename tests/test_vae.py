"""vae.py: the ELBO's two terms against torch.distributions, gradients, shapes, and a batch it must overfit."""
import contextlib

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

import vae


def test_kl_is_zero_at_the_prior():
    mu, logvar = torch.zeros(4, 8), torch.zeros(4, 8)
    assert torch.equal(vae.kl_divergence(mu, logvar), torch.zeros(4))


def test_kl_per_dimension_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(16, 32), torch.randn(16, 32)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0))  # (B, D)
    torch.testing.assert_close(vae.kl_per_dimension(mu, logvar), expected, rtol=1e-5, atol=1e-5)


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(16, 128), torch.randn(16, 128)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)  # (B,)
    torch.testing.assert_close(vae.kl_divergence(mu, logvar), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("binary", [True, False])
def test_recon_is_the_bernoulli_log_likelihood_of_the_clean_image(binary):
    torch.manual_seed(0)
    x_logits, x = torch.randn(3, 3, 8, 8) * 3, torch.rand(3, 3, 8, 8)
    x = x.round() if binary else x
    expected = Bernoulli(logits=x_logits, validate_args=False).log_prob(x).flatten(1).sum(1)
    parts = vae.elbo(x_logits, x, torch.zeros(3, 4), torch.zeros(3, 4))
    torch.testing.assert_close(parts.recon, expected, rtol=1e-5, atol=1e-3)


def test_loss_is_the_batch_mean_of_the_negative_elbo():
    torch.manual_seed(0)
    x_logits, x, mu, logvar = torch.randn(5, 3, 4, 4), torch.rand(5, 3, 4, 4), torch.randn(5, 6), torch.randn(5, 6)
    for beta in (1.0, 0.25):
        parts = vae.elbo(x_logits, x, mu, logvar, beta=beta)
        torch.testing.assert_close(parts.loss, -(parts.recon - beta * parts.kl).mean())
    assert vae.elbo(x_logits, x, mu, logvar, beta=0.25).loss < vae.elbo(x_logits, x, mu, logvar).loss


def test_reparameterize_passes_gradients_to_mu_and_logvar():
    torch.manual_seed(0)
    model = vae.VAE(image_size=32)
    mu = torch.randn(4, 128, requires_grad=True)
    logvar = torch.randn(4, 128, requires_grad=True)
    torch.manual_seed(1)
    z = model.reparameterize(mu, logvar)
    z.sum().backward()
    torch.manual_seed(1)
    eps = torch.randn(4, 128)
    torch.testing.assert_close(mu.grad, torch.ones(4, 128))              # dz/dmu = 1
    torch.testing.assert_close(logvar.grad, 0.5 * eps * torch.exp(0.5 * logvar.detach()))  # dz/dlogvar


def test_gradients_reach_the_encoder():
    torch.manual_seed(0)
    model, x = vae.VAE(image_size=32), torch.rand(4, 3, 32, 32)
    x_logits, mu, logvar = model(x)
    vae.elbo(x_logits, x, mu, logvar).loss.backward()
    for p in (model.encoder[0][0].weight, model.fc_mu.weight, model.fc_logvar.weight, model.to_logits.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


@pytest.mark.parametrize("image_size", [32, 64])
def test_shapes(image_size):
    model = vae.VAE(latent_dim=16, image_size=image_size)
    x_logits, mu, logvar = model(torch.rand(2, 3, image_size, image_size))
    assert x_logits.shape == (2, 3, image_size, image_size)
    assert mu.shape == logvar.shape == (2, 16)
    assert model.decode(torch.randn(5, 16)).shape == (5, 3, image_size, image_size)


def test_image_size_must_survive_five_halvings():
    with pytest.raises(AssertionError):
        vae.VAE(image_size=48)


def test_overfits_one_batch():
    torch.manual_seed(0)
    blocks = torch.rand(16, 3, 4, 4).round()                               # binary 4x4 patterns ...
    x = blocks.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)   # ... as (16, 3, 32, 32) images
    model = vae.VAE(image_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        x_logits, mu, logvar = model(x)
        loss = vae.elbo(x_logits, x, mu, logvar).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_reconstruct_is_sigmoid_of_decode_mu_in_eval_mode_and_keeps_the_mode():
    torch.manual_seed(0)
    model, x = vae.VAE(latent_dim=8, image_size=32), torch.rand(4, 3, 32, 32)
    x_hat, mu, logvar = model.reconstruct(x)
    assert model.training and not x_hat.requires_grad                        # left in the mode it was in
    model.eval()
    expected_mu, expected_logvar = model.encode(x)                          # BatchNorm's running statistics
    torch.testing.assert_close(mu, expected_mu)
    torch.testing.assert_close(logvar, expected_logvar)
    torch.testing.assert_close(x_hat, torch.sigmoid(model.decode(expected_mu)))
    assert torch.equal(model.reconstruct(x)[0], x_hat) and not model.training   # no sampling; eval stays eval


def test_samples_decode_the_prior_draw():
    model = vae.VAE(latent_dim=8, image_size=32).eval()
    samples = model.sample(5, torch.Generator().manual_seed(3))
    z = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))       # the same draw, by hand
    torch.testing.assert_close(samples, torch.sigmoid(model.decode(z)))
    assert samples.shape == (5, 3, 32, 32) and not model.training


def test_kl_summary_by_hand():
    mu, logvar = torch.zeros(10, 4), torch.zeros(10, 4)                        # the prior: nothing is used
    assert vae.kl_summary(mu, logvar) == {"kl": 0.0, "informative_dims": 0}
    mu[:, 1] = 1.0                                                             # one dimension: KL 1/2 nat per image
    mu[:5, 2] = 0.4                                                            # another: 0.08 nat on half the images
    summary = vae.kl_summary(mu, logvar)
    assert summary["kl"] == pytest.approx(0.5 + 0.04) and summary["informative_dims"] == 1   # 0.04 < 0.1 nat


def test_undone_share_against_the_baseline():
    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8)                                   # clean images
    x_aug = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)           # a mild corruption
    copy = {"aug": x_aug, "clean": x}                             # a baseline that copies its input, perfectly
    def share(x_hat_from_aug):
        return vae.undone_share(x, x_hat_from_aug, copy["aug"], copy["clean"])
    assert share(x_aug) == pytest.approx(0.0)                     # copies the corruption: nothing undone
    assert share(x) == pytest.approx(1.0)                         # a perfect un-doer
    constant = x.mean(0, keepdim=True).expand_as(x)               # ignores its input: the best constant image
    assert share(constant) < 0
    blurred = torch.nn.functional.avg_pool2d(x_aug, 3, 1, 1)      # blurs what it is given
    assert share(blurred) < 0
    halfway = 0.5 * (x + x_aug)                                   # half the distance: a quarter of the error left
    assert share(halfway) == pytest.approx(0.75)
    off = {"aug": x_aug + 0.05, "clean": x + 0.05}                # a baseline that is off by 0.05 on every pixel
    assert vae.undone_share(x, off["aug"], off["aug"], off["clean"]) == pytest.approx(0.0, abs=1e-6)   # the same
    assert vae.undone_share(x, off["clean"], off["aug"], off["clean"]) == pytest.approx(1.0)          # its best


def test_undone_share_is_none_when_the_augmentation_costs_the_baseline_nothing():
    x = torch.rand(4, 3, 8, 8)
    x_hat = torch.rand(4, 3, 8, 8)
    assert vae.undone_share(x, x_hat, baseline_from_aug=x_hat, baseline_from_clean=x_hat) is None   # strength 0


def test_train_step_encodes_x_aug_and_scores_against_the_clean_x():
    x, x_aug = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=8, image_size=32)
    expected_model = vae.VAE(latent_dim=8, image_size=32)
    expected_model.load_state_dict(model.state_dict())
    seen = []
    model.encoder.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    torch.manual_seed(1)                                          # the same eps for the step and the oracle
    loss, recon, kl = vae.train_step(model, torch.optim.Adam(model.parameters()), x, x_aug, 0.5,
                                     contextlib.nullcontext()).tolist()
    assert len(seen) == 1 and torch.equal(seen[0], x_aug)          # the encoder saw x_aug, not x
    torch.manual_seed(1)
    x_logits, mu, logvar = expected_model(x_aug)
    parts = vae.elbo(x_logits, x, mu, logvar, beta=0.5)           # scored against the clean x
    assert loss == pytest.approx(parts.loss.item(), rel=1e-6)
    assert (recon, kl) == pytest.approx((parts.recon.mean().item(), parts.kl.mean().item()), rel=1e-6)


def test_validate_scores_both_inputs_against_the_clean_x_in_eval_mode():
    """The held-out loss of stage 1: z = mu of x and of x_aug, each decoded and scored against the clean x, with
    BatchNorm's running statistics (made far from a batch's own here, so training mode would give other numbers)."""
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=8, image_size=32)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(-0.1)
            module.running_var.fill_(0.5)
    x, x_aug = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32)
    scores = vae.validate(model, x, x_aug, beta=0.5)
    assert model.training                                                      # left in its mode
    model.eval()
    for kind, x_in in (("clean", x), ("aug", x_aug)):
        mu, logvar = model.encode(x_in)
        x_logits = model.decode(mu)
        assert scores[f"val_loss_{kind}"] == pytest.approx(vae.elbo(x_logits, x, mu, logvar, 0.5).loss.item(), rel=1e-5)
        assert scores[f"mse_{kind}"] == pytest.approx((torch.sigmoid(x_logits) - x).pow(2).mean().item(), rel=1e-5)
    model.train()                                                              # what training mode would give
    mu, logvar = model.encode(x)
    assert vae.elbo(model.decode(mu), x, mu, logvar, 0.5).loss.item() != pytest.approx(scores["val_loss_clean"], rel=1e-4)
