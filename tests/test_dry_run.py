"""train.py --dry-run: the batch search, the projection against the real run, no file left, torchrun."""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import cost
import efficientnet
import train
from conftest import ROOT

KEYS = {"images_per_sec", "images_per_sec_per_process", "data_share", "peak_memory_mb", "epoch_seconds", "run_seconds"}


@pytest.mark.quick
@pytest.mark.parametrize("limit, start", [(37, 64), (1, 256), (0, 8), (63, 64), (100, 128), (128, 1000)])
def test_largest_batch_is_found_by_halving_and_bisecting_exactly(limit, start):
    tried = []
    found = cost.largest_batch(lambda b: tried.append(b) or b <= limit, start)
    assert found == limit
    assert len(tried) <= 2 * start.bit_length()  # halving, then bisecting: logarithmic


@pytest.mark.quick
def test_the_advice_keeps_the_global_batch():
    assert cost.global_advice(37, 64, 1) == "--batch-size 32 --accum-steps 2"
    assert cost.global_advice(100, 256, 2) == "--batch-size 64 --accum-steps 8"
    assert cost.global_advice(1, 48, 1) == "--batch-size 1 --accum-steps 48"


def out_of_memory_above(monkeypatch, limit, with_checkpointing):
    """The model's forward raises CUDA's out-of-memory error for batches above `limit` (above
    `with_checkpointing` when the model recomputes its activations)."""
    real = efficientnet.EfficientNet.forward

    def forward(self, x):
        if x.shape[0] > (with_checkpointing if self.grad_checkpointing else limit):
            raise torch.OutOfMemoryError(f"CUDA out of memory (a batch of {x.shape[0]}, injected)")
        return real(self, x)
    monkeypatch.setattr(efficientnet.EfficientNet, "forward", forward)


def test_a_batch_that_does_not_fit_names_the_largest_that_does(tmp_path, monkeypatch, capsys):
    out_of_memory_above(monkeypatch, 37, 45)
    monkeypatch.chdir(tmp_path)
    code = train.main(["--data", "demo", "--dry-run", "--batch-size", "64", "--workers", "0", "--output-dir", "run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == ("error: --batch-size 64 does not fit in the cpu memory of a process (measured at 32px): without "
                   "--grad-checkpointing the largest that fits is 37 (--batch-size 32 --accum-steps 2 keeps the global "
                   "batch); with --grad-checkpointing the largest that fits is 45 (--batch-size 32 --accum-steps 2 "
                   "keeps the global batch)\n")
    assert os.listdir(tmp_path) == []
    out_of_memory_above(monkeypatch, 0, 0)
    assert train.main(["--data", "demo", "--dry-run", "--batch-size", "64", "--workers", "0", "--output-dir", "run",
                       "--grad-checkpointing"]) == 2
    assert capsys.readouterr().err.endswith("with --grad-checkpointing not even a batch of 1 fits\n")


def last_json(stdout):
    figures = json.loads(stdout.strip().splitlines()[-1])
    assert set(figures) == KEYS
    return figures


def dry_then_real(tmp_path, capsys, run):
    """(the dry run's figures, the real run's wall time in seconds), the dry run leaving no file."""
    assert train.main([*run, "--dry-run"]) == 0
    out = capsys.readouterr().out
    figures = last_json(out)
    assert os.listdir(tmp_path) == []  # no run folder, no temporary one beside it
    assert "dry run: 30 steps of b0 at 32px, batch 16 x 1 process(es) x 1 accumulation" in out
    start = time.perf_counter()
    assert train.main(run) == 0
    return figures, time.perf_counter() - start


def test_the_projection_is_within_a_quarter_of_the_real_run_and_no_file_is_left(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = ["--data", "demo", "--batch-size", "16", "--epochs", "2", "--steps-per-epoch", "24", "--warmup-epochs", "1",
           "--workers", "0", "--output-dir", "runs/a"]
    figures, real = dry_then_real(tmp_path, capsys, run)
    assert figures["images_per_sec"] == figures["images_per_sec_per_process"] > 0
    assert 0 <= figures["data_share"] < 1 and figures["peak_memory_mb"] > 100
    assert len(open(tmp_path / "runs/a/metrics.jsonl").readlines()) == 2
    if abs(figures["run_seconds"] - real) > 0.25 * real:  # a machine shared with other work: once more
        shutil.rmtree(tmp_path / "runs")
        figures, real = dry_then_real(tmp_path, capsys, run)
    assert abs(figures["run_seconds"] - real) <= 0.25 * real, (figures, real)


def test_dry_run_under_torchrun_reports_once_for_the_whole_group(tmp_path, python_env):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "train.py"), "--data", "demo", "--dry-run", "--batch-size", "8", "--workers", "0",
         "--output-dir", "runs/b"], cwd=tmp_path, env=python_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    figures = last_json(result.stdout)
    assert result.stdout.count("dry run:") == 1 and "batch 8 x 2 process(es)" in result.stdout
    assert figures["images_per_sec"] == pytest.approx(2 * figures["images_per_sec_per_process"], rel=1e-4)
    assert os.listdir(tmp_path) == []


@pytest.mark.quick
def test_dry_run_refuses_evaluate(capsys):
    assert train.main(["--data", "demo", "--dry-run", "--evaluate", "--weights", __file__]) == 2
    assert capsys.readouterr().err == ("error: --dry-run measures a training run; --evaluate alone measures the "
                                       "evaluation\n")
