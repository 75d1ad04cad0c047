"""Days-long runs: exact resume, preemption by signal, atomic checkpoints, non-finite losses."""
import contextlib
import glob
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import launch
import prepare
import shards
import train
import utils
from conftest import ROOT, make_imagenet
from test_train import SPY, child_env, command, read_metrics, run_train

# Everything that draws random numbers or carries state is on: drop path, dropout, mixup, EMA.
# 36 train images: 9 steps of 4 per epoch in one process, 9 of 2 per rank in two. The loader's
# workers draw nothing (data.sample_rng), so the runs take none (--workers 0: no process start),
# but for the Ctrl-C and torchrun-restart runs below (--workers 2: WORKERS), whose signals and
# kills reach the workers: compared bit for bit with the references, they also show that the
# worker count changes nothing.
RUN = ["--image-size", "32", "--val-resize", "36", "--batch-size", "4", "--epochs", "2", "--warmup-epochs", "1",
       "--workers", "0", "--ema-decay", "0.9", "--mixup", "0.2", "--log-every", "1"]
WORKERS = ["--workers", "2"]
TIMING = ("images_per_sec", "epoch_seconds", "data_seconds")
# Where no process boundary is tested (a run to its end, or the resume after a stop), the run is
# train.main in this process: no interpreter to start. Every run takes one thread, as torchrun's
# ranks do: on the CPU the thread count changes float sums and the runs are compared bit for bit;
# at 32 px a second thread gains nothing, and on a busy machine it loses much.
ALONE = {"OMP_NUM_THREADS": "1"}  # the environment of a child that runs alone


def main(args):
    """train.py's main in this process, on one thread -> its exit code."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("data"), train=12, val=3)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """The uninterrupted 2-epoch run, one process."""
    out = tmp_path_factory.mktemp("reference")
    assert main(["--data", data_root, "--output-dir", out, *RUN]) == 0
    return out


@pytest.fixture(scope="module")
def reference_two_ranks(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference2")
    result = run_train(["--data", data_root, "--output-dir", out, *RUN, "--batch-size", "2"], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def assert_same_run(out, reference, epochs=2):
    """Bitwise-equal weights, EMA and optimizer state; equal metrics but for wall-clock figures."""
    a = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(reference, "last.pt"), weights_only=True)
    assert (a["epoch"], a["epoch_step"], a["step"]) == (b["epoch"], b["epoch_step"], b["step"])
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys() and len(state_a) == 213
    for index, slots in state_a.items():
        for slot, value in slots.items():
            assert torch.equal(value, state_b[index][slot]), (index, slot)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    rows_a = [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(out)]
    rows_b = [{k: v for k, v in row.items() if k not in TIMING} for row in read_metrics(reference)]
    assert rows_a == rows_b and len(rows_a) == epochs


def start(args, nproc=None, env=None, max_restarts=0, **popen):
    """train.py started in the background (see run_train), its output read through pipes."""
    return subprocess.Popen(command(args, nproc, max_restarts=max_restarts), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(env), **popen)


def wait_for_line(process, text, timeout=300):
    """Read the process's stdout until a line contains `text`; returns all lines read."""
    lines, deadline = [], time.time() + timeout
    for line in process.stdout:
        lines.append(line)
        if text in line or time.time() > deadline:
            break
    assert any(text in line for line in lines), "".join(lines)
    return lines


def children(pid):
    """PIDs whose parent is `pid`."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has closed its files


def rank_pid(torchrun_pid, rank):
    for pid in children(torchrun_pid):
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no rank {rank} under {torchrun_pid}")


# ------------------------------------------------------------------------------- exact resume

def test_one_epoch_then_resume_equals_uninterrupted(data_root, reference, tmp_path, capsys):
    assert main(["--data", data_root, "--output-dir", tmp_path, *RUN, "--run-epochs", "1"]) == 0
    assert "ran 1 epoch(s) as asked (--run-epochs); continue with --resume auto" in capsys.readouterr().out
    assert len(read_metrics(tmp_path)) == 1
    # The run's folder is all a requeue needs: data, sizes, batch, schedule, EMA and mixup are its own.
    assert main(["--output-dir", tmp_path, "--resume", "auto"]) == 0
    second = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'last.pt'}" in second and "note:" not in second
    assert_same_run(tmp_path, reference)


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(data_root, reference, tmp_path):
    process = start(["--data", data_root, "--output-dir", tmp_path, *RUN], env=ALONE)
    wait_for_line(process, "epoch 2/2 step 3/9")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 75, err
    assert "stopped by SIGTERM at step" in err and "Continue with the same command and --resume auto" in err, err
    assert "stopped by" not in out and "Traceback" not in err
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and 3 <= state["epoch_step"] < 9  # mid-epoch, right after the signal
    assert main(["--data", data_root, "--output-dir", tmp_path, *RUN, "--resume", "auto"]) == 0
    assert_same_run(tmp_path, reference)


def test_sigusr1_to_one_rank_stops_both_then_resume_equals_uninterrupted(data_root, reference_two_ranks,
                                                                           tmp_path):
    args = ["--data", data_root, "--output-dir", tmp_path, *RUN, "--batch-size", "2"]
    process = start(args, nproc=2)
    wait_for_line(process, "epoch 1/2 step 3/9")
    os.kill(rank_pid(process.pid, 1), signal.SIGUSR1)  # SLURM's warning signal, to rank 1 only
    out, err = process.communicate(timeout=300)
    assert process.returncode != 0  # torchrun reports the ranks' exit code 75 as a failure
    assert "stopped by SIGUSR1 at step" in err
    assert "exitcode  : 75" in err
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and 3 <= state["epoch_step"] < 9 and len(state["ranks"]) == 2
    resumed = run_train([*args, "--resume", "auto"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, reference_two_ranks)


@pytest.fixture(scope="module")
def pack(data_root, tmp_path_factory):
    """data_root packed into shards of 16 kB (several per split): python prepare.py pack."""
    out = str(tmp_path_factory.mktemp("pack"))
    assert prepare.main(["pack", data_root, out, "--shard-size", "16kB"]) == 0
    assert len(shards.ShardReader(out, "train").paths) > 2
    return out


def test_run_from_shards_equals_the_run_from_folders(pack, reference, tmp_path):
    assert main(["--data", pack, "--output-dir", tmp_path, *RUN]) == 0
    assert_same_run(tmp_path, reference)  # same samples, crops, flips, mixup, val figures


def test_two_ranks_stopped_mid_epoch_on_shards_resume_equal_to_folders(pack, reference_two_ranks, tmp_path):
    args = ["--data", pack, "--output-dir", tmp_path, *RUN, "--batch-size", "2"]
    process = start(args, nproc=2)
    wait_for_line(process, "epoch 2/2 step 2/9")
    os.kill(rank_pid(process.pid, 0), signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert "stopped by SIGTERM at step" in err and "exitcode  : 75" in err, err[-3000:]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and 2 <= state["epoch_step"] < 9
    resumed = run_train(["--output-dir", tmp_path, "--resume", "auto"], nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(tmp_path, reference_two_ranks)


def test_sigkill_loses_at_most_the_steps_since_the_last_save(data_root, reference, tmp_path):
    process = start(["--data", data_root, "--output-dir", tmp_path, *RUN, "--save-every-steps", "3"], env=ALONE)
    wait_for_line(process, "epoch 2/2 step 5/9")
    process.kill()  # no chance to save: the periodic checkpoint of step 9 + 3 is what is left
    process.communicate(timeout=60)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] % 3 == 0 and state["step"] >= 12
    assert main(["--data", data_root, "--output-dir", tmp_path, *RUN, "--resume", "auto"]) == 0
    assert_same_run(tmp_path, reference)


def test_rank_killed_under_torchrun_max_restarts_ends_equal_to_uninterrupted(data_root, reference_two_ranks,
                                                                            tmp_path):
    # torchrun restarts the group by itself (--max-restarts); the new processes continue from the
    # periodic checkpoint (--resume auto), past the dead rank 0's lock and temporary file.
    args = ["--data", data_root, "--output-dir", tmp_path, *RUN, *WORKERS, "--batch-size", "2",
            "--save-every-steps", "3", "--resume", "auto"]
    process = start(args, nproc=2, max_restarts=1)
    wait_for_line(process, "epoch 1/2 step 5/9")
    stale = tmp_path / ".last.pt.tmp.4000000"  # as if rank 0 died while writing a checkpoint
    stale.write_bytes(b"partial")
    rank0 = rank_pid(process.pid, 0)
    workers = children(rank0)  # its loader workers inherited the folder's lock: they must die with it
    assert len(workers) == 2  # --workers 2 of the train loader (no evaluation yet)
    os.kill(rank0, signal.SIGKILL)
    deadline = time.time() + 2
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert f"resuming from {tmp_path / 'last.pt'}" in out
    assert "error: rank 1 lost another process, which crashed or whose host went down" in err
    assert not stale.exists()
    assert_same_run(tmp_path, reference_two_ranks)


def test_restarted_group_does_not_read_the_dead_group_s_addresses(tmp_path):
    # torchrun's agent keeps its store across restarts; the dead rank 0 published its address there.
    # The new rank 0 comes a second after the new rank 1 began to join (a file says when), so that
    # rank 1 would find only the dead one's address.
    script, joining = tmp_path / "group.py", tmp_path / "rank1_joins"
    script.write_text(
        "import os, pathlib, signal, time, torch, torch.distributed as dist, launch\n"
        "attempt, rank = int(os.environ['TORCHELASTIC_RESTART_COUNT']), int(os.environ['RANK'])\n"
        f"joining, deadline = pathlib.Path({str(joining)!r}), time.time() + 60\n"
        "if attempt == 1 and rank == 1:\n"
        "    joining.touch()\n"
        "if attempt == 1 and rank == 0:\n"
        "    while not joining.exists() and time.time() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    time.sleep(1)\n"
        "env = launch.init_distributed(__import__('datetime').timedelta(seconds=60))\n"
        "total = torch.ones(1)\n"
        "dist.all_reduce(total)\n"
        "print(f'attempt {attempt} rank {rank} sum {total.item():g}', flush=True)\n"
        "if attempt == 0 and rank == 1:\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(60 if attempt == 0 else 0)\n"
        "dist.destroy_process_group()\n")
    result = run_train([], nproc=2, script=script, max_restarts=1, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "attempt 1 rank 0 sum 2" in result.stdout and "attempt 1 rank 1 sum 2" in result.stdout


# -------------------------------------------------------------------------- checkpoint files

def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.pt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, torch, utils\n"
        "big = torch.arange(25_000_000, dtype=torch.float32)  # 100 MB: a write takes a while\n"
        "for i in range(1, 10_000):\n"
        "    utils.save_atomic({'i': i, 'x': big + i}, sys.argv[1])\n"), str(path)],
        env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.time() + 120
    while not (path.exists() and glob.glob(str(tmp_path / ".last.pt.tmp.*"))) and time.time() < deadline:
        time.sleep(0.01)  # wait until a first save is complete and a later one is being written
    writer.kill()
    writer.wait()
    assert glob.glob(str(tmp_path / ".last.pt.tmp.*"))  # it died mid-write
    state = utils.load_checkpoint(str(path))
    i = state["i"]
    assert i >= 1 and state["x"][0].item() == i and state["x"][-1].item() == 24_999_999 + i
    utils.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["last.pt"]


def test_corrupt_last_checkpoint_falls_back_to_the_newest_good_one(data_root, tmp_path, capsys):
    args = ["--data", data_root, "--output-dir", tmp_path, *RUN]
    assert main([*args, "--run-epochs", "1"]) == 0
    good = torch.load(tmp_path / "best.pt", weights_only=True)
    # last.pt and best.pt are one file (a hard link) until last.pt is next replaced; a later save
    # that went wrong is simulated by a truncated file renamed over last.pt.
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "broken").write_bytes(data[: len(data) // 3])
    os.replace(tmp_path / "broken", tmp_path / "last.pt")
    capsys.readouterr()
    assert main([*args, "--resume", "auto"]) == 0
    resumed = capsys.readouterr().out
    assert "warning: skipping checkpoint" in resumed and "last.pt is corrupt or truncated" in resumed
    assert f"resuming from {tmp_path / 'best.pt'}" in resumed
    assert good["epoch"] == 1 and len(read_metrics(tmp_path)) == 2


# ---------------------------------------------------------------------------- non-finite loss

def test_nan_loss_stops_without_touching_the_last_checkpoint(data_root, tmp_path):
    spy = tmp_path / "spy"
    spy.mkdir()
    out = tmp_path / "run"
    result = run_train(["--data", data_root, "--output-dir", out, *RUN, "--save-every-steps", "4",
                        "--log-every", "100"], script=SPY,
                       env={"SPY_DIR": str(spy), "SPY_NAN_STEPS": "11-100", **ALONE})
    assert result.returncode == 3, result.stderr
    assert ("error: the loss was not finite at step 11 (epoch 2); stopped without saving "
            f"({out / 'last.pt'} kept as it was)") in result.stderr
    state = torch.load(out / "last.pt", weights_only=True)  # the end of epoch 1, not step 12
    assert (state["epoch"], state["epoch_step"], state["step"]) == (1, 0, 9)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(read_metrics(out)) == 1
    assert sorted(os.listdir(out)) == ["args.json", "best.pt", "last.pt", "metrics.jsonl"]


@pytest.mark.quick
def test_nonfinite_watch_counts_runs_of_bad_steps():
    env = launch.Dist()
    flags = [False, True, True, False, True, True, True, True, False, True]
    for limit, trip in ((1, 2), (3, 7), (4, 8), (5, None)):
        watch = utils.NonFiniteWatch(limit, "cpu")
        for step, bad in enumerate(flags, start=1):
            watch.update(torch.tensor(bad), step)
        assert watch.tripped_at(env) == trip, limit
        assert watch.skipped.item() == 7 and watch.consecutive.item() == 1


@pytest.mark.quick
def test_fp16_on_cpu_is_refused(data_root, tmp_path, capsys):
    # PyTorch's CPU float16 kernels give NaN gradients (torchvision's EfficientNet as well).
    assert train.main(["--data", data_root, "--amp", "fp16", "--output-dir", str(tmp_path)]) == 2
    assert "--amp fp16 is for GPUs: on the CPU use --amp bf16 or --amp off" in capsys.readouterr().err


# --------------------------------------------------------- Ctrl-C and the requeue of a fine-tune

def test_ctrl_c_saves_exits_130_without_traceback_then_resume_equals_uninterrupted(data_root, reference, tmp_path,
                                                                                    capsys):
    process = start(["--data", data_root, "--output-dir", tmp_path, *RUN, *WORKERS], env=ALONE,
                    start_new_session=True)
    wait_for_line(process, "epoch 2/2 step 3/9")
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C does: the process and its loader workers
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert [line for line in err.splitlines() if "stopped by" in line] == [
        line for line in err.splitlines() if line.strip()], err  # one line: what happened and how to go on
    assert "stopped by SIGINT at step" in err and f"--resume auto --output-dir {tmp_path} (exit code 130)" in err
    assert not (tmp_path / ".lock").exists()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and 3 <= state["epoch_step"] < 9
    assert main(["--output-dir", tmp_path, "--resume", "auto"]) == 0
    assert f"resuming from {tmp_path / 'last.pt'}" in capsys.readouterr().out
    assert_same_run(tmp_path, reference)


@pytest.mark.quick
def test_a_second_ctrl_c_stops_at_once():
    stop = utils.StopSignal(launch.Dist())
    try:
        stop._record(signal.SIGINT, None)
        assert stop.requested() and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            stop._record(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)


@pytest.fixture(scope="module")
def finetune(data_root, tmp_path_factory):
    """Public-like weights of 1000 classes, and the uninterrupted one-epoch fine-tune from them with
    the requeue command (--weights and --resume auto in one command line)."""
    import efficientnet
    folder = tmp_path_factory.mktemp("finetune")
    torch.save(efficientnet.create_model("b0").state_dict(), folder / "weights.pth")
    flags = ["--data", data_root, *RUN, "--epochs", "1", "--warmup-epochs", "0.5", "--save-every-steps", "3",
               "--weights", folder / "weights.pth", "--resume", "auto"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:  # a module's fixture has no capsys
        assert main(["--output-dir", folder / "reference", *flags]) == 0
    assert "classifier re-initialised: 1000 -> 3 classes" in stdout.getvalue()
    return flags, folder / "reference"


def test_requeued_fine_tune_with_the_same_command_equals_one_run(finetune, tmp_path, capsys):
    flags, reference = finetune
    first = run_train(["--output-dir", tmp_path, *flags], script=SPY, env={
        "SPY_DIR": str(tmp_path), "SPY_WATCH": str(tmp_path / "none"), "SPY_SIGTERM_AT": "5", **ALONE})
    assert first.returncode == 75, first.stderr
    assert main(["--output-dir", tmp_path, *flags]) == 0
    weights = flags[flags.index("--weights") + 1]
    assert f"note: --weights {weights} is not loaded: the run continues from its checkpoint" in capsys.readouterr().out
    assert json.load(open(tmp_path / "args.json"))["weights"] == str(weights)  # where the run started
    assert_same_run(tmp_path, reference, epochs=1)


def test_torchrun_restart_of_a_fine_tune_equals_one_run(finetune, tmp_path):
    flags, reference = finetune
    process = start(["--output-dir", tmp_path, *flags], nproc=1, env=ALONE, max_restarts=1)
    wait_for_line(process, "epoch 1/1 step 5/9")
    os.kill(rank_pid(process.pid, 0), signal.SIGKILL)  # torchrun starts the same command again
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert f"resuming from {tmp_path / 'last.pt'}" in out
    assert_same_run(tmp_path, reference, epochs=1)
