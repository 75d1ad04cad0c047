"""Launch by SLURM's srun, one task per GPU, no torchrun: the host list, MASTER_ADDR and MASTER_PORT,
which launcher wins, and two processes with srun's variables that train, evaluate and resume after
SIGUSR1 bitwise as two torchrun processes do."""
import json
import os
import signal
import socket
import subprocess

import pytest
import torch

import launch
import train
from conftest import make_imagenet
from test_resume import assert_same_run, wait_for_line
from test_train import child_env, command, run_train

# 24 train images: 6 steps of 2 x 2 ranks per epoch; 9 val images (shards of 5 and 4).
RUN = ["--image-size", "32", "--val-resize", "36", "--batch-size", "2", "--epochs", "2", "--warmup-epochs", "1",
       "--workers", "0", "--ema-decay", "0.9", "--mixup", "0.2", "--log-every", "1"]
TORCHRUN = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


def srun_task(rank, ntasks=2, **variables):
    """The variables srun gives task `rank` of a step of `ntasks` on one node (as SLURM 22.05 sets
    them), with `variables` added or replaced."""
    return {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
            "SLURM_NODEID": "0", "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_STEP_TASKS_PER_NODE": str(ntasks), "SLURM_TASKS_PER_NODE": str(ntasks),
            "SLURM_JOB_NODELIST": "localhost", "SLURM_STEP_NODELIST": "localhost", **variables}


def srun_env(rank, port):
    """A child's environment as srun makes it on this machine: no torchrun (nor outer SLURM) variable."""
    env = {k: v for k, v in child_env().items() if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in TORCHRUN}
    return dict(env, **srun_task(rank, MASTER_PORT=str(port)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tasks(args, logs):
    """train.py as `srun --ntasks=2` starts it on one node: two processes, no torchrun. Rank 0's
    stdout is a pipe (to follow its progress); the other outputs go to files in `logs`."""
    logs.mkdir(exist_ok=True)
    port, tasks = free_port(), []
    for rank in range(2):
        with open(logs / f"stderr{rank}", "w") as err, open(logs / f"stdout{rank}", "w") as out:
            tasks.append(subprocess.Popen(command(args), stdout=subprocess.PIPE if rank == 0 else out, stderr=err,
                                          text=True, env=srun_env(rank, port)))
    return tasks


def finish(tasks, logs):
    """Wait for the tasks -> (exit codes, rank 0's stdout, [stderr of each rank])."""
    stdout = tasks[0].communicate(timeout=300)[0]
    codes = [t.wait(timeout=60) for t in tasks]
    return codes, stdout, [(logs / f"stderr{rank}").read_text() for rank in range(2)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("data"), train=8, val=3)


@pytest.fixture(scope="module")
def torchrun_run(data_root, tmp_path_factory):
    """The uninterrupted run of 2 processes under torchrun."""
    out = tmp_path_factory.mktemp("torchrun")
    result = run_train(["--data", data_root, "--output-dir", out, *RUN], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------- SLURM's variables

@pytest.mark.quick
@pytest.mark.parametrize("hostlist, hosts", [
    ("gpu[01-03,07],login2", ["gpu01", "gpu02", "gpu03", "gpu07", "login2"]),
    ("node-[3-4]", ["node-3", "node-4"]),
    ("host1,host2", ["host1", "host2"]),
    ("a[1-2]-b", ["a1-b", "a2-b"]),
    ("r[1-2]n[08-10]", ["r1n08", "r1n09", "r1n10", "r2n08", "r2n09", "r2n10"]),
    ("gpu[099-101]", ["gpu099", "gpu100", "gpu101"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("127.0.0.1", ["127.0.0.1"]),
])
def test_hostlist_expands_as_scontrol_show_hostnames(hostlist, hosts):
    # Each expected list but a[1-2]-b's is what SLURM 22.05's `scontrol show hostnames` printed
    # (it refuses a[1-2]-b, which some sites' names need).
    assert launch.expand_hostlist(hostlist) == hosts


@pytest.mark.quick
@pytest.mark.parametrize("hostlist", ["gpu[01-03", "gpu01]", "gpu[3-1]", "gpu[a-b]", "gpu[[1]]", "gpu[]", "a,,b", ""])
def test_malformed_hostlist_is_refused(hostlist):
    with pytest.raises(ValueError):
        launch.expand_hostlist(hostlist)


@pytest.mark.quick
def test_tasks_per_node_expands_slurms_repeat_counts():
    assert launch.tasks_per_node("8(x2),4") == [8, 8, 4]
    assert launch.tasks_per_node("3") == [3]


@pytest.mark.quick
def test_srun_task_of_two_nodes_gets_torchruns_variables():
    # Task 11 of 16 (2 nodes x 8): the second node, local rank 3; the step runs on 2 of the job's 8 nodes.
    task = srun_task(11, 16, SLURM_LOCALID="3", SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="8(x2)",
                     SLURM_JOB_NODELIST="gpu[01-08]", SLURM_STEP_NODELIST="gpu[07-08]")
    assert launch.slurm_launch(task) == {"WORLD_SIZE": "16", "RANK": "11", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                                         "MASTER_ADDR": "gpu07", "MASTER_PORT": str(10000 + 123456 % 20000),
                                         "OMP_NUM_THREADS": "1"}
    # Uneven nodes: the count of this node; without a step list, the job's first node.
    uneven = srun_task(4, 5, SLURM_LOCALID="1", SLURM_NODEID="1", SLURM_STEP_TASKS_PER_NODE="3,2",
                       SLURM_JOB_NODELIST="node-[3-4]")
    del uneven["SLURM_STEP_NODELIST"]
    variables = launch.slurm_launch(uneven)
    assert (variables["LOCAL_WORLD_SIZE"], variables["MASTER_ADDR"]) == ("2", "node-3")


@pytest.mark.quick
def test_master_addr_port_and_threads_set_by_hand_are_kept():
    task = srun_task(1, MASTER_ADDR="10.0.0.5", MASTER_PORT="29555", OMP_NUM_THREADS="6")
    variables = launch.slurm_launch(task)
    assert (variables["MASTER_ADDR"], variables["MASTER_PORT"]) == ("10.0.0.5", "29555")
    assert "OMP_NUM_THREADS" not in variables


@pytest.mark.quick
def test_port_follows_the_job_id_in_a_fixed_range():
    ports = {job: int(launch.slurm_launch(srun_task(0, SLURM_JOB_ID=str(job)))["MASTER_PORT"])
             for job in (0, 1, 19999, 20000, 20001, 987654321)}
    assert ports == {0: 10000, 1: 10001, 19999: 29999, 20000: 10000, 20001: 10001, 987654321: 10000 + 987654321 % 20000}
    assert all(10000 <= p < 30000 < 32768 for p in ports.values())  # below Linux's ephemeral ports


@pytest.mark.quick
def test_torchruns_variables_win_and_one_task_is_alone():
    # torchrun inside an sbatch allocation: its variables win, SLURM's are not read.
    assert launch.slurm_launch(dict(srun_task(3, 16), WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")) == {}
    assert launch.slurm_launch(srun_task(0, 1)) == {}  # srun -n1 python train.py
    # An salloc shell and the batch script itself carry the allocation's SLURM_NTASKS (the batch
    # script SLURM_PROCID=0 too, as SLURM 22.05 sets it) but no step: one plain process.
    salloc = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu01"}
    batch = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    assert launch.slurm_launch(salloc) == {} and launch.slurm_launch(batch) == {}


@pytest.mark.quick
@pytest.mark.parametrize("remove, add, named", [
    (("SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST"), {}, "neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST nor "
                                                        "MASTER_ADDR is set: export MASTER_ADDR="),
    (("SLURM_JOB_ID",), {}, "export MASTER_PORT="),
    ((), {"SLURM_STEP_NODELIST": "gpu[01-"}, "SLURM_STEP_NODELIST=gpu[01- is not a SLURM host list"),
    ((), {"SLURM_STEP_TASKS_PER_NODE": "8(x2"}, "SLURM_STEP_TASKS_PER_NODE=8(x2 is not a list of task counts"),
    ((), {"SLURM_NODEID": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}, "SLURM_NODEID=2 but SLURM_STEP_TASKS_PER_NODE"),
    (("SLURM_PROCID",), {}, "SLURM_PROCID is not set, where srun sets a number: start train.py with srun"),
    # contradictions: before, the group waited --dist-timeout for a task that cannot come (exit 4)
    ((), {"SLURM_PROCID": "2"}, "SLURM_PROCID=2 but SLURM_STEP_NUM_TASKS=2: start train.py with srun"),
    ((), {"SLURM_LOCALID": "2"}, "SLURM_LOCALID=2 but SLURM_STEP_TASKS_PER_NODE=2 gives node 0 2 task(s)"),
    ((), {"SLURM_PROCID": "-1"}, "SLURM_PROCID is '-1', where srun sets a number"),
    ((), {"SLURM_STEP_NUM_TASKS": "0"}, "SLURM_STEP_NUM_TASKS is '0', where srun sets a number of 1 or more"),
    ((), {"MASTER_PORT": "70000"}, "WORLD_SIZE=2 but MASTER_PORT is 70000 (ports: 1-65535)"),
])
def test_what_srun_lacks_or_contradicts_exits_2_with_one_line_naming_it(remove, add, named, monkeypatch, capsys):
    for name in (*TORCHRUN, *remove, *(k for k in os.environ if k.startswith("SLURM_"))):
        monkeypatch.delenv(name, raising=False)
    for name, value in srun_task(0, **add).items():
        if name not in remove:
            monkeypatch.setenv(name, value)
    assert train.main(["--data", "demo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert "RANK" not in os.environ  # nothing exported from a failed launch


def test_srun_tasks_form_the_group_with_torchruns_variables(tmp_path):
    script = tmp_path / "group.py"
    script.write_text(
        "import json, os, torch, torch.distributed as dist, launch\n"
        "env = launch.init_distributed()\n"
        "total = torch.tensor([env.rank + 1]); dist.all_reduce(total)\n"
        "print(json.dumps({'rank': env.rank, 'local_rank': env.local_rank, 'world_size': env.world_size,\n"
        "                  'launcher': env.launcher, 'sum': int(total), 'threads': torch.get_num_threads(),\n"
        f"                  'environ': {{k: os.environ.get(k) for k in {TORCHRUN!r}}}}}))\n"
        "dist.destroy_process_group()\n")
    port = free_port()
    tasks = [subprocess.Popen(command([], script=script), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=srun_env(rank, port)) for rank in range(2)]
    outputs = [t.communicate(timeout=120) for t in tasks]
    assert [t.returncode for t in tasks] == [0, 0], outputs
    for rank, (out, _) in enumerate(outputs):
        seen = json.loads(out)
        assert seen == {"rank": rank, "local_rank": rank, "world_size": 2, "launcher": "srun", "sum": 3, "threads": 1,
                        "environ": {"WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                    "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": str(port),
                                    "OMP_NUM_THREADS": "1"}}


# ------------------------------------------------------------------------------- training under srun

def test_two_srun_tasks_train_and_evaluate_as_two_torchrun_processes(data_root, torchrun_run, tmp_path):
    out = tmp_path / "run"
    codes, stdout, stderr = finish(start_tasks(["--data", data_root, "--output-dir", out, *RUN], tmp_path), tmp_path)
    assert codes == [0, 0], stderr
    assert stdout.startswith("srun: 2 tasks, process group formed from SLURM's variables at localhost:")
    assert "2 process(es) on cpu" in stdout and "global batch 4 = 2 x 2 process(es) x 1 accumulation" in stdout
    assert (tmp_path / "stdout1").read_text() == ""  # rank 0 alone prints
    assert not any("Traceback" in err for err in stderr)
    # Weights, EMA, optimizer state bitwise; every metrics row (val figures included) but wall-clock ones.
    assert_same_run(out, torchrun_run)


def test_sigusr1_to_every_task_saves_exits_75_then_resume_equals_uninterrupted(data_root, torchrun_run, tmp_path):
    out = tmp_path / "run"
    args = ["--data", data_root, "--output-dir", out, *RUN]
    tasks = start_tasks(args, tmp_path / "first")
    wait_for_line(tasks[0], "epoch 1/2 step 1/6")
    for task in tasks:
        task.send_signal(signal.SIGUSR1)  # sbatch --signal=USR1@120 signals every task of the step
    codes, _, stderr = finish(tasks, tmp_path / "first")
    assert codes == [75, 75], stderr
    assert "stopped by SIGUSR1 at step" in stderr[0] and "Continue with the same command and --resume auto" in stderr[0]
    assert stderr[1] == ""  # rank 0 alone says it
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and 1 <= state["epoch_step"] < 6 and len(state["ranks"]) == 2
    # The requeued job: the same command with --resume auto.
    codes, stdout, stderr = finish(start_tasks([*args, "--resume", "auto"], tmp_path / "second"), tmp_path / "second")
    assert codes == [0, 0], stderr
    assert f"resuming from {out / 'last.pt'}" in stdout
    assert_same_run(out, torchrun_run)
