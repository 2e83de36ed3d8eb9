"""What the README promises a reader runs as written: the "Use a trained VAE" code works, and `--recipe ours` is the
flags the README says it is."""
import json
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

import main
import vae
from conftest import ROOT


def readme_block(heading):
    """The first ```python block under `heading` in README.md."""
    section = (ROOT / "README.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_use_a_trained_vae_runs_as_written(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "cifar10-crop-seed0"
    (run / "seed0" / "crop").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"latent_dim": 16, "image_size": 32}))
    torch.save(vae.VAE(16, 32).state_dict(), run / "seed0" / "crop" / "vae.pt")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "my_photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(ROOT), *sys.path])
    exec(compile(readme_block("Use a trained VAE"), "README.md", "exec"), {})
    sheet = Image.open(tmp_path / "my_vae.png")
    assert sheet.size == (110 + 8 * 64, 3 * 64)          # x and two views, their x_hat, eight samples: 64 px each
    assert os.path.getsize(tmp_path / "my_vae.png") > 0


def test_the_recipe_is_what_the_readme_says():
    """The README names the flags `--recipe ours` stands for; a recipe changed in main.py without the README (or the
    other way round) fails here."""
    flags = re.search(r"\(`--recipe ours` is `([^`]*)`", (ROOT / "README.md").read_text()).group(1).split()
    by_recipe = vars(main.parse_args(["--recipe", "ours", "--out", "x"]))
    by_flags = vars(main.parse_args([*flags, "--out", "x"]))
    assert {k: v for k, v in by_recipe.items() if k != "recipe"} == {k: v for k, v in by_flags.items() if k != "recipe"}
