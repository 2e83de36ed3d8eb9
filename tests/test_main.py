"""main.py end to end on the offline `shapes` data: outputs, bad input, resume, determinism, divergence."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import main
import probe
import vae

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "shapes", "--limit", "320", "--epochs", "2", "--probe-epochs", "3",
        "--batch-size", "32", "--image-size", "32", "--latent-dim", "32", "--aug", "crop"]
METRICS = ("test_top1", "test_top5", "test_loss", "val_top1", "val_top5", "train_top1", "mse_clean", "mse_aug")


def run_main(*args, **kwargs):
    """main.py as a user runs it: a subprocess, returning (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)
    return done.returncode, done.stdout, done.stderr


def metrics(run_dir):
    runs = json.loads((Path(run_dir) / "summary.json").read_text())["runs"]
    return {name: {k: r[k] for k in METRICS} for name, r in runs.items()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that compare against it."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    status, stdout, stderr = run_main(*TINY, "--out", str(out))
    assert status == 0, stderr
    return out, stdout


@pytest.fixture
def restore_signals():
    """main() installs SIGINT/SIGTERM handlers; give pytest its own back afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    main.STOP.clear()


def test_end_to_end_writes_every_output(reference_run):
    out, stdout = reference_run
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"none", "crop"} and summary["torch"] == torch.__version__
    for r in summary["runs"].values():
        assert 0 <= r["test_top1"] <= r["test_top5"] <= 100 and r["test_top5"] > 0
        assert 0 < r["mse_clean"] < 0.25 and 0 < r["mse_aug"] < 0.25
        assert r["vae_images_per_s"] > 0 and r["vae_seconds"] > 0 and r["probe_seconds"] > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * (2 + 3)                                     # 2 runs x (2 VAE + 3 probe epochs)
    assert Image.open(out / "reconstructions.png").size == (110 + 8 * 64, 4 * 64)
    assert Image.open(out / "curves.png").size[0] > 600
    model, head = vae.VAE(latent_dim=32, image_size=32), probe.make_head(32, 9)
    model.load_state_dict(torch.load(out / "vae-crop.pt"))
    head.load_state_dict(torch.load(out / "probe-crop.pt"))
    assert "test top-1" in stdout and "stage 1 [crop] epoch 2/2" in stdout


def test_same_seed_gives_the_same_metrics(reference_run, tmp_path):
    status, _, stderr = run_main(*TINY, "--out", str(tmp_path / "again"))
    assert status == 0, stderr
    assert metrics(tmp_path / "again") == metrics(reference_run[0])


def test_interrupt_and_resume_match_an_uninterrupted_run(reference_run, tmp_path):
    out = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "main.py", *TINY, "--out", str(out), "--log-every", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:                               # wait until stage 1 is midway through epoch 2
        if "stage 1 [none] epoch 2/2 step 3/" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in stderr
    assert not (out / "summary.json").exists()
    status, stdout, stderr = run_main("--out", str(out), "--resume")
    assert status == 0, stderr
    assert "stage 1 [none] epoch 1/2" not in stdout          # the finished epoch was not trained again
    assert metrics(out) == metrics(reference_run[0])


def test_a_run_folder_is_never_silently_overwritten(reference_run, capsys, restore_signals):
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(reference_run[0])])
    assert e.value.code == 2 and "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--probe-epochs", "-3"], "--probe-epochs must be at least 1"),
    (["--batch-size", "100000"], "larger than the"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--limit", "10000000"], "is more than the"),
    (["--limit", "4", "--batch-size", "2"], "leaves no validation images"),
    (["--device", "tpu"], "--device"),
    (["--image-size", "48"], "multiple of 32"),
    (["--resume"], "holds no run"),
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
    checkpoint = out / "checkpoint-none-vae.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(SystemExit) as e:
        main.main(["--out", str(out), "--resume"])
    assert e.value.code == 2 and "truncated or unreadable" in capsys.readouterr().err


def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch, restore_signals):
    calls, elbo = [0], vae.elbo

    def elbo_that_blows_up(*args, **kwargs):    # 9 steps + 2 validation calls in epoch 1, then step 3 of epoch 2
        calls[0] += 1
        parts = elbo(*args, **kwargs)
        return parts._replace(loss=parts.loss * float("nan")) if calls[0] == 14 else parts
    monkeypatch.setattr(vae, "elbo", elbo_that_blows_up)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 3 and "stage 1 (none) diverged" in err and "epoch 2, step 3" in err and "--lr" in err
    assert torch.load(out / "checkpoint-none-vae.pt")["epoch"] == 1     # the last good epoch, loadable
