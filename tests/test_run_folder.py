"""The run folder is the user's work: resuming never wipes it, loading a checkpoint runs no code, one process writes
it at a time, every file lands whole or not at all, and each fault a user can meet is one line and status 2."""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import augment
import main
import vae
from conftest import ROOT, TINY, continue_command, ledger_for, metrics, run_main


def interrupt_at(command, line_start):
    """Run main.py with `command`, send SIGINT when a stdout line starts with line_start. -> (status, stderr)"""
    proc = subprocess.Popen([sys.executable, "main.py", *command, "--log-every", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith(line_start):
            proc.send_signal(signal.SIGINT)
            break
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


def test_the_printed_command_of_an_overwrite_run_continues_it(reference_run, tmp_path):
    out = tmp_path / "run with a space"
    status, stderr = interrupt_at([*TINY, "--out", str(out), "--overwrite"], "stage 1 [seed 0, none] epoch 2/2 step 3/")
    assert status == 130
    printed = continue_command(stderr)
    assert printed == [*TINY, "--out", str(out), "--log-every", "0"]            # the same command, no --overwrite
    status, stdout, stderr = run_main(*printed)
    assert status == 0, stderr
    assert "stage 1 [seed 0, none] epoch 1/2" not in stdout                   # not started over
    assert metrics(out) == metrics(reference_run[0])
    assert "overwrite" not in json.loads((out / "args.json").read_text())


def test_the_ceiling_resumes_to_the_step(reference_run, tmp_path):
    out = tmp_path / "run"
    status, _ = interrupt_at([*TINY, "--out", str(out)], "control [seed 0, supervised] epoch 2/2 step 3/")
    assert status == 130
    saved = torch.load(out / "seed0" / "supervised" / "checkpoint-network.pt", weights_only=True)["loop"]
    assert saved["epoch"] == 1 and 3 <= saved["step"] < 9                      # mid-epoch (9 steps), not redone
    status, stdout, stderr = run_main(*TINY, "--out", str(out))
    assert status == 0, stderr
    assert "control [seed 0, supervised] epoch 1/2" not in stdout
    assert metrics(out) == metrics(reference_run[0])


class RunsCode:
    """Unpickling this calls open(path, 'w'): it would create a file, as any code could run."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_checkpoint_that_would_run_code_is_refused(reference_run, tmp_path, capsys, restore_signals):
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    marker = tmp_path / "code-ran"
    torch.save({"format": main.CHECKPOINT_FORMAT, "loop": RunsCode(str(marker))}, out / "seed0" / "none" / "checkpoint-vae.pt")
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(out)])
    assert e.value.code == 2 and "holds more than tensors" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("missing", ["format", "loop"])   # the code before the Ledger; a layout without loop state
def test_a_checkpoint_of_another_main_py_is_refused_in_one_line(missing, reference_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    path = out / "seed0" / "crop" / "checkpoint-vae.pt"
    saved = torch.load(path, weights_only=True)
    del saved[missing]
    torch.save(saved, path)
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "written by another version of main.py" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("damage", ["missing", "not json", "a list", "an old version"])
def test_args_json_missing_or_damaged_beside_checkpoints(damage, reference_run, tmp_path, capsys, restore_signals):
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    path = out / "args.json"
    if damage == "missing":
        path.unlink()
    else:
        path.write_text({"not json": "{\"epochs\": 2", "a list": "[1, 2]", "an old version": "{\"epochs\": 2}"}[damage])
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "args.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)                     # another run holds the folder
        status, _, stderr = run_main(*TINY, "--out", str(out))
    assert status == 2 and "in use by another run" in stderr
    assert not list(out.glob("seed*"))


def test_a_full_disk_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    model = vae.VAE(latent_dim=8, image_size=32)
    ledger = ledger_for(tmp_path, model, torch.optim.Adam(model.parameters()))
    ledger.save()
    path = tmp_path / "seed0" / "none" / "checkpoint-vae.pt"
    good = path.read_bytes()
    placeholder = tmp_path / "placeholder.tmp"
    placeholder.write_bytes(b"")

    def mkstemp_on_a_full_disk(**kwargs):
        return os.open("/dev/full", os.O_WRONLY), str(placeholder)
    monkeypatch.setattr(main.data.tempfile, "mkstemp", mkstemp_on_a_full_disk)
    ledger.epoch = 2
    with pytest.raises(SystemExit) as e:
        ledger.save()
    assert e.value.code == 2 and "No space left" in capsys.readouterr().err
    assert path.read_bytes() == good and not placeholder.exists()


def test_write_file_reaches_the_disk_before_the_rename_and_leaves_no_temporary(tmp_path, monkeypatch):
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(main.data.os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(main.data.os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    main.write_file(tmp_path / "results.md", "first")
    main.write_file(tmp_path / "results.md", "second")
    assert calls[:3] == ["fsync", "replace", "fsync"]                          # the file, the rename, its folder
    assert (tmp_path / "results.md").read_text() == "second"
    assert os.listdir(tmp_path) == ["results.md"]                             # unique temporaries, all renamed


def test_a_signal_during_the_report_finishes_it_then_exits_130(tmp_path, monkeypatch, capsys, restore_signals):
    write_results = main.write_results

    def signalled_while_writing(*args):
        main.STOP.set()                                                       # as Ctrl-C would
        write_results(*args)
    monkeypatch.setattr(main, "write_results", signalled_while_writing)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--out", str(out)])
    assert e.value.code == 130
    assert all((out / name).exists() for name in ("results.md", "results.json", "reconstructions.png", "curves.png"))


def test_strength_below_the_limit_keeps_every_augmentation_defined():
    torch.manual_seed(0)
    x = torch.rand(256, 3, 16, 16) * 0.8 + 0.1
    for name, augmentation in augment.AUGMENTATIONS.items():
        x_aug = augmentation(x, 0.999 * augment.MAX_STRENGTH, torch.Generator().manual_seed(0))
        assert torch.isfinite(x_aug).all() and x_aug.min() >= 0 and x_aug.max() <= 1, name
        assert (x_aug.flatten(1).amax(1) > 0).all(), name                     # no image turned all black


def test_python_too_old_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(main.sys, "version_info", (3, 9, 18))
    with pytest.raises(SystemExit) as e:
        main.main(["--dataset", "shapes"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: this program needs Python 3.10 or newer; this is 3.9.18\n"


def test_the_folder_is_locked_before_its_settings_are_read(reference_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference_run[0], out)
    with open(out / "lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)                     # another run holds the folder ...
        status, _, stderr = run_main(*TINY, "--out", str(out), "--epochs", "3")   # ... and may change its settings
    assert status == 2 and "in use by another run" in stderr and "other settings" not in stderr


def test_overwrite_deletes_what_the_earlier_run_wrote_and_nothing_else(tmp_path, restore_signals):
    out = tmp_path / "run"
    main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--aug", "crop,rotate", "--out", str(out)])
    (out / "notes.txt").write_text("the user's own")
    (out / "seed0" / "rotate" / "my-plot.png").write_bytes(b"the user's own")
    main.main([*TINY, "--epochs", "1", "--probe-epochs", "1", "--aug", "crop", "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in (out / "seed0" / "rotate").iterdir()) == ["my-plot.png"]   # weights, metrics gone
    assert (out / "notes.txt").exists()
    records = json.loads((out / "results.json").read_text())["records"]
    assert "rotate" not in {r["name"] for r in records} and "rotate" not in (out / "results.md").read_text()


def test_a_signal_while_the_data_load_stops_at_once(tmp_path, monkeypatch, capsys):
    reached = []

    def interrupted_load(data_dir):                 # Ctrl-C in the middle of a download or a decode
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("the rest of the load")
        return main.data.load_shapes(data_dir)
    monkeypatch.setitem(main.data.LOADERS, "shapes", interrupted_load)
    with pytest.raises(SystemExit) as e:
        main.main([*TINY, "--out", str(tmp_path / "run")])
    assert e.value.code == 130 and "before training began" in capsys.readouterr().err
    assert not reached and not list((tmp_path / "run").glob("seed*"))


def test_main_twice_in_one_process(tmp_path, monkeypatch):
    """A run stopped by a signal leaves nothing behind in the process: the next main() trains to its end, and the
    handlers are the caller's again."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    train_step = vae.train_step

    def signalled_step(*args):
        main.STOP.set()                                                       # as Ctrl-C during the first step
        return train_step(*args)
    monkeypatch.setattr(vae, "train_step", signalled_step)
    command = [*TINY, "--epochs", "1", "--probe-epochs", "1", "--aug", "none", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        main.main(command)
    assert e.value.code == 130 and {sig: signal.getsignal(sig) for sig in handlers} == handlers
    monkeypatch.setattr(vae, "train_step", train_step)
    main.main(command)                                                        # continues, and is not stopped
    assert (tmp_path / "run" / "results.json").exists() and not main.STOP.is_set()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
