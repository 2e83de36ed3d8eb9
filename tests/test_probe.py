"""probe.py: the frozen features, the paper's head, top-k accuracy, and a head that must learn."""
import pytest
import torch

import probe
import vae


def test_topk_accuracy_by_hand():
    logits = torch.tensor([[0.1, 0.5, 0.4],    # label 1: top-1 hit
                           [0.7, 0.2, 0.1],    # label 2: top-1 miss, top-2 miss
                           [0.2, 0.3, 0.5]])   # label 1: top-1 miss, top-2 hit
    y = torch.tensor([1, 2, 1])
    assert probe.topk_accuracy(logits, y, 1) == pytest.approx(100 / 3)
    assert probe.topk_accuracy(logits, y, 2) == pytest.approx(200 / 3)
    assert probe.topk_accuracy(logits, y, 5) == 100.0   # k is capped at the number of classes


def test_head_is_the_papers():
    head = probe.make_head(feature_dim=128, num_classes=10)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Linear", "BatchNorm1d", "Tanh", "Linear", "BatchNorm1d", "ReLU"]
    assert head[0].in_features == 128 and head[0].out_features == 32 and head[3].out_features == 10
    assert head(torch.randn(7, 128)).shape == (7, 10)
    assert (head(torch.randn(7, 128)) >= 0).all()             # the final ReLU


def test_features_are_mu_of_a_frozen_encoder():
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=16, image_size=32)
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    features = probe.extract_features(model, x, batch_size=4)
    assert features.shape == (10, 16) and features.dtype == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    mu, _ = model.encode(x.float() / 255)
    torch.testing.assert_close(features, mu, rtol=1e-4, atol=1e-5)   # batching does not change mu in eval mode


def test_head_learns_separable_features():
    torch.manual_seed(0)
    num_classes, n = 5, 1000
    y = torch.randint(0, num_classes, (n,))
    centres = torch.randn(num_classes, 16) * 3
    features = centres[y] + torch.randn(n, 16)                     # (N, D): five well-separated clouds
    head = probe.make_head(16, num_classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    before = probe.evaluate(head, features, y)
    for epoch in range(10):
        probe.train_epoch(head, optimizer, features, y, 50, torch.Generator().manual_seed(epoch))
    after = probe.evaluate(head, features, y)
    # Chance is 20%. Not 100%: the final ReLU clips class 0's logit to 0 on every image of class 0, so that class
    # gets no gradient there and wins only by ties at 0 (top-1 stays at 77%); not dead, as it is positive elsewhere.
    assert before["top1"] < 40 and 70 < after["top1"] < 90 and after["top5"] == 100.0
    assert after["loss"] < 0.5 * before["loss"]
    logits = probe.predict(head, features)                                  # (N, K)
    assert (logits[y == 0, 0] <= 0).all() and probe.dead_classes(head, features) == 0


def test_standardize_uses_the_train_statistics_for_every_split():
    torch.manual_seed(0)
    features = {"train": torch.randn(500, 4) * 1e-2 + 5, "test": torch.randn(50, 4) * 1e-2 + 5}
    out = probe.standardize(features)
    torch.testing.assert_close(out["train"].mean(0), torch.zeros(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["train"].std(0), torch.ones(4), atol=1e-3, rtol=0)
    mean, std = features["train"].mean(0), features["train"].std(0)
    torch.testing.assert_close(out["test"], (features["test"] - mean) / std)   # test uses train's mean and std


def test_latent_shift_is_0_when_mu_does_not_move_and_1_when_it_lands_on_another_image():
    torch.manual_seed(0)
    mu = torch.randn(100, 8)
    assert probe.latent_shift(mu, mu.clone()) == 0.0
    assert probe.latent_shift(mu, mu.roll(1, dims=0)) == pytest.approx(1.0)   # each mu moved to its neighbour's
    assert probe.latent_shift(mu, mu + 0.5 * (mu.roll(1, dims=0) - mu)) == pytest.approx(0.5)


def test_the_head_without_its_final_relu_can_give_negative_logits():
    head = probe.make_head(feature_dim=16, num_classes=10, final_relu=False)
    assert [type(m).__name__ for m in head][-1] == "BatchNorm1d"
    assert (head(torch.randn(64, 16)) < 0).any()


def test_dead_classes_are_those_the_final_relu_zeroes_for_every_image():
    torch.manual_seed(0)
    head = probe.make_head(feature_dim=8, num_classes=4)
    with torch.no_grad():
        head[4].bias[:] = torch.tensor([0.0, -100.0, 0.0, -100.0])   # classes 1 and 3 pushed below 0 everywhere
    assert probe.dead_classes(head, torch.randn(50, 8)) == 2


def test_standardized_pixels_match_standardizing_a_float_copy():
    torch.manual_seed(0)
    images = {split: torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8) for split, n in (("train", 300), ("test", 7))}
    lazy = probe.standardized_pixels(images)
    full = probe.standardize({split: x.float().flatten(1) / 255 for split, x in images.items()})
    for split in images:
        assert torch.equal(lazy[split][:len(images[split])], full[split])          # the same numbers, bit for bit
    index = torch.tensor([5, 0, 299])
    assert torch.equal(lazy["train"][index], full["train"][index]) and len(lazy["test"]) == 7


def test_scoring_in_batches_gives_what_one_pass_gives():
    torch.manual_seed(0)
    head, features = probe.make_head(16, 5).eval(), torch.randn(103, 16)
    torch.testing.assert_close(probe.predict(head, features, batch_size=10), head(features).detach())
    y = torch.randint(0, 5, (103,))
    assert probe.evaluate(head, features, y, batch_size=10) == pytest.approx(probe.evaluate(head, features, y))


def test_invariance_of_an_encoder_that_ignores_the_augmentation():
    torch.manual_seed(0)
    head, mu, y = probe.make_head(8, 3), torch.randn(40, 8), torch.randint(0, 3, (40,))
    same = probe.invariance(head, mu, mu.clone(), y)
    assert same["latent_shift"] == 0.0 and same["top1_on_clean"] == same["top1_on_aug"]
    assert probe.invariance(head, mu, mu.roll(1, dims=0), y)["latent_shift"] == pytest.approx(1.0)


def test_the_supervised_network_is_the_encoders_mu_then_the_head():
    torch.manual_seed(0)
    encoder, head = vae.VAE(latent_dim=16, image_size=32), probe.make_head(16, 7)
    network, x = probe.Supervised(encoder, head).eval(), torch.rand(5, 3, 32, 32)
    torch.testing.assert_close(network(x), head(encoder.encode(x)[0]))
    network.train()
    torch.nn.functional.cross_entropy(network(x), torch.arange(5)).backward()
    assert encoder.encoder[0][0].weight.grad.abs().sum() > 0            # the labels train the encoder too


def test_draw_curves_draws_each_run_in_its_colour(tmp_path):
    from PIL import Image
    rows = [{"epoch": e, **{f"{s}_{m}": float(e + (s == "val")) for s in ("train", "val")
                            for m in ("top1", "top5", "loss")}} for e in (1, 2, 3)]
    probe.draw_curves({"first": rows, "second": [dict(r, val_top1=0.0) for r in rows]}).save(tmp_path / "curves.png")
    colours = {colour for _, colour in Image.open(tmp_path / "curves.png").convert("RGB").getcolors(1 << 16)}
    assert set(probe.COLOURS[:2]) <= colours and probe.COLOURS[2] not in colours   # two runs, two colours


def test_train_epoch_returns_the_mean_loss_of_its_batches():
    torch.manual_seed(0)
    features, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    head = probe.make_head(6, 3)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.0)                  # nothing moves: the losses can be redone
    mean = probe.train_epoch(head, optimizer, features, y, 32, torch.Generator().manual_seed(1))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(1))[:96].split(32)
    by_hand = [torch.nn.functional.cross_entropy(head(features[idx]), y[idx]).item() for idx in order]
    assert mean == pytest.approx(sum(by_hand) / 3)


def test_draw_curves_draws_every_run_even_past_the_colours():
    from PIL import Image
    def runs(count):                                   # run i flat at value 10 + i, all inside one value range
        return {f"run{i}": [{"epoch": e, **{f"{s}_{m}": 10.0 + i for s in ("train", "val") for m in ("top1", "top5", "loss")}}
                            for e in (1, 2, 3)] for i in range(count)}
    def first_colour_in_the_panels(count):
        sheet = probe.draw_curves(runs(count)).convert("RGB")
        panels = sheet.crop((0, 0, sheet.width, 240))                   # above the legend
        return dict((colour, n) for n, colour in panels.getcolors(1 << 16)).get(probe.COLOURS[0], 0)
    eight, nine = first_colour_in_the_panels(len(probe.COLOURS)), first_colour_in_the_panels(len(probe.COLOURS) + 1)
    assert nine > eight                                # the ninth run is drawn, in the first colour again
