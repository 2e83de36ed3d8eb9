"""Fixtures shared by the tests: tiny data sets written in the official formats, and main.py's tiny reference run.

The expected counts in data.py are the real formats' (50,000/10,000 and 100,000/10,000/200); each fixture
monkeypatches them to its own tiny counts, so the loaders' count checks run for real on tiny data.
"""
import json
import pickle
import shlex
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import main

WNIDS = ["n02000003", "n02000001", "n02000002"]  # deliberately not sorted: class k is line k of wnids.txt
VAL_CLASSES = {"val_0.JPEG": 2, "val_1.JPEG": 0, "val_2.JPEG": 1}  # labels disagree with file order on purpose


def grey_level(k):
    """Every pixel of a tiny Tiny ImageNet image of class k has this value, so a test can read the class back."""
    return 50 + 80 * k


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """<tmp>/cifar/cifar-10-batches-py with 5 train batches of 4 images and a test batch of 4.

    Image i of the train split has R = i, G = 100 + i, B = 200 + i and label i % 10. Batches 1-3 are pickled with
    bytes keys (as the official Python 2 files load), 4, 5 and test_batch with str keys."""
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        index = np.arange(4 * b, 4 * b + 4)
        rows = np.concatenate([np.repeat(index[:, None] + offset, 1024, axis=1) for offset in (0, 100, 200)], axis=1)
        batch = {"data": rows.astype(np.uint8), "labels": [int(i % 10) for i in index]}
        if b < 3:
            batch = {key.encode(): value for key, value in batch.items()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    monkeypatch.setattr(data, "CIFAR10_COUNTS", (20, 4))
    return tmp_path / "cifar"


def write_image(path, k, grayscale=False):
    """A 64x64 JPEG of class k (every pixel grey_level(k)), as RGB or as a one-channel grayscale file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    level = grey_level(k)
    image = Image.new("L", (64, 64), level) if grayscale else Image.new("RGB", (64, 64), (level, level, level))
    image.save(path, "JPEG")


@pytest.fixture
def tinyimagenet_dir(tmp_path, monkeypatch):
    """<tmp>/tin/tiny-imagenet-200 in the official layout: 3 classes x 2 train images, 3 val images.

    One train image and one val image are grayscale JPEGs; val labels come only from val_annotations.txt."""
    root = tmp_path / "tin" / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for k, wnid in enumerate(WNIDS):
        for i in range(2):
            write_image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", k, grayscale=(k, i) == (0, 1))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")  # the official layout has these too
    lines = [f"{name}\t{WNIDS[k]}\t0\t0\t63\t63" for name, k in sorted(VAL_CLASSES.items(), reverse=True)]
    for name, k in VAL_CLASSES.items():
        write_image(root / "val" / "images" / name, k, grayscale=name == "val_1.JPEG")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(data, "TINYIMAGENET_COUNTS", (6, 3))
    monkeypatch.setattr(data, "TINYIMAGENET_CLASSES", 3)
    return tmp_path / "tin"


# ---------------------------------------------------------------- main.py end to end on the offline shapes set

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "shapes", "--limit", "320", "--epochs", "2", "--probe-epochs", "3",
        "--batch-size", "32", "--image-size", "32", "--latent-dim", "32", "--aug", "crop", "--device", "cpu"]
METRICS = ("test_top1", "test_top5", "test_loss", "val_top1", "kl", "augmented_mse_from_aug", "undone",
           "baseline_top1_on_aug", "augmented_latent_shift")


def run_main(*args, **kwargs):
    """main.py as a user runs it: a subprocess, returning (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kwargs)
    return done.returncode, done.stdout, done.stderr


def metrics(run_dir):
    records = json.loads((Path(run_dir) / "results.json").read_text())["records"]
    return {(r["seed"], r["name"]): {k: r.get(k) for k in METRICS} for r in records}


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One uninterrupted tiny run, shared by every test that compares against it."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    status, stdout, stderr = run_main(*TINY, "--out", str(out))
    assert status == 0, stderr
    return out, stdout


@pytest.fixture
def restore_signals():
    """main() gives back the caller's SIGINT/SIGTERM handlers and clears STOP itself (tested); this fixture does it
    again after a test that calls main() in-process, so that a failing test cannot leave them behind."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    main.STOP.clear()


def ledger_for(folder, model, optimizer, generators=(), hint="a lower --lr"):
    """A Ledger of stage 1's loop (seed 0, 'none': 2 epochs of 10 steps) in `folder`, outside a run."""
    key = (0, "none", "vae")
    session = types.SimpleNamespace(folder=folder, forecast=main.Forecast({key: ("vae step", 2, 10)}, folder, 100),
                                    device=torch.device("cpu"))
    return main.Ledger(session, key, model, optimizer, list(generators), "stage 1 [seed 0, none]", ("loss",), hint)


def continue_command(stderr):
    """The arguments of the command that the message of a stopped run prints, after `python main.py`."""
    lines = stderr.splitlines()
    line = lines[lines.index("stopped by a signal; the checkpoint is saved. Continue with the same command:") + 1]
    return shlex.split(line)[2:]
