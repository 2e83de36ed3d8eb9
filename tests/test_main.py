"""main.py end to end on the offline `shapes` data: outputs, the sweep, bad input, resume, determinism, divergence,
and the study's measurements on inputs with known answers."""
import collections
import contextlib
import json
import signal
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

import augment
import data
import main
import probe
import vae
from conftest import ROOT, TINY, continue_command, ledger_for, metrics, run_main


def test_end_to_end_writes_every_output(reference_run):
    out, stdout = reference_run
    summary = json.loads((out / "results.json").read_text())
    assert summary["torch"] == torch.__version__ and summary["precision"] == "fp32"
    records = {r["name"]: r for r in summary["records"]}
    assert set(records) == {"none", "crop", "pixels", "random-encoder", "supervised"}
    for name in ("none", "crop"):
        r = records[name]
        assert 0 <= r["test_top1"] <= r["test_top5"] <= 100 and r["test_top5"] > 0
        assert r["vae_images_per_s"] > 0 and r["vae_seconds"] > 0 and r["probe_seconds"] > 0
        assert r["kl"] > 0 and 0 <= r["informative_dims"] <= 32
        rows = [json.loads(line) for line in (out / "seed0" / name / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 + 3                                       # 2 VAE epochs + 3 probe epochs
        model, head = vae.VAE(latent_dim=32, image_size=32), probe.make_head(32, 9)
        model.load_state_dict(torch.load(out / "seed0" / name / "vae.pt"))
        head.load_state_dict(torch.load(out / "seed0" / name / "probe.pt"))
    assert 0 < records["crop"]["mse_augmented_input"] < 0.25 and 0 < records["crop"]["augmented_mse_from_aug"] < 0.25
    assert Image.open(out / "reconstructions.png").size == (110 + 8 * 64, 7 * 64)   # x, x_hat, x_aug, 2 x_hat, 2 samples
    assert Image.open(out / "curves.png").size[0] > 600
    assert "| crop | 1 |" in (out / "results.md").read_text()
    assert "forecast: the whole command needs about" in stdout and "stage 1 [seed 0, crop] epoch 2/2" in stdout


def test_same_seed_gives_the_same_metrics(reference_run, tmp_path):
    status, _, stderr = run_main(*TINY, "--out", str(tmp_path / "again"))
    assert status == 0, stderr
    assert metrics(tmp_path / "again") == metrics(reference_run[0])


def test_interrupt_and_resume_match_an_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "main.py", *TINY, "--out", str(out), "--log-every", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                               # wait until stage 1 is midway through epoch 2
        if "stage 1 [seed 0, none] epoch 2/2 step 3/" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and continue_command(stderr) == [*TINY, "--out", str(out), "--log-every", "0"]
    assert not (out / "results.json").exists()
    mark_as_saved_by_a_graphed_gpu_run(out / "seed0" / "none" / "checkpoint-vae.pt")
    status, stdout, stderr = run_main(*TINY, "--out", str(out))
    assert status == 0, stderr
    assert "stage 1 [seed 0, none] epoch 1/2" not in stdout     # the finished epoch was not trained again
    assert metrics(out) == metrics(reference_run[0])


def mark_as_saved_by_a_graphed_gpu_run(path):
    """Rewrite a checkpoint as a --cuda-graph run on a GPU saves it: a capturable Adam (its steps float32 tensors)
    and the CUDA random state of its device (loaded on the CPU, as the Ledger maps everything there)."""
    state = torch.load(path, weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = True
    for param_state in state["optimizer"]["state"].values():
        param_state["step"] = param_state["step"].float()
    state["cuda_rng"] = torch.zeros(16, dtype=torch.uint8)
    torch.save(state, path)


def test_a_checkpoint_of_a_graphed_gpu_run_trains_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    x, ctx = torch.rand(4, 3, 32, 32), contextlib.nullcontext()
    model = vae.VAE(latent_dim=8, image_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    vae.train_step(model, optimizer, x, x, 1.0, ctx)
    ledger = ledger_for(tmp_path, model, optimizer, [torch.Generator()])
    ledger.epoch = 1
    ledger.save()
    path = tmp_path / "seed0" / "none" / "checkpoint-vae.pt"
    mark_as_saved_by_a_graphed_gpu_run(path)
    as_saved = torch.optim.Adam(model.parameters(), lr=1e-3)
    as_saved.load_state_dict(torch.load(path, weights_only=False)["optimizer"])
    with pytest.raises(AssertionError, match="capturable=True"):          # what a plain load_state_dict gives
        vae.train_step(model, as_saved, x, x, 1.0, ctx)
    fresh = vae.VAE(latent_dim=8, image_size=32)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    assert ledger_for(tmp_path, fresh, fresh_optimizer, [torch.Generator()]).epoch == 1
    assert not fresh_optimizer.param_groups[0]["capturable"]
    loss_before = vae.train_step(fresh, fresh_optimizer, x, x, 1.0, ctx)[0]
    assert all(s["step"].item() == 2 for s in fresh_optimizer.state.values())   # Adam went on from its saved step
    assert vae.train_step(fresh, fresh_optimizer, x, x, 1.0, ctx)[0] < loss_before


def test_the_same_command_again_skips_what_is_finished(reference_run, tmp_path):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(reference_run[0]), str(out)], check=True)
    status, stdout, stderr = run_main(*TINY, "--out", str(out))
    assert status == 0, stderr
    assert "stage 1 [" not in stdout and "stage 2 [" not in stdout and "control [" not in stdout  # nothing trained
    assert "the whole command needs about 0.0 min more" in stdout                                # and none forecast
    assert metrics(out) == metrics(reference_run[0])


def test_other_settings_in_a_run_folder_are_refused(reference_run, capsys, restore_signals):
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(reference_run[0]), "--epochs", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--epochs 2 (asked: 3)" in err and "--overwrite" in err


def test_a_failed_start_leaves_nothing_in_the_way(cifar_dir, tmp_path, monkeypatch, capsys, restore_signals):
    command = ["--dataset", "cifar10", "--data-dir", str(cifar_dir), "--out", str(tmp_path / "run"),
               "--batch-size", "4", "--epochs", "1", "--probe-epochs", "1", "--image-size", "32",
               "--latent-dim", "8", "--aug", "rotate", "--device", "cpu"]
    hidden = tmp_path / "hidden"
    (cifar_dir / "cifar-10-batches-py").rename(hidden)                  # offline, and no data yet
    monkeypatch.setenv("CIFAR10_URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")  # port 9: nothing listens
    with pytest.raises(SystemExit) as e:
        main.main(command)
    assert e.value.code == 2 and "downloading" in capsys.readouterr().err
    hidden.rename(cifar_dir / "cifar-10-batches-py")                    # the user puts the data in place
    main.main(command)                                                  # the same command now trains
    assert (tmp_path / "run" / "results.md").exists()


def test_sweep_writes_every_augmentation_both_controls_and_the_spread(tmp_path, restore_signals):
    out = tmp_path / "sweep"
    every = ",".join(main.augment.AUGMENTATIONS)
    main.main([*TINY, "--limit", "160", "--epochs", "1", "--probe-epochs", "1", "--aug", every,
               "--seeds", "0,1", "--out", str(out)])
    table = (out / "results.md").read_text()
    for name in ["none", *[a for a in main.augment.AUGMENTATIONS if a != "none"], *main.CONTROLS]:
        assert f"| {name} | 2 | " in table
    assert " +- " in table
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 2 * (len(main.augment.AUGMENTATIONS) + len(main.CONTROLS))
    assert Image.open(out / "reconstructions.png").size[1] == (2 + 3 * 6 + 7) * 64   # x, x_hat, 3 per aug, samples


def test_no_baseline_trains_only_the_named_vaes_and_a_mix(tmp_path, restore_signals):
    out = tmp_path / "mix"
    main.main([*TINY, "--limit", "160", "--epochs", "1", "--probe-epochs", "1", "--aug", "crop,crop+hue-saturation",
               "--no-baseline", "--out", str(out)])
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["name"] for r in records] == ["crop", "crop+hue-saturation"]
    assert all(r["test_top1"] is not None and r["informative_dims"] >= 0 for r in records)
    assert "| crop+hue-saturation | 1 | " in (out / "results.md").read_text()
    assert not (out / "seed0" / "none").exists()
    assert Image.open(out / "reconstructions.png").size[1] == (1 + 2 * 2 + 2) * 64   # x, x_aug and x_hat per aug, samples


def test_every_recipe_names_real_flags():
    flags_of_the_parser = set(vars(main.build_parser().parse_args([])))
    for name, flags in main.RECIPES.items():
        assert set(flags) <= flags_of_the_parser, set(flags) - flags_of_the_parser   # a misspelled flag fails here
        args = main.parse_args(["--recipe", name])
        assert {key: getattr(args, key) for key in flags} == flags


def test_a_recipe_sets_its_flags_and_explicit_flags_win(monkeypatch):
    monkeypatch.setitem(main.RECIPES, "ours", dict(beta=0.5, lr=3e-4, epochs=7))
    args = main.parse_args(["--dataset", "shapes", "--recipe", "ours", "--epochs", "2"])
    assert (args.beta, args.lr, args.epochs) == (0.5, 3e-4, 2)
    args = main.parse_args(["--dataset", "shapes"])
    shapes = main.DEFAULTS["shapes"]
    assert (args.beta, args.lr, args.epochs) == (shapes["beta"], shapes["lr"], shapes["epochs"])


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--probe-epochs", "-3"], "--probe-epochs must be at least 1"),
    (["--batch-size", "100000"], "larger than the"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "10000000"], "is more than the"),
    (["--limit", "40", "--batch-size", "2"], "too small to keep each of the 9 classes"),
    (["--device", "tpu"], "--device"),
    (["--image-size", "48"], "multiple of 32"),
    (["--aug", "crop,blur"], "--aug 'crop,blur'"),
    (["--aug", "crop+blur"], "--aug 'crop+blur'"),
    (["--aug", "every"], "--aug 'every'"),
    (["--aug", "none", "--no-baseline"], "leaves nothing to train"),
    (["--seeds", "0,one"], "--seeds '0,one'"),
    (["--seeds", "18446744073709551616"], "from 0 to"),
    (["--strength", "3"], "--strength must be at least 0 and below 2"),
    (["--strength", "2"], "below 2"),
])
def test_bad_input_is_one_clear_line_and_status_2(flags, message, tmp_path, capsys, restore_signals):
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_cuda_without_cuda_is_a_usage_error(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(tmp_path / "run"), "--device", "cuda"])
    assert e.value.code == 2 and "no CUDA" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(tmp_path / "a_file" / "run")])
    assert e.value.code == 2 and "cannot write to the output folder" in capsys.readouterr().err


def test_truncated_checkpoint_is_reported(tmp_path, capsys, restore_signals):
    out = tmp_path / "run"
    main.main([*TINY, "--out", str(out), "--epochs", "1", "--probe-epochs", "1", "--aug", "none"])
    checkpoint = out / "seed0" / "none" / "checkpoint-vae.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(out), "--epochs", "1", "--probe-epochs", "1", "--aug", "none"])
    assert e.value.code == 2 and "truncated, unreadable" in capsys.readouterr().err


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, restore_signals):
    steps, train_step = [0], vae.train_step
    monkeypatch.setattr(main, "time_trials", lambda session, args, kinds: collections.defaultdict(lambda: 1e-3))

    def step_that_blows_up(*args):              # 9 steps an epoch: the 12th is step 3 of epoch 2
        steps[0] += 1
        parts = train_step(*args)
        return parts * float("nan") if steps[0] == 12 else parts
    monkeypatch.setattr(vae, "train_step", step_that_blows_up)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(out), "--log-every", "1000"])
    err = capsys.readouterr().err
    assert e.value.code == 3 and "stage 1 [seed 0, none] epoch 2, by step 9: diverged" in err and "--lr" in err
    assert torch.load(out / "seed0" / "none" / "checkpoint-vae.pt")["loop"]["epoch"] == 1     # the last good epoch


def test_a_probe_that_diverges_names_its_own_stage_and_flag(tmp_path, capsys, monkeypatch):
    train_epoch = probe.train_epoch

    def epoch_that_blows_up(head, *args):
        train_epoch(head, *args)
        head[0].weight.data.fill_(float("nan"))
    monkeypatch.setattr(probe, "train_epoch", epoch_that_blows_up)
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--epochs", "1", "--aug", "none", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 3 and "stage 2 [seed 0, none, mu] epoch 1: diverged" in err
    assert "--probe-lr" in err and "--precision" not in err




@pytest.mark.parametrize("native, size, expected", [(True, 64, "bf16"), (True, 32, "fp32"), (False, 64, "fp32"),
                                                    (None, 64, "fp32")])
def test_auto_precision_follows_the_measured_rules(native, size, expected, monkeypatch):
    monkeypatch.setattr(vae, "cpu_has_native_bf16", lambda: native)
    assert vae.pick_precision("auto", torch.device("cpu"), size)[0] == expected
    assert vae.pick_precision("fp32", torch.device("cpu"), size)[0] == "fp32"


def test_auto_precision_asks_the_cpu_for_bf16_instructions_not_onednn(monkeypatch):
    """oneDNN says bf16 is supported on every AVX-512 CPU, where it emulates it; a Xeon without AVX512-BF16 or AMX
    must get fp32. A PyTorch without the private checks gets fp32 and a reason, not a traceback."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert vae.pick_precision("auto", torch.device("cpu"), 64)[0] == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert vae.pick_precision("auto", torch.device("cpu"), 64)[0] == "bf16"
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    precision, reason = vae.pick_precision("auto", torch.device("cpu"), 64)
    assert precision == "fp32" and "cannot tell" in reason


def test_a_list_and_a_mix_of_augmentations_get_their_own_folders():
    folders = {text: main.parse_args(["--aug", text]).out for text in ("crop,hue-saturation", "crop+hue-saturation",
                                                                     "hue-saturation+crop", "crop")}
    assert len(set(folders.values())) == len(folders)
    assert main.parse_args(["--aug", "none,crop", "--seeds", "0,1"]).out == "runs/cifar10-crop-seed0+1"



def test_the_supervised_ceiling_beats_every_frozen_probe_on_shapes(tmp_path, restore_signals):
    out = tmp_path / "ceiling"
    main.main(["--dataset", "shapes", "--limit", "2000", "--epochs", "6", "--probe-epochs", "10", "--latent-dim", "32",
               "--image-size", "32", "--device", "cpu", "--out", str(out)])
    records = json.loads((out / "results.json").read_text())["records"]
    ceiling = next(r["test_top1"] for r in records if r["name"] == "supervised")
    frozen = [r["test_top1"] for r in records if r["name"] != "supervised"]
    assert len(frozen) == 4 and ceiling > max(frozen) + 5                 # two VAEs, pixels, the untrained encoder
    floor = next(r["test_top1"] for r in records if r["name"] == "random-encoder")
    for r in records[:2]:                                                 # the VAEs' share of the way from the floor
        assert r["ceiling_share"] == pytest.approx(100 * (r["test_top1"] - floor) / (ceiling - floor))


# The tests below need a GPU (they are skipped elsewhere); they compare with tolerances, since CUDA runs are not bitwise.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_trains_like_the_eager_step():
    device = torch.device("cuda")
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = vae.VAE(latent_dim=8, image_size=32).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=graphed)
        step = vae.cuda_graphed(vae.train_step) if graphed else vae.train_step
        x = torch.rand(6, 8, 3, 32, 32, device=device)
        losses = [step(model, optimizer, x[i], x[i], 1.0, contextlib.nullcontext())[0].item() for i in range(6)]
        results.append(losses)
    assert results[1][-1] < results[1][0]                     # it learns
    assert results[1] == pytest.approx(results[0], rel=0.05)  # like the eager step, up to the sampled eps
    with pytest.raises(AssertionError, match="replays"):      # a batch of another size cannot be replayed
        step(model, optimizer, x[0, :4], x[0, :4], 1.0, contextlib.nullcontext())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_cuda_run_with_the_graph_trains_like_the_cpu_run(reference_run, tmp_path):
    cuda = [*TINY[:-2], "--device", "cuda", "--cuda-graph", "--out", str(tmp_path / "cuda")]
    status, stdout, stderr = run_main(*cuda)
    assert status == 0, stderr
    assert "capturable=True" not in stderr                    # the expected warm-up warning is not shown
    on_cpu, on_gpu = metrics(reference_run[0]), metrics(tmp_path / "cuda")
    assert on_gpu.keys() == on_cpu.keys()
    for name in ("none", "crop"):
        rows = [[json.loads(line) for line in (run / "seed0" / name / "metrics.jsonl").read_text().splitlines()]
                for run in (reference_run[0], tmp_path / "cuda")]
        assert rows[1][1]["train_loss"] == pytest.approx(rows[0][1]["train_loss"], rel=0.05)   # epoch 2 of stage 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_stage1_step_never_makes_the_host_wait_for_the_gpu():
    """Batch order, augmentation and step for every augmentation, under CUDA's sync debug mode: any copy or read
    that waits for the GPU (a blocking host-to-device copy, .item()) raises. Two warm-up steps first."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = vae.VAE(latent_dim=8, image_size=32).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_train = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=device)
    y_train = torch.zeros(64, dtype=torch.long, device=device)
    batch_rng, aug_rng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    for name in augment.AUGMENTATIONS:
        augment_fn = augment.by_name(name)
        for warm in (True, True, False):
            torch.cuda.set_sync_debug_mode(0 if warm else "error")
            try:
                for x_uint8, _ in data.shuffled_batches(x_train, y_train, 16, batch_rng):
                    x, x_aug = main.augmented_batch(x_uint8, augment_fn, 1.0, aug_rng)
                    vae.train_step(model, optimizer, x, x_aug, 1.0, contextlib.nullcontext())
            finally:
                torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


# The method itself: what a reviewer breaks first. Each test below fails when one line of the method changes.


def test_every_run_of_a_seed_starts_alike_and_sees_the_same_batches(tmp_path, monkeypatch, restore_signals):
    """The controlled comparison: every VAE of a seed and the ceiling's encoder start from the same weights and the
    same global stream (eps), and draw the same batch order and augmentation stream; every head of the same width
    starts alike; the untrained control encodes with the VAEs' initial weights."""
    starts, encoders = {}, []
    ledger_init, frozen_mu = main.Ledger.__init__, main.frozen_mu

    def recording_ledger(self, session, key, model, *rest):
        ledger_init(self, session, key, model, *rest)
        network = model.encoder if key[2] == "network" else model
        starts[key] = {"weights": {k: v.clone() for k, v in network.state_dict().items()},
                       "head": {k: v.clone() for k, v in model.head.state_dict().items()} if key[2] == "network" else None,
                       "generators": [g.get_state() for g in self.generators], "eps": torch.get_rng_state()}

    def recording_mu(model, args, session):
        encoders.append({k: v.clone() for k, v in model.state_dict().items()})
        return frozen_mu(model, args, session)
    monkeypatch.setattr(main.Ledger, "__init__", recording_ledger)
    monkeypatch.setattr(main, "frozen_mu", recording_mu)
    main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--aug", "crop,rotate", "--out", str(tmp_path / "run")])
    vaes = [starts[(0, name, "vae")] for name in ("none", "crop", "rotate")]
    ceiling = starts[(0, "supervised", "network")]
    for other in vaes[1:] + [ceiling]:
        assert all(torch.equal(vaes[0]["weights"][k], other["weights"][k]) for k in vaes[0]["weights"])
        assert all(torch.equal(a, b) for a, b in zip(vaes[0]["generators"], other["generators"]))
    assert all(torch.equal(vaes[0]["eps"], other["eps"]) for other in vaes[1:])
    assert all(torch.equal(vaes[0]["weights"][k], encoders[-1][k]) for k in encoders[-1])   # the untrained control
    heads = [starts[(0, name, "probe-mu")]["weights"] for name in ("none", "crop", "rotate")]
    heads += [starts[(0, "random-encoder", "probe-standardized")]["weights"], ceiling["head"]]
    assert all(torch.equal(heads[0][k], head[k]) for head in heads[1:] for k in heads[0])


def test_the_probe_reads_mu_of_the_frozen_encoder(tmp_path, monkeypatch, restore_signals):
    seen = {}
    train_probe, frozen_mu = main.train_probe, main.frozen_mu

    def recording_mu(model, args, session):
        features = frozen_mu(model, args, session)
        seen.setdefault("mu", (model, session, features))
        return features

    def recording_probe(name, features_name, features, *rest):
        seen.setdefault("probe", (name, features_name, features))
        return train_probe(name, features_name, features, *rest)
    monkeypatch.setattr(main, "frozen_mu", recording_mu)
    monkeypatch.setattr(main, "train_probe", recording_probe)
    main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--aug", "none", "--out", str(tmp_path / "run")])
    model, session, features = seen["mu"]
    assert seen["probe"][:2] == ("none", "mu") and seen["probe"][2] is features      # the head reads exactly these
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x = data.to_float(session.splits["train"][0][:40])
    torch.testing.assert_close(features["train"][:40], model.encode(x)[0], rtol=1e-4, atol=1e-5)   # mu in eval mode


class FakeVAE:
    """reconstruct(x_in) -> (x_hat, mu, logvar) with x_hat = weight * x_in + (1 - weight) * clean: weight 1 copies
    its input, 0.5 undoes half of any change; mu is the first 4 pixels."""
    def __init__(self, clean, weight):
        self.clean, self.weight = clean, weight

    def reconstruct(self, x_in):
        mu = x_in.flatten(1)[:, :4]
        return self.weight * x_in + (1 - self.weight) * self.clean, mu, torch.zeros_like(mu)


def test_measure_augmentation_on_a_hand_made_case():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))
    x_aug = main.fixed_draw("brightness-contrast", x, 1.0)
    vaes = {"none": FakeVAE(x, 1.0), "brightness-contrast": FakeVAE(x, 0.5)}
    heads = {name: probe.make_head(4, 3) for name in vaes}
    row = main.measure_augmentation("brightness-contrast", vaes, heads, x, y, 1.0, contextlib.nullcontext())
    error = (x_aug - x).pow(2).mean().item()
    assert row["mse_augmented_input"] == pytest.approx(error)
    assert row["baseline_mse_from_aug"] == pytest.approx(error) and row["baseline_mse_from_clean"] == 0
    assert row["augmented_mse_from_aug"] == pytest.approx(error / 4)          # half the change left: a quarter
    assert row["undone"] == pytest.approx(0.75)
    assert row["augmented_latent_shift"] == pytest.approx(row["baseline_latent_shift"])   # mu read from x_aug


def test_the_forecast_counts_exactly_the_loops_a_run_trains(reference_run):
    out = reference_run[0]
    loops = main.planned_loops(main.parse_args([*TINY, "--out", str(out)]), 288)
    written = {(int(p.parent.parent.name.removeprefix("seed")), p.parent.name, p.stem.removeprefix("checkpoint-"))
               for p in out.glob("seed*/*/checkpoint-*.pt")}
    assert set(loops) == written
    for (seed, name, part), (kind, epochs, per_epoch) in loops.items():
        state = torch.load(out / f"seed{seed}" / name / f"checkpoint-{part}.pt", weights_only=True)["loop"]
        assert (state["epoch"], state["step"]) == (epochs, 0) and per_epoch == (9 if kind.endswith("step") else 1)
    assert not any(main.Forecast(loops, out, 100).left.values())              # what the checkpoints say is done


def test_the_eta_follows_each_kind_of_work(tmp_path):
    loops = {(0, "none", "vae"): ("vae step", 4, 10), (0, "crop", "vae"): ("vae step", 4, 10),
             (0, "none", "probe-mu"): ("probe epoch, mu", 3, 1)}
    saved = dict.fromkeys(main.CHECKPOINT_KEYS) | {"format": main.CHECKPOINT_FORMAT, "loop": {"epoch": 1, "step": 4}}
    (tmp_path / "seed0" / "none").mkdir(parents=True)
    torch.save(saved, main.checkpoint_path(tmp_path, (0, "none", "vae")))     # continued: 1 epoch and 4 steps done
    forecast = main.Forecast(loops, tmp_path, 100)
    assert forecast.left == {"vae step": 26 + 40, "probe epoch, mu": 3}
    forecast.rate = {"vae step": 0.1, "probe epoch, mu": 2.0}                # the trials'
    assert forecast.seconds_left() == pytest.approx(66 * 0.1 + 3 * 2.0)
    forecast.epoch_done("vae step", 1.8, 6)                                  # the last 6 steps took 0.3 s each
    assert forecast.seconds_left() == pytest.approx(60 * 0.3 + 3 * 2.0)
    forecast.epoch_done("vae step", 1.0, 10)                                 # then 0.1 s: 2.8 s for 16 on average
    assert forecast.seconds_left() == pytest.approx(50 * 2.8 / 16 + 3 * 2.0)
    session = types.SimpleNamespace(folder=tmp_path, forecast=forecast)
    with pytest.raises(AssertionError, match="planned_loops does not count it"):
        main.Ledger(session, (0, "pixels", "probe-standardized"), None, None, [], "", ("loss",), "")


def test_the_trials_time_only_the_work_left(tmp_path, monkeypatch):
    timed = []
    time_trials = main.time_trials
    monkeypatch.setattr(main, "time_trials", lambda session, args, kinds: timed.append(kinds) or
                        time_trials(session, args, kinds))
    command = [*TINY, "--epochs", "1", "--probe-epochs", "1", "--out", str(tmp_path / "run")]
    main.main([*command, "--no-baseline"])
    main.main(command)                                                        # the crop VAE is done: the rest is timed
    main.main(command)                                                        # all done: nothing is
    assert timed == [{"vae step", "probe epoch, mu"}, {"vae step", "probe epoch, mu", "probe epoch, pixels",
                                                       "supervised step"}, set()]


def test_results_name_the_code_that_wrote_them(reference_run):
    out = reference_run[0]
    code = json.loads((out / "results.json").read_text())["code"]
    assert len(code["files_sha256"]) == 12 and code["files_sha256"] in (out / "results.md").read_text()


@pytest.mark.parametrize("differences, verdict", [
    ([1.0, 2.0, 3.0], "t = 3.46, two-sided 5% critical value 4.303 for 2 df: not distinguishable from chance"),
    ([2.0, 2.1, 1.9], "t = 34.64, two-sided 5% critical value 4.303 for 2 df: a real difference"),
    ([-1.0, 0.5, -2.0, -1.5], "3 of 4 seeds agree in sign"),
    ([1.5], "one seed: no test"),
])
def test_the_gap_line_is_a_paired_t_test(differences, verdict):
    records = [{"seed": s, "name": "none", "test_top1": 40.0 + s} for s in range(len(differences))]
    records += [{"seed": s, "name": "crop", "test_top1": 40.0 + s + d} for s, d in enumerate(differences)]
    assert verdict in probe.paired_gap(records, "crop")


def test_stage1_scores_the_clean_validation_images_and_their_fixed_draw(tmp_path, monkeypatch):
    seen = []
    validate = vae.validate

    def recording_validate(model, x, x_aug, beta):
        seen.append((x, x_aug, beta))
        return validate(model, x, x_aug, beta)
    monkeypatch.setattr(vae, "validate", recording_validate)
    main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--out", str(tmp_path / "run")])
    args = main.parse_args(TINY)
    splits, _ = main.load_data(args, torch.device("cpu"))
    x_val = data.to_float(splits["val"][0][:main.MEASURE_IMAGES])
    assert len(seen) == 2                                                      # one epoch of each VAE
    for (x, x_aug, beta), name in zip(seen, ("none", "crop")):
        assert torch.equal(x, x_val) and torch.equal(x_aug, main.fixed_draw(name, x_val, args.strength))
        assert beta == args.beta
    assert not torch.equal(seen[1][1], x_val)                                  # crop changed the view


def test_the_label_keeping_table_reads_each_vae_with_its_own_probe():
    torch.manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,))
    vaes = {"none": FakeVAE(x, 1.0), "rotate": FakeVAE(x, 0.5)}
    heads = {name: probe.make_head(4, 3) for name in vaes}
    with torch.no_grad():
        heads["rotate"][3].bias.copy_(torch.tensor([0.0, 0.0, 50.0]))          # this probe says class 2, always
    row = main.measure_augmentation("rotate", vaes, heads, x, y, 1.0, contextlib.nullcontext())
    expected = 100 * (y == 2).float().mean().item()
    assert row["augmented_top1_on_clean"] == pytest.approx(expected) and row["augmented_top1_on_aug"] == pytest.approx(expected)
    mu = x.flatten(1)[:, :4]
    assert row["baseline_top1_on_clean"] == pytest.approx(probe.evaluate(heads["none"], mu, y)["top1"])


def test_the_ceiling_trains_on_the_seeds_crops_of_the_seeds_batches(tmp_path, monkeypatch):
    """Its inputs are SUPERVISED_AUG of the batches stage 1 draws, from the seed's augmentation stream: recomputed
    here from the data and the seeds alone."""
    inputs = []
    supervised_step = probe.supervised_step

    def recording_step(network, optimizer, x_aug, y, autocast):
        inputs.append((x_aug.clone(), y.clone()))
        return supervised_step(network, optimizer, x_aug, y, autocast)
    monkeypatch.setattr(probe, "supervised_step", recording_step)
    main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--aug", "none", "--out", str(tmp_path / "run")])
    args = main.parse_args(TINY)
    x_train, y_train = main.load_data(args, torch.device("cpu"))[0]["train"]
    batch_rng = torch.Generator().manual_seed(0)                               # seed 0's batch order ...
    aug_rng = torch.Generator().manual_seed(1)                                 # ... and augmentation stream
    expected = [(augment.crop(data.to_float(x), args.strength, aug_rng), y)
                for x, y in data.shuffled_batches(x_train, y_train, args.batch_size, batch_rng)]
    assert main.SUPERVISED_AUG == "crop" and len(expected) == 9
    for (x_aug, y), (want_x, want_y) in zip(inputs[-9:], expected):          # the trial's steps come first
        assert torch.equal(y, want_y) and torch.equal(x_aug, want_x)


def test_every_control_keeps_its_history_and_is_drawn(reference_run, tmp_path, monkeypatch):
    out = reference_run[0]
    for name, epochs in (("pixels", 3), ("random-encoder", 3), ("supervised", 2)):
        rows = [json.loads(line) for line in (out / "seed0" / name / "metrics.jsonl").read_text().splitlines()]
        assert [row["epoch"] for row in rows] == list(range(1, epochs + 1)) and "val_top1" in rows[-1]
    drawn = []
    monkeypatch.setattr(probe, "draw_curves", lambda histories: drawn.append(histories) or Image.new("RGB", (9, 9)))
    main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--out", str(tmp_path / "run")])
    assert list(drawn[0]) == ["none", "crop", "pixels", "random-encoder", "supervised"]
    assert all(rows and all(row["stage"] != "vae" for row in rows) for rows in drawn[0].values())
