import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T

import checkpoints
import efficientnet
import train
import flags
import optim
import utils
from conftest import ROOT, calibrate_bn_, make_imagenet, randomize_

TRAIN = os.path.join(ROOT, "train.py")
SPY = os.path.join(ROOT, "tests", "spy_train.py")
# Tiny and fast: 32 px images, 4 per batch, eval resize 36 -> 32.
TINY = ["--image-size", "32", "--val-resize", "36", "--batch-size", "4", "--log-every", "1"]


def command(args, nproc=None, script=TRAIN, max_restarts=0):
    """The command line of train.py (or `script`), under torchrun with `nproc` processes (and
    --max-restarts) when `nproc` is given."""
    torchrun = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                                         f"--max-restarts={max_restarts}"]
    return [sys.executable, *torchrun, str(script), *map(str, args)]


def child_env(env=None):
    """The environment of a child process: the repo importable, plus `env`."""
    return dict(os.environ, PYTHONPATH=ROOT, **(env or {}))


def run_train(args, nproc=None, script=TRAIN, env=None, timeout=600, max_restarts=0):
    """train.py (or `script`) in a fresh process, to its end; under torchrun with `nproc` processes."""
    return subprocess.run(command(args, nproc, script, max_restarts), capture_output=True, text=True,
                          timeout=timeout, env=child_env(env))


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def read_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_evaluates_like(ours, reference, folder, transform):
    """train.py --evaluate's JSON `ours` equals `reference` run on `folder` through `transform`
    (torchvision's ImageFolder): the image count, top-1, top-5 and mean loss."""
    dataset = torchvision.datasets.ImageFolder(folder, transform)
    images = torch.stack([x for x, _ in dataset])
    labels = torch.tensor([y for _, y in dataset])
    with torch.no_grad():
        logits = reference(images)
    hits = logits.topk(5, 1).indices == labels[:, None]
    assert ours["images"] == len(dataset) == 9
    assert ours["top1"] == pytest.approx(100 * hits[:, 0].float().mean().item())
    assert ours["top5"] == pytest.approx(100 * hits.any(1).float().mean().item())
    assert ours["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    # 3 classes: 8 train images each (6 steps of 4), 3 val images each (9: uneven over 2 ranks).
    return make_imagenet(tmp_path_factory.mktemp("data"), train=8, val=3)


# ------------------------------------------------------------------------------ pure functions

def test_lr_schedule_warmup_and_cosine():
    lr = lambda step: optim.lr_at(step, base_lr=0.1, warmup_steps=10, total_steps=110)
    assert lr(0) == pytest.approx(0.01)  # first warmup step: 1/10 of the base
    assert lr(9) == pytest.approx(0.1)  # last warmup step reaches the base
    assert lr(10) == pytest.approx(0.1)  # cosine starts at the base
    assert lr(60) == pytest.approx(0.05)  # cosine midpoint: half
    assert lr(110) == pytest.approx(0.0, abs=1e-12) and 0 < lr(109) < 1e-4
    assert optim.lr_at(110, 0.1, 10, 110, min_lr=0.01) == pytest.approx(0.01)
    assert optim.lr_at(60, 0.1, 10, 110, min_lr=0.01) == pytest.approx(0.055)
    assert optim.lr_at(5, 0.1, 0, 10) == pytest.approx(0.05)  # no warmup: cosine from step 0


def test_label_smoothing_and_mixup_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    log_p = [2.0 - math.log(math.exp(2) + 1 + math.exp(-1)), -math.log(math.exp(2) + 1 + math.exp(-1)),
             -1.0 - math.log(math.exp(2) + 1 + math.exp(-1))]
    # Smoothing 0.1 over 3 classes: target 0 gets 0.9 + 0.1/3, the others 0.1/3.
    expected = -((0.9 + 0.1 / 3) * log_p[0] + 0.1 / 3 * log_p[1] + 0.1 / 3 * log_p[2])
    assert optim.criterion(logits, torch.tensor([0]), 0.1).item() == pytest.approx(expected, rel=1e-6)
    # Mixup 0.7 / 0.3 of classes 0 and 1, then smoothing: q = 0.9 * mix + 0.1 / 3.
    mix = [0.7, 0.3, 0.0]
    expected = -sum((0.9 * m + 0.1 / 3) * lp for m, lp in zip(mix, log_p))
    soft = torch.tensor([mix])
    assert optim.criterion(logits, soft, 0.1).item() == pytest.approx(expected, rel=1e-6)
    # bf16 logits are scored in float32.
    assert optim.criterion(logits.bfloat16(), torch.tensor([0]), 0.0).dtype == torch.float32


def test_ema_update_follows_the_formula():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = utils.EMA(model, decay=0.99)
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(4.0)
    ema.update(step=0)  # warm-up: mu = min(0.99, 1 / 10) = 0.1
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(ema.state_dict()[name], 0.1 * old[name] + 0.9 * value)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(step=10_000)  # mu = min(0.99, 10001 / 10010) = 0.99
    torch.testing.assert_close(ema.state_dict()["0.weight"], 0.99 * before["0.weight"] + 0.01 * model[0].weight)
    assert not any(p.requires_grad for p in ema.module.parameters())


# ------------------------------------------------------------------------------ end-to-end runs

def test_short_run_writes_outputs_and_evaluate_reproduces(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = run_train(["--data", tiny_data, "--output-dir", out, "--epochs", "2", "--warmup-epochs", "1",
                        "--workers", "1", *TINY])
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(out)) == ["args.json", "best.pt", "last.pt", "metrics.jsonl"]
    assert "global batch 4 = 4 x 1 process(es) x 1 accumulation; lr 0.08 per 4096 -> 7.8125e-05" in result.stdout
    assert "on cpu, amp off, NCHW, lean activations" in result.stdout
    args = json.load(open(out / "args.json"))
    assert args["arch"] == "b0" and args["weight_decay"] == 1e-5 and args["dropout"] == 0.2
    assert (args["output_dir"], args["num_classes"], args["channels_last"], args["lean_activations"],
            args["amp"], args["batch_size"]) == (str(out), 3, False, True, "off", 4)  # resolved, not null
    # Not given: the weights started from, the checkpoint resumed, and the evaluation-only files.
    assert [k for k, v in args.items() if v is None] == ["weights", "resume", "class_map", "real_labels"]
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        assert set(row) == {"epoch", "lr", "train_loss", "images_per_sec", "epoch_seconds", "data_seconds",
                            "val_top1", "val_top5", "val_loss"}
        assert 0 < row["data_seconds"] < row["epoch_seconds"]
    assert "data " in result.stdout.split("step 1/6")[1].splitlines()[0]  # the log line's data share, e.g. "data 3%"
    # The last step of the schedule (6 steps per epoch, 6 warmup steps, 12 in all) is step 11.
    assert rows[-1]["lr"] == pytest.approx(optim.lr_at(11, 0.08 * 4 / 4096, 6, 12))
    last = torch.load(out / "last.pt", weights_only=True)
    assert (last["epoch"], last["epoch_step"], last["step"]) == (2, 0, 12)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in last["model"])
    best = torch.load(out / "best.pt", weights_only=True)
    best_epoch = max(range(2), key=lambda i: (rows[i]["val_top1"], -i))  # first epoch with the best top-1
    assert best["epoch"] == best_epoch + 1 and best["best_top1"] == rows[best_epoch]["val_top1"]
    # The checkpoint's own data, 32 px and eval resize: no flag repeated.
    evaluation = run_train(["--evaluate", "--resume", out / "last.pt"])
    assert evaluation.returncode == 0, evaluation.stderr
    result = last_json(evaluation.stdout)
    assert result == {"top1": rows[-1]["val_top1"], "top5": rows[-1]["val_top5"],
                      "loss": rows[-1]["val_loss"], "images": 9}
    other = run_train(["--evaluate", "--resume", out / "last.pt", "--image-size", "48", "--workers", "0"])
    assert other.returncode == 0, other.stderr
    assert ("note: the command line changes the run's --image-size 32 -> 48, --val-resize 36 -> 80; its other "
            "settings are the checkpoint's") in other.stdout
    assert last_json(other.stdout)["loss"] != result["loss"]  # evaluated at 48 px (resize 80), as asked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_run_with_amp_and_evaluate_reproduces(tiny_data, tmp_path, amp, capsys):
    """The GPU path end to end: pinned, prefetched batches, channels_last, autocast (fp16 with the
    GradScaler and its skipped-step count), then --evaluate. In this process: each new process
    would spend ~30 s starting CUDA. (--compile: benchmarks/gpu.sh.)"""
    out = tmp_path / "run"
    assert train.main([str(a) for a in ["--data", tiny_data, "--output-dir", out, "--epochs", "2",
                                        "--warmup-epochs", "1", "--workers", "2", "--amp", amp, *TINY]]) == 0
    assert f"on cuda, amp torch.{'float16' if amp == 'fp16' else 'bfloat16'}, channels_last" in capsys.readouterr().out
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in rows)
    assert ("skipped_steps" in rows[-1]) == (amp == "fp16")
    assert train.main([str(a) for a in ["--evaluate", "--resume", out / "last.pt", "--data", tiny_data,
                                        "--amp", amp, *TINY]]) == 0
    result = last_json(capsys.readouterr().out)
    assert result["images"] == 9 and result["top1"] == rows[-1]["val_top1"]
    assert result["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-3)  # cuDNN may pick other kernels


def test_two_processes_agree_count_once_and_only_rank0_writes(tiny_data, tmp_path):
    out, spy = tmp_path / "run", tmp_path / "spy"
    spy.mkdir()
    result = run_train(["--data", tiny_data, "--output-dir", out, "--epochs", "2", "--warmup-epochs", "1",
                        "--workers", "1", "--accum-steps", "2", "--ema-decay", "0.9", "--mixup", "0.2",
                        "--no-lean-activations", *TINY],  # (the single-process runs use the CPU default, lean)
                       nproc=2, script=SPY, env={"SPY_DIR": str(spy), "SPY_WATCH": str(out)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "amp off, NCHW\n" in result.stdout
    assert "global batch 16 = 4 x 2 process(es) x 2 accumulation; lr 0.08 per 4096 -> 0.0003125" in result.stdout
    ranks = [json.load(open(spy / f"rank{r}.json")) for r in range(2)]
    assert ranks[1]["writes"] == []  # rank 1 opened, renamed, linked or saved nothing in the run folder
    assert sorted(os.listdir(out)) == ["args.json", "best.pt", "last.pt", "metrics.jsonl"]
    # Each evaluation counted the 9 val images once in total (shards of 5 and 4) and both ranks
    # report the same numbers: the model and the EMA, two epochs.
    assert len(ranks[0]["evaluations"]) == 4
    assert all(e["images"] == 9 for r in ranks for e in r["evaluations"])
    assert ranks[0]["evaluations"] == ranks[1]["evaluations"]
    # Both ranks evaluated bitwise-identical models, equal to what rank 0 saved.
    saved = torch.load(out / "last.pt", weights_only=True)
    for i in range(4):
        states = [torch.load(spy / f"rank{r}_eval{i}.pt", weights_only=True) for r in range(2)]
        for name, value in states[0].items():
            assert torch.equal(value, states[1][name]), (i, name)
    for name, value in torch.load(spy / "rank0_eval2.pt", weights_only=True).items():
        assert torch.equal(value, saved["model"][name]), name
    for name, value in torch.load(spy / "rank0_eval3.pt", weights_only=True).items():
        assert torch.equal(value, saved["ema"][name]), name
    # The distributed numbers are those of a single-process evaluation of the same checkpoint.
    rows = read_metrics(out)
    single = last_json(run_train(["--evaluate", "--resume", out / "last.pt", "--data", tiny_data,
                                  "--no-lean-activations", *TINY]).stdout)
    assert single["top1"] == rows[-1]["val_top1"] and single["top5"] == rows[-1]["val_top5"]
    assert single["loss"] == pytest.approx(rows[-1]["val_loss"], rel=1e-5)
    assert single["ema_top1"] == rows[-1]["val_ema_top1"]


def test_torchvision_weights_evaluate_like_torchvision(tiny_data, tmp_path):
    reference = randomize_(torchvision.models.efficientnet_b0(), seed=4).eval()
    torch.save(reference.state_dict(), tmp_path / "tv_b0.pth")
    result = run_train(["--evaluate", "--weights", tmp_path / "tv_b0.pth", "--data", tiny_data,
                        "--num-classes", "1000", *TINY])
    assert result.returncode == 0, result.stderr
    ours = last_json(result.stdout)
    # torchvision's own pipeline on the same files: Resize(36) + CenterCrop(32), bicubic, normalise.
    tf = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    assert_evaluates_like(ours, reference, os.path.join(tiny_data, "val"), tf)


# --------------------------------------------------------------------------------- bad input

def fails_with(capsys, args, message, code=2):
    assert train.main([str(a) for a in args]) == code
    err = capsys.readouterr().err.strip()
    assert message in err, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_exits_2_with_one_line(tiny_data, tmp_path, capsys):
    base = ["--data", tiny_data, *TINY, "--output-dir", tmp_path / "out", "--workers", "0"]
    with pytest.raises(SystemExit) as info:  # argparse's own checks: one line, exit 2 as well
        train.main(["--data", tiny_data, "--opt", "adam"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'adam'" in err and len(err.splitlines()) == 1
    fails_with(capsys, [*base, "--arch", "b9"], "unknown EfficientNet arch 'b9'; valid: b0, b1, b2, b3, b4, b5, b6, b7")
    fails_with(capsys, [*base, "--batch-size", "0"], "--batch-size must be positive, got 0")
    fails_with(capsys, [*base, "--image-size", "-32"], "--image-size must be in [16, 4096], got -32")
    fails_with(capsys, [*base, "--epochs", "0"], "--epochs must be positive")
    fails_with(capsys, [*base, "--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)")
    fails_with(capsys, [*base, "--val-resize", "24"], "--val-resize 24 is smaller than --image-size 32")
    fails_with(capsys, [*base, "--batch-size", "32"], "a step needs 32 images")
    fails_with(capsys, [*base, "--data", tmp_path / "missing"], f"data folder {tmp_path / 'missing'} does not exist")
    fails_with(capsys, [*base, "--evaluate"], "--evaluate needs --resume CHECKPOINT or --weights FILE")
    fails_with(capsys, [*base, "--resume", "auto", "--output-dir", ""], "--resume auto needs --output-dir")
    fails_with(capsys, [*base, "--resume", tmp_path / "nope.pt"], "nope.pt does not exist")
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated zip")
    fails_with(capsys, [*base, "--resume", tmp_path / "corrupt.pt"], "corrupt.pt is corrupt or truncated")
    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    fails_with(capsys, [*base, "--weights", tmp_path / "b1.pth"], "does not fit this model")
    fails_with(capsys, [*base, "--resume", tmp_path / "b1.pth"], "is not a train.py checkpoint")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pth")
    fails_with(capsys, [*base, "--evaluate", "--weights", tmp_path / "resnet.pth"], "not an EfficientNet")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_decode_gpu_without_cuda_exits_2_with_one_line(tiny_data, tmp_path, capsys):
    fails_with(capsys, ["--data", tiny_data, *TINY, "--output-dir", tmp_path / "out", "--decode", "gpu"],
               "--decode gpu needs a CUDA GPU and none is visible; use --decode cpu")


FLAKY = """import os, sys
import train, utils
target, counter = os.environ["FLAKY_FILE"], os.environ["FLAKY_COUNTER"]
real_open = open
def flaky_open(path, *args, **kwargs):  # the first reads of `target` fail, in whichever worker
    if str(path) == target:
        with real_open(counter) as f:
            left = int(f.read())
        if left > 0:
            with real_open(counter, "w") as f:
                f.write(str(left - 1))
            raise OSError(5, "Input/output error", path)
    return real_open(path, *args, **kwargs)
utils.open = flaky_open
utils.READ_BACKOFF_SECONDS = 0.001
sys.exit(train.main())
"""


def test_flaky_reads_are_retried_and_reported_per_epoch(tiny_data, tmp_path):
    script, counter = tmp_path / "flaky_train.py", tmp_path / "failures_left"
    script.write_text(FLAKY)
    counter.write_text("3")
    flaky = os.path.join(tiny_data, "train", "b", "b_1.jpeg")
    out = tmp_path / "run"
    result = run_train(["--data", tiny_data, *TINY, "--output-dir", out, "--workers", "2", "--epochs", "2",
                        "--warmup-epochs", "1"], script=script, env={"FLAKY_FILE": flaky, "FLAKY_COUNTER": str(counter)})
    assert result.returncode == 0, result.stderr
    rows = read_metrics(out)
    assert rows[0]["read_retries"] == 3 and "read_retries" not in rows[1]  # reported only when there were any
    assert counter.read_text() == "0"


def test_checkpoint_of_another_arch_and_occupied_output_dir(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--data", tiny_data, *TINY, "--output-dir", out, "--workers", "0", "--epochs", "1",
            "--steps-per-epoch", "1", "--eval-every", "0"]
    assert train.main([str(a) for a in args]) == 0
    capsys.readouterr()
    fails_with(capsys, [*args, "--arch", "b1", "--resume", out / "last.pt"],
               "checkpoint is for b0, not b1: leave --arch out (or pass --arch b0)")
    fails_with(capsys, args, f"{out} already holds a run (last.pt): continue it with --resume auto")
    handle = utils.lock_run_dir(str(out))  # as if a run were still writing there
    try:
        fails_with(capsys, [*args, "--resume", "auto", "--epochs", "2"], f"{out} is in use by a running run (pid {os.getpid()}")
    finally:
        handle.close()
    assert train.main([str(a) for a in args + ["--resume", "auto"]]) == 0  # finished: nothing to do
    assert "already finished its 1 epochs" in capsys.readouterr().out


def test_corrupt_image_during_training_names_the_file(tiny_data, tmp_path):
    data_root = make_imagenet(tmp_path / "data", train=8, val=3)
    bad = os.path.join(data_root, "train", "b", "b_3.jpeg")
    with open(bad, "r+b") as f:
        f.truncate(200)
    result = run_train(["--data", data_root, *TINY, "--output-dir", tmp_path / "out", "--workers", "1",
                        "--epochs", "1"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot decode image {bad}")
    assert "Traceback" not in result.stderr


def test_demo_data_is_learned(tmp_path):
    # 288 steps of 32 images at 32 px, the recipe's optimizer and learning rate (0.08 per 4096), a
    # third of it warmup (the README's demo: 960 steps, 86-96 %). The loss starts near ln 10 = 2.3
    # (the classifier's initial scale keeps few classes unconfident), rises a little in the warmup,
    # then falls; the bar is 2.5x chance (10 classes), 500 val images put it 10 standard errors above.
    out = tmp_path / "demo"
    result = run_train(["--data", "demo", "--image-size", "32", "--val-resize", "32", "--batch-size", "32",
                        "--min-crop-scale", "0.35", "--epochs", "6", "--warmup-epochs", "2",
                        "--steps-per-epoch", "48", "--eval-every", "6", "--workers", "2", "--output-dir", out])
    assert result.returncode == 0, result.stderr
    rows = read_metrics(out)
    losses = [r["train_loss"] for r in rows]
    assert losses[0] < 2.6  # not the 5.5 of a classifier initialised for 10 classes by TF's rule
    assert losses[-1] < 0.85 * losses[0] and losses[-1] == min(losses)  # this run: 2.35 -> 1.83
    assert rows[-1]["val_top1"] >= 25.0  # this run: 39.8 on the dev machine


# ------------------------------------------------------------------------ public weights (issue 12)

def test_finetune_from_weights_of_another_class_count(tiny_data, tmp_path, capsys, monkeypatch):
    """--weights of a 1000-class model on 3-class data: every other tensor loads bit for bit, the
    classifier starts fresh, the run says so and trains."""
    source = randomize_(torchvision.models.efficientnet_b0(), seed=6).state_dict()
    torch.save(source, tmp_path / "tv_b0.pth")
    loaded = {}
    real_load = checkpoints.load_pretrained

    def spy(model, state_dict):  # the model as train.py starts from it
        skipped = real_load(model, state_dict)
        loaded.update({k: v.clone() for k, v in model.state_dict().items()})
        return skipped

    monkeypatch.setattr(checkpoints, "load_pretrained", spy)
    out = tmp_path / "run"
    args = ["--data", tiny_data, *TINY, "--output-dir", out, "--workers", "0", "--epochs", "1",
            "--steps-per-epoch", "1", "--eval-every", "0", "--weights", tmp_path / "tv_b0.pth"]
    assert train.main([str(a) for a in args]) == 0
    assert f"--weights {tmp_path / 'tv_b0.pth'}: classifier re-initialised: 1000 -> 3 classes" in capsys.readouterr().out
    expected = efficientnet.convert_state_dict(source)
    assert loaded.keys() == expected.keys()
    for name, value in loaded.items():
        if name.startswith("classifier."):
            assert value.shape[0] == 3
        else:
            assert torch.equal(value, expected[name]), name
    trained = torch.load(out / "last.pt", weights_only=True)
    assert trained["step"] == 1 and trained["model"]["classifier.weight"].shape == (3, 1280)
    assert not torch.equal(trained["model"]["stem_conv.weight"], loaded["stem_conv.weight"])  # it trained
    assert all(torch.isfinite(v).all() for v in trained["model"].values() if v.is_floating_point())
    # --evaluate needs the whole model, the classifier's class count too.
    fails_with(capsys, ["--data", tiny_data, *TINY, "--workers", "0", "--evaluate", "--weights", tmp_path / "tv_b0.pth"],
               "wrong shape: classifier.weight (1000, 1280) vs (3, 1280)")


def test_tf_arch_run_remembers_padding_and_normalisation_on_resume(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    advprop = ["--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5", "0.5"]
    common = ["--data", tiny_data, *TINY, "--output-dir", out, "--workers", "0", "--steps-per-epoch", "1",
              "--eval-every", "0"]
    assert train.main([str(a) for a in common + ["--arch", "tf_efficientnet_b0", "--epochs", "1", *advprop]]) == 0
    saved = json.load(open(out / "args.json"))
    assert (saved["arch"], saved["bn_eps"], saved["bn_momentum"]) == ("tf_b0", 1e-3, 0.01)
    assert (saved["mean"], saved["std"]) == ([0.5] * 3, [0.5] * 3)
    capsys.readouterr()
    resume = common + ["--epochs", "2", "--resume", out / "last.pt"]
    fails_with(capsys, [*resume, "--arch", "b0"], "checkpoint is for tf_b0, not b0: leave --arch out (or pass --arch tf_b0)")
    assert train.main([str(a) for a in resume]) == 0  # arch, BatchNorm, mean and std: the run's own
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2
    assert json.load(open(out / "args.json")) | {"epochs": 1, "resume": None} == saved
    assert train.main([str(a) for a in [*common, "--epochs", "3", "--resume", out / "last.pt", "--arch", "tf_b0"]]) == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 3  # the short name is the same arch


@pytest.mark.parametrize("name,interpolation,mean,std", [
    ("tf_efficientnet_b0", "bicubic", (0.5,) * 3, (0.5,) * 3),  # AdvProp (.ap) weights
    ("efficientnet_b0", "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision b1 V2's filter
])
def test_evaluate_flags_reproduce_timms_eval_pipeline(tiny_data, capsys, tmp_path, name, interpolation, mean, std):
    """timm's own transform (Resize(floor(S / crop_pct)) + CenterCrop(S)) and model against
    --evaluate with --image-size S --val-resize R --val-interpolation --mean --std: same images,
    same logits. Odd sizes exercise the TF padding."""
    timm = pytest.importorskip("timm")
    from timm.data import create_transform
    reference = calibrate_bn_(randomize_(timm.create_model(name, pretrained=False), seed=7))  # logits that see the input
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    size, crop_pct = 33, 0.88  # R = floor(33 / 0.88) = 37
    args = ["--evaluate", "--weights", tmp_path / "weights.pth", "--data", tiny_data, "--arch", name,
            "--num-classes", "1000", "--image-size", size, "--val-resize", 37, "--val-interpolation", interpolation,
            "--mean", *mean, "--std", *std, "--batch-size", 4, "--workers", 0]
    assert train.main([str(a) for a in args]) == 0
    ours = last_json(capsys.readouterr().out)
    transform = create_transform(size, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std)
    assert_evaluates_like(ours, reference, os.path.join(tiny_data, "val"), transform)


def test_tensorboard_gets_the_interval_and_epoch_figures(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    result = run_train(["--data", tiny_data, *TINY, "--epochs", "2", "--warmup-epochs", "1", "--workers", "0",
                        "--output-dir", out, "--tensorboard"])
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    rows = read_metrics(out)
    for name in ("val_top1", "val_top5", "val_loss", "train_loss", "lr", "images_per_sec", "data_seconds"):
        scalars = events.Scalars(f"epoch/{name}")
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([row[name] for row in rows], rel=1e-6)
    steps = 2 * 24 // 4  # 2 epochs of 24 images in batches of 4, logged at every step (--log-every 1)
    for name in ("loss", "lr", "images_per_sec", "data_percent"):
        assert [s.step for s in events.Scalars(f"train/{name}")] == list(range(1, steps + 1))
    assert sorted(os.listdir(out / "tensorboard"))[0].startswith("events.out.tfevents")


def test_tensorboard_without_the_package_is_refused_at_start(tiny_data, tmp_path):
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    cmd = [sys.executable, TRAIN, "--data", tiny_data, *TINY, "--epochs", "1", "--output-dir", tmp_path / "run",
           "--tensorboard"]
    result = subprocess.run([str(a) for a in cmd], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=f"{shadow.parent}{os.pathsep}{ROOT}"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: --tensorboard needs the tensorboard package: pip install tensorboard "
                                     "(or leave the flag out)")
    assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ what main leaves behind

def test_main_gives_back_signal_handlers_and_sets_kernel_choices_both_ways(tiny_data, tmp_path, capsys):
    """In-process callers (tests, notebooks, the GPU check) get their signal handlers back (a
    timeout's SIGTERM must still stop them), and each run gets its own kernel choices: a run after a
    --deterministic one is not deterministic (conftest gives the flags back after each test)."""
    def handler(signum, frame):
        pass
    signal.signal(signal.SIGTERM, handler)
    saved = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)]
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    base = [str(a) for a in ["--data", tiny_data, *TINY, "--workers", "0", "--epochs", "1", "--steps-per-epoch", "1"]]
    try:
        for deterministic in (True, False):
            out = ["--output-dir", str(tmp_path / str(deterministic))]
            assert train.main(base + out + (["--deterministic"] if deterministic else [])) == 0
            assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)] == saved
            assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
                    torch.are_deterministic_algorithms_enabled()) == (not deterministic, deterministic, deterministic)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def test_out_of_gpu_memory_is_one_line_naming_the_fixes(tiny_data, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                     "of 79.1 GiB of which 1.2 GiB is free.")
    monkeypatch.setattr(train, "forward_backward", out_of_memory)
    err = fails_with(capsys, ["--data", tiny_data, *TINY, "--output-dir", tmp_path / "run", "--workers", "0"],
                     "error: rank 0: the GPU ran out of memory (CUDA out of memory")
    assert "lower --batch-size (keeping the global batch with --accum-steps) or add --grad-checkpointing" in err
    assert not (tmp_path / "run" / ".lock").exists()


@pytest.mark.parametrize("arch, batch", [("b0", 256), ("b3", 256), ("b4", 128), ("b5", 64), ("b6", 32),
                                         ("tf_efficientnet_b7", 32)])
def test_default_batch_fits_an_80_gb_gpu_per_member(arch, batch):
    assert flags.resolve_args(flags.parse_args(["--data", "synthetic", "--arch", arch])).batch_size == batch
    assert flags.resolve_args(flags.parse_args(["--data", "synthetic", "--arch", arch, "--batch-size", "8"])).batch_size == 8
