"""Faults of a real cluster: a hung rank, a full disk, another number of processes on resume, and
bad inputs that used to end in a traceback. (A crashed rank under torchrun's elastic restart is in
test_resume.py, beside the uninterrupted run it is compared with.)"""
import errno
import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch

import train
import optim
import utils
from conftest import make_imagenet
from test_resume import rank_pid, start, wait_for_line
from test_train import SPY, TINY, fails_with, read_metrics, run_train


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 24 train images: 6 steps of a global batch of 4.
    return make_imagenet(tmp_path_factory.mktemp("data"), train=8, val=3)


def quick(data_root, out, *extra):
    args = ["--data", data_root, *TINY, "--output-dir", out, "--workers", "0", "--eval-every", "0", *extra]
    return [str(a) for a in args]


# ------------------------------------------------------------------------------- a hung rank

def test_a_stopped_rank_ends_the_run_after_dist_timeout_with_one_line(data_root, tmp_path):
    out = tmp_path / "run"
    process = start([*quick(data_root, out, "--batch-size", "2", "--epochs", "3"), "--dist-timeout", "4"], nproc=2)
    wait_for_line(process, "epoch 1/3 step 2/6")
    stopped, survivor = rank_pid(process.pid, 1), rank_pid(process.pid, 0)
    os.kill(stopped, signal.SIGSTOP)  # as a process stuck on a dead file system or a frozen node
    deadline = time.time() + 120
    while os.path.exists(f"/proc/{survivor}") and time.time() < deadline:
        time.sleep(0.2)
    assert not os.path.exists(f"/proc/{survivor}"), "rank 0 still waits for the stopped rank"
    os.kill(stopped, signal.SIGKILL)  # torchrun's SIGTERM stays pending in a stopped process
    out_text, err = process.communicate(timeout=60)
    assert process.returncode != 0
    lines = [line for line in err.splitlines() if line.startswith("error: rank 0")]
    assert len(lines) == 1, err
    # gloo words it by where the wait was: a collective of the loop, or DDP's all-reduce in backward
    assert re.match(r"error: rank 0 waited --dist-timeout 4 s for another process, which is stopped, hung or "
                    r"unreachable \((Timed out waiting 4000ms|Application timeout caused pair closure)", lines[0]), lines[0]
    assert lines[0].endswith("nothing was saved after the last checkpoint: rerun with --resume auto (exit code 4)")
    assert "exitcode  : 4" in err and 'train.py", line' not in err  # rank 0 left no traceback
    assert not (out / "last.pt").exists()


@pytest.mark.quick
def test_dist_timeout_must_be_positive(data_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(quick(data_root, tmp_path, "--dist-timeout", "0"))
    assert info.value.code == 2
    assert "argument --dist-timeout: must be a positive number of seconds, got 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------- a full disk

@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """A folder on a 70 MB file system: a tmpfs where this process may mount one (root), else a
    folder where os.fsync of a second checkpoint fails with ENOSPC (as NFS reports a full disk)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(folder)], capture_output=True).returncode == 0
    if not mounted:
        real_fsync, saves = os.fsync, []

        def fsync(fd):
            if ".last.pt.tmp." in os.readlink(f"/proc/self/fd/{fd}"):
                saves.append(fd)
                if len(saves) == 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_fsync(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    yield folder
    if mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.quick
def test_disk_full_while_saving_keeps_the_last_checkpoint_and_says_what_is_needed(data_root, small_disk, capsys):
    # A checkpoint of this model (B0, 3 classes, RMSprop) is 46 MB: the second does not fit beside the first.
    args = quick(data_root, small_disk, "--batch-size", "4", "--epochs", "1", "--save-every-steps", "1")
    assert train.main(args) == train.EXIT_DISK_FULL
    out = capsys.readouterr().err.strip().splitlines()
    assert len(out) == 1
    assert out[-1].startswith(f"error: no space left in {small_disk} for last.pt: it needs about 46 MB, "), out[-1]
    assert out[-1].endswith(f"are free ({small_disk / 'last.pt'} kept as it was). Free space there (or move the "
                            f"folder and pass it as --output-dir), then rerun with --resume auto")
    state = utils.load_checkpoint(str(small_disk / "last.pt"))  # whole: the save of step 1
    assert (state["epoch"], state["epoch_step"], state["step"]) == (0, 1, 1)
    assert sorted(os.listdir(small_disk)) == ["args.json", "last.pt", "metrics.jsonl"]  # no temporary


# ------------------------------------------------------------------ another number of processes

def spied(spy_dir, nproc):
    ranks = [json.load(open(spy_dir / f"rank{r}.json")) for r in range(nproc)]
    return ranks


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_processes_uses_every_image_once(data_root, tmp_path, capsys, before, after):
    """Global batch 4 = 2 x 2 processes x 1 = 2 x 1 process x 2 accumulation. The first run gets a
    SIGTERM at step 2 of 6 and stops there or, on 2 processes (whose stop check is asynchronous), a
    step or two later; the second finishes the epoch on the other number of processes."""
    out = tmp_path / "run"
    run = quick(data_root, out, "--batch-size", "2", "--epochs", "2", "--warmup-epochs", "0.5", "--run-epochs", "1")
    spies = {}
    for step, nproc in (("first", before), ("second", after)):
        spies[step] = tmp_path / step
        spies[step].mkdir()
        resume = ["--resume", "auto"] if step == "second" else []
        env = {"SPY_DIR": str(spies[step]), "SPY_SIGTERM_AT": "2" if nproc == 2 else "4"} if step == "first" else \
            {"SPY_DIR": str(spies[step])}
        env["OMP_NUM_THREADS"] = "1"  # as torchrun gives each of its processes: a second thread gains nothing here
        if step == "second" and after == 1:  # another global batch is refused, naming the fix
            fails_with(capsys, [*run, *resume, "--accum-steps", "1"], "the checkpoint's global batch is 4 (2 x 2 "
                       "process(es) x 1 accumulation), this run's 2 (2 x 1 x 1); the schedule and the sample order "
                       "need the same: pass --accum-steps 2 (or start anew from it with --weights)")
        result = run_train([*run, *resume, "--accum-steps", str(2 // nproc)], nproc=nproc if nproc > 1 else None,
                           script=SPY, env=env)
        if step == "first":
            stopped = re.search(r"stopped by SIGTERM at step (\d) \(epoch 1\)", result.stderr)
            assert result.returncode != 0 and stopped, result.stderr
            assert 2 <= int(stopped[1]) <= (2 if nproc == 1 else 4)
            left = 24 - 4 * int(stopped[1])
        else:
            assert result.returncode == 0, result.stderr[-3000:]
            assert (f"resuming on {after} process(es) x 2 x {2 // after} accumulation (the checkpoint: {before} x 2 "
                    f"x {2 // before}), the same global batch 4: epoch 1 continues with the {left} images not yet seen"
                    ) in result.stdout
    used, loss_per_step = [], 0.0
    for step, nproc in (("first", before), ("second", after)):
        for rank in spied(spies[step], nproc):
            used += rank["sampled"][: 2 * len(rank["losses"])]  # batch size 2
            loss_per_step += sum(rank["losses"]) / (2 // nproc) / nproc  # mean over ranks of the step's loss
    assert sorted(used) == list(range(24))  # every image exactly once
    state = torch.load(out / "last.pt", weights_only=True)
    assert (state["epoch"], state["epoch_step"], state["step"]) == (1, 0, 6)
    [row] = read_metrics(out)
    base_lr = 0.08 * 4 / 4096
    assert row["lr"] == pytest.approx(optim.lr_at(5, base_lr, warmup_steps=3, total_steps=12))
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(row["lr"])
    assert row["train_loss"] == pytest.approx(loss_per_step / 6, rel=1e-5)


# --------------------------------------------------------------------------------- bad input

@pytest.mark.quick
def test_sync_bn_on_the_cpu_is_refused(data_root, tmp_path, capsys):
    fails_with(capsys, quick(data_root, tmp_path, "--sync-bn"),
               "--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only); leave it off on the CPU")


@pytest.mark.quick
def test_resume_with_another_class_count_says_which_and_what_to_do(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    four = make_imagenet(tmp_path / "four", classes=("a", "b", "c", "d"), train=2, val=1)
    ten = make_imagenet(tmp_path / "ten", classes=tuple("abcdefghij"), train=1, val=1)
    base = [*TINY, "--workers", "0", "--eval-every", "0", "--epochs", "2", "--steps-per-epoch", "1"]
    assert train.main([str(a) for a in ["--data", four, *base, "--output-dir", out, "--run-epochs", "1"]]) == 0
    capsys.readouterr()
    fails_with(capsys, ["--data", ten, *base, "--resume", out / "last.pt"],
               f"the checkpoint was trained on 4 classes, this run has 10 (--data {ten}): resume it with its own "
               f"data, or fine-tune from it with --weights CHECKPOINT (a new run)")


@pytest.mark.quick
def test_weights_that_are_not_a_torch_file(data_root, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("lr 0.08 worked best\n")
    fails_with(capsys, quick(data_root, tmp_path / "out", "--weights", notes),
               f"--weights file {notes} is not a file that torch.save wrote; give a state dict saved by torch.save "
               f"(this repo's, torchvision's or timm's)")
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)  # a torch file, but not a dict of tensors
    fails_with(capsys, quick(data_root, tmp_path / "out", "--weights", listed),
               f"--weights file {listed} holds a list, not a checkpoint or state dict; give a state dict saved by "
               f"torch.save (this repo's, torchvision's or timm's)")


@pytest.mark.quick
def test_data_that_is_a_file(data_root, tmp_path, capsys):
    some_file = tmp_path / "imagenet.tar"
    some_file.write_bytes(b"not a folder")
    fails_with(capsys, quick(some_file, tmp_path / "out"), f"data folder {some_file} is a file, not a folder")


# ------------------------------------------------------------- inputs that must never start a run

@pytest.mark.quick
@pytest.mark.parametrize("extra, message", [
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--mean", "0.5", "nan", "0.5"], "--mean must be a finite number, got 0.5 nan 0.5"),
    (["--image-size", "0"], "--image-size must be in [16, 4096], got 0"),
    (["--warmup-epochs", "-1"], "--warmup-epochs must not be negative, got -1.0"),
    (["--num-classes", "2"], "--num-classes 2 is smaller than the 3 classes of --data"),
])
def test_bad_numbers_are_refused_before_any_folder_is_made(data_root, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    fails_with(capsys, quick(data_root, out, *extra), message)
    assert not out.exists()


@pytest.mark.quick
def test_output_dir_that_cannot_be_a_folder_is_refused(data_root, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    fails_with(capsys, quick(data_root, a_file), f"--output-dir {a_file}: {a_file} is a file, not a folder")
    fails_with(capsys, quick(data_root, a_file / "run"), f"--output-dir {a_file / 'run'}: {a_file} is a file")
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: fake a read-only folder
    fails_with(capsys, quick(data_root, tmp_path / "run"), f"--output-dir {tmp_path / 'run'}: no permission to "
               f"write in {tmp_path}; choose another --output-dir")
    assert not (tmp_path / "run").exists()


@pytest.mark.quick
def test_more_classes_than_the_data_and_a_long_warmup_run_with_one_line_each(tmp_path, capsys):
    data_root, out = make_imagenet(tmp_path / "data", train=2, val=1), tmp_path / "run"
    (tmp_path / "data" / "train" / "a" / "notes.txt").write_text("where these came from")
    assert train.main(quick(data_root, out, "--num-classes", "5", "--epochs", "1", "--steps-per-epoch", "1")) == 0
    stdout = capsys.readouterr().out
    assert f"skipped 1 files that are not images: {tmp_path / 'data' / 'train' / 'a' / 'notes.txt'}" in stdout
    assert "note: --num-classes 5: 2 outputs more than the 3 classes of --data" in stdout
    assert "warning: the warmup (16 epochs) is not shorter than the run (1 epochs)" in stdout
    assert torch.load(out / "last.pt", weights_only=True)["model"]["classifier.weight"].shape[0] == 5
    assert not (out / ".lock").exists()  # the lock ends with the run


# ------------------------------------------------- inputs that ran, silently wrong or runaway (issue 27)

@pytest.mark.quick
@pytest.mark.parametrize("extra, message", [
    (["--min-lr", "1"], "--min-lr 1 is above the learning rate 7.8125e-05 (--lr 0.08 per 4096 images, at this global "
                        "batch): the schedule would climb; give a smaller --min-lr"),
    (["--repeated-aug", "100000"], "--repeated-aug 100000 repeats each image more often than a process has images "
                                   "(24 over 1 process(es)): give 1 to 24"),
    (["--predict", "photos"], "--predict is its own command now: python predict.py PATH ... --checkpoint CKPT"),
    (["--top-k", "3"], "--top-k is its own command now: python predict.py"),
    (["--average", "runs/a"], "--average is its own command now: python average.py RUN ... --output FILE"),
])
def test_settings_that_ran_wrong_are_refused_before_any_folder_is_made(data_root, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    try:
        fails_with(capsys, quick(data_root, out, *extra), message)
    except SystemExit as e:  # argparse's stage (the moved commands): the same one line, exit 2
        assert e.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.quick
def test_flags_without_effect_get_a_note(data_root, tmp_path, capsys):
    args = quick(data_root, tmp_path / "run", "--epochs", "1", "--steps-per-epoch", "1", "--decay-rate", "0.5",
                 "--keep-best", "2", "--progressive-resize", "32", "--warmup-lr", "0.01", "--warmup-epochs", "0")
    assert train.main(args) == 0
    out = capsys.readouterr().out
    for note in ("--decay-rate does nothing in this run: the schedule is --sched cosine",
                 "--keep-best does nothing in this run: --eval-every 0 never evaluates",
                 "--progressive-resize does nothing in this run: it starts at the train size",
                 "--warmup-lr does nothing in this run: there is no warmup"):
        assert f"note: {note}" in out
    assert train.main(["--data", data_root, *TINY, "--evaluate", "--resume", str(tmp_path / "run" / "last.pt"),
                       "--mixup", "0.2", "--epochs", "3", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "note: --epochs, --log-every, --mixup shape training and do nothing with --evaluate" in out and "changes" not in out


def test_a_class_map_that_relabels_the_checkpoint_s_classes_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(quick(data_root, out, "--epochs", "1", "--steps-per-epoch", "1")) == 0
    capsys.readouterr()
    evaluate = ["--data", data_root, *TINY, "--evaluate", "--resume", str(out / "last.pt"), "--workers", "0"]
    (tmp_path / "same.txt").write_text("a\nb\nc\n")
    assert train.main([*evaluate, "--class-map", str(tmp_path / "same.txt")]) == 0  # the checkpoint's own order
    (tmp_path / "swapped.txt").write_text("b\na\nc\n")
    fails_with(capsys, [*evaluate, "--class-map", str(tmp_path / "swapped.txt")],
               f"--class-map {tmp_path / 'swapped.txt'} gives class b label 0, but the checkpoint was trained with "
               f"it as label 1: list the class folders in the checkpoint's order (a, b, c, ...), or leave --class-map out")


@pytest.mark.quick
def test_memory_stays_flat_as_repeated_aug_grows():
    """The sampler holds one epoch's positions whatever --repeated-aug is (DeiT's form held size x N)."""
    import tracemalloc
    import data
    peaks = []
    for repeats in (1, 2, 100, 10_000):
        tracemalloc.start()
        sampler = data.TrainSampler(20_000, rank=1, world_size=2, seed=0, repeats=repeats)
        assert len(sampler.order()) == 20_000 and len(list(sampler)) == 10_000
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert max(peaks[1:]) < 1.5 * peaks[1], peaks  # the (index, copy) pairs: flat from 2 to 10,000 repeats


def test_a_checkpoint_with_weights_or_another_class_count_is_refused(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(quick(data_root, out, "--epochs", "1", "--steps-per-epoch", "1")) == 0
    capsys.readouterr()
    ckpt = str(out / "last.pt")
    fails_with(capsys, quick(data_root, tmp_path / "b", "--resume", ckpt, "--weights", ckpt),
               "give --resume CHECKPOINT (continue a run) or --weights (start from weights), not both")
    fails_with(capsys, ["--data", data_root, *TINY, "--evaluate", "--resume", ckpt, "--num-classes", "5"],
               "the checkpoint's model has 3 classes, not --num-classes 5: fine-tune from it with --weights "
               "CHECKPOINT (a new run)")
    assert sorted(os.listdir(out)) == ["args.json", "last.pt", "metrics.jsonl"]  # nothing of the run touched
