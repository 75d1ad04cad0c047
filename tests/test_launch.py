"""Joining the group: launcher variables that contradict each other are refused at once, a start
that waits says for whom and how long, and every way the set-up fails ends in one line."""
import ctypes
import datetime
import os
import re
import subprocess
import threading
import time

import pytest
import torch
import torch.distributed as dist

import launch
import train
from test_slurm import TORCHRUN, free_port, srun_env
from test_train import child_env, command

GOOD = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "gpu01",
        "MASTER_PORT": "29500"}


# ------------------------------------------------------------------------------- contradictions

@pytest.mark.quick
@pytest.mark.parametrize("change, named", [
    ({"RANK": "4"}, "RANK=4 but WORLD_SIZE=4 (ranks run from 0 to WORLD_SIZE-1)"),
    ({"RANK": "-1"}, "RANK is '-1', where torchrun sets a number"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE is 'two', where torchrun sets a number of 1 or more"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE is '0', where torchrun sets a number of 1 or more"),
    ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2 but LOCAL_WORLD_SIZE=2 (local ranks run from 0 to LOCAL_WORLD_SIZE-1)"),
    ({"LOCAL_WORLD_SIZE": "8"}, "LOCAL_WORLD_SIZE=8 but WORLD_SIZE=4"),
    ({"MASTER_ADDR": ""}, "WORLD_SIZE=4 but MASTER_ADDR (the host of rank 0) is not set"),
    ({"MASTER_PORT": None}, "WORLD_SIZE=4 but MASTER_PORT is not set (ports: 1-65535)"),
    ({"MASTER_PORT": "0"}, "WORLD_SIZE=4 but MASTER_PORT is 0 (ports: 1-65535)"),
    ({"MASTER_PORT": "65536"}, "WORLD_SIZE=4 but MASTER_PORT is 65536 (ports: 1-65535)"),
    ({"MASTER_PORT": "http"}, "MASTER_PORT is 'http', where torchrun sets a number"),
])
def test_contradictory_torchrun_variables_are_refused_naming_them(change, named):
    environ = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(train.UsageError) as info:
        launch.check_variables(environ)
    assert str(info.value).startswith(named) and "start train.py with torchrun" in str(info.value), info.value


@pytest.mark.quick
def test_consistent_variables_pass_and_local_ranks_must_fit_the_visible_gpus():
    assert launch.check_variables(GOOD) == (4, 3, 1)
    assert launch.check_variables({}) == (1, 0, 0)  # plain `python train.py`
    assert launch.check_variables({"MASTER_PORT": "any"}) == (1, 0, 0)  # alone, nobody reads it
    # Without LOCAL_WORLD_SIZE the local rank is bounded by the world.
    with pytest.raises(train.UsageError, match=r"^LOCAL_RANK=2 but WORLD_SIZE=2 \(local ranks run from 0 to "):
        launch.check_variables({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "2", "MASTER_ADDR": "a",
                                "MASTER_PORT": "1"})
    with pytest.raises(train.UsageError, match=r"^RANK=1 but WORLD_SIZE=1 "):
        launch.check_variables({"RANK": "1"})
    # Under torchrun on CUDA (init_distributed passes the GPUs this process sees; srun takes the modulo).
    assert launch.check_variables(GOOD, gpus=2) == (4, 3, 1)
    with pytest.raises(train.UsageError) as info:
        launch.check_variables(dict(GOOD, LOCAL_RANK="1"), gpus=1)
    assert str(info.value) == ("LOCAL_RANK=1 but this process sees 1 GPU(s): start at most 1 process(es) per node "
                               "(torchrun --nproc_per_node=1)")


@pytest.mark.quick
def test_the_contradictory_start_of_the_issue_exits_2_at_once_in_one_line(monkeypatch, capfd):
    # Before: a timeout after --dist-timeout (exit 4) and ~40 lines of C++ frames from c10's logger.
    for name in (*TORCHRUN, *(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}.items():
        monkeypatch.setenv(name, value)
    start = time.monotonic()
    assert train.main(["--data", "demo", "--dist-timeout", "5"]) == 2
    assert time.monotonic() - start < 2
    out, err = capfd.readouterr()
    assert err == ("error: RANK=3 but WORLD_SIZE=2 (ranks run from 0 to WORLD_SIZE-1): start train.py with torchrun "
                   "(or srun), which sets them, or unset them to run one process\n") and out == ""


# ------------------------------------------------------------------------------- waiting with a word

@pytest.fixture
def notes_every(monkeypatch):
    """The notes of a waiting start after 0.2 s, then every 0.5 s (5 s and 60 s in a real start)."""
    monkeypatch.setattr(launch, "FIRST_NOTE", 0.2)
    monkeypatch.setattr(launch, "NOTE_EVERY", 0.5)


def group_variables(monkeypatch, port):
    for name in (*TORCHRUN, *(k for k in os.environ if k.startswith(("SLURM_", "TORCHELASTIC_")))):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))


@pytest.mark.quick
def test_rank_0_names_the_ranks_it_waits_for_at_every_note_until_its_timeout(notes_every, monkeypatch, capsys):
    port = free_port()
    group_variables(monkeypatch, port)
    # Ranks 1 and 3 of 5 join right after rank 0 has started its store; 2 and 4 never come.
    joiners = [threading.Timer(0.05, launch._group_store, args=(r, 5, datetime.timedelta(seconds=5))) for r in (1, 3)]
    for joiner in joiners:
        joiner.start()
    start = time.monotonic()
    with pytest.raises(dist.DistStoreError) as info:
        launch._group_store(0, 5, datetime.timedelta(seconds=1.3))
    waited = time.monotonic() - start
    for joiner in joiners:
        joiner.join(timeout=10)
    assert 1.3 <= waited < 1.8
    where = f"to join at 127.0.0.1:{port}"
    assert str(info.value) == f"still waiting for rank(s) 2, 4 (2 of 5) {where}"
    lines = capsys.readouterr().out.splitlines()
    # after 0.2 s, 0.7 s and 1.2 s, each saying how long it will still wait
    assert [re.sub(r"in \d+ s", "in N s", line) for line in lines] == \
        [f"rank 0: waiting for rank(s) 2, 4 (2 of 5) {where}; giving up in N s (--dist-timeout)"] * 3, lines
    assert [int(re.search(r"in (\d+) s", line)[1]) for line in lines] == [1, 1, 0]


@pytest.mark.quick
def test_a_group_that_forms_says_nothing_and_a_long_list_is_cut(monkeypatch, capsys):
    group_variables(monkeypatch, free_port())
    joiners = [threading.Thread(target=launch._group_store, args=(r, 3, datetime.timedelta(seconds=5)))
               for r in (1, 2)]
    for joiner in joiners:
        joiner.start()
    launch._group_store(0, 3, datetime.timedelta(seconds=5))
    for joiner in joiners:
        joiner.join(timeout=10)
    assert capsys.readouterr().out == ""
    group_variables(monkeypatch, free_port())
    with pytest.raises(dist.DistStoreError, match=r"^still waiting for rank\(s\) 1, 2, 3, 4, 5, 6, 7, 8, \.\.\. "
                                                  r"\(99 of 100\) to join at"):
        launch._group_store(0, 100, datetime.timedelta(seconds=0.1))


def test_a_rank_that_cannot_reach_rank_0_says_where_it_waits_without_cpp_frames(notes_every, monkeypatch, capfd):
    port = free_port()  # nobody listens there
    group_variables(monkeypatch, port)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    level = c10_log_level()
    before = level.value
    with pytest.raises(dist.DistError) as info:
        launch.init_distributed(datetime.timedelta(seconds=1))
    assert str(info.value) == f"still waiting for rank 0 at 127.0.0.1:{port}"
    out, err = capfd.readouterr()
    assert out.startswith(f"rank 1: waiting for rank 0 at 127.0.0.1:{port}; giving up in ") and err == "", (out, err)
    assert level.value == before  # C++ warnings are quiet during the set-up only


def c10_log_level():
    return ctypes.c_int.in_dll(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")),
                               "FLAGS_caffe2_log_level")


@pytest.mark.quick
def test_the_set_up_keeps_a_cpp_log_level_asked_for(monkeypatch):
    level = c10_log_level()
    before = level.value
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    with launch._quiet_cpp_log():
        assert level.value == 3  # FATAL
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "INFO")  # asked for, to see the set-up's every step
    with launch._quiet_cpp_log():
        assert level.value == before
    assert level.value == before


@pytest.mark.quick
def test_first_line_drops_cpp_locations_and_frames():
    # What a store connection's error holds with TORCH_SHOW_CPP_STACKTRACES=1, and a gloo error.
    store = RuntimeError("The client socket has timed out after 5000ms while trying to connect to (127.0.0.1, 29555)."
                         "\nException raised from throwTimeoutError at /__w/pytorch/pytorch/torch/csrc/"
                         "distributed/c10d/socket.cpp:1030 (most recent call first):\nframe #0: "
                         "c10::Error::Error(c10::SourceLocation, std::string) + 0x9d (0x7f1e92b5e60d in libc10.so)\n")
    assert launch.first_line(store) == ("The client socket has timed out after 5000ms while trying to connect to "
                                        "(127.0.0.1, 29555).")
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:41834: "
                        "Connection reset by peer. More text\nframe #1: ...")
    assert launch.first_line(gloo) == "Read error [127.0.0.1]:41834: Connection reset by peer"


@pytest.mark.quick
@pytest.mark.parametrize("restarts", ["0", "3"])
def test_the_attempt_token_only_where_torchrun_may_restart(restarts, monkeypatch):
    agent = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)  # torchrun's agent's store
    group_variables(monkeypatch, agent.port)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", restarts)
    joiner = threading.Thread(target=launch._group_store, args=(1, 2, datetime.timedelta(seconds=5)))
    joiner.start()
    launch._group_store(0, 2, datetime.timedelta(seconds=5))
    joiner.join(timeout=10)
    assert agent.check(["train.py/attempt"]) == (restarts != "0")
    assert agent.check(["train.py/joined/1"]) == (restarts == "0")


# ------------------------------------------------------------------------------- whole processes

def test_a_start_whose_peers_never_come_says_for_whom_then_ends_in_one_line(tmp_path):
    # srun started 3 tasks, task 2 never comes; in another step, task 0 never comes.
    ports, processes = (free_port(), free_port()), []
    for rank, tasks, port in ((0, 3, ports[0]), (1, 3, ports[0]), (1, 2, ports[1])):
        env = srun_env(rank, port)
        env.update(SLURM_STEP_NUM_TASKS=str(tasks), SLURM_STEP_TASKS_PER_NODE=str(tasks))
        processes.append(subprocess.Popen(command(["--data", "demo", "--dist-timeout", "6"]), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env))
    try:
        outputs = [p.communicate(timeout=60) for p in processes]
    finally:
        for p in processes:
            p.kill()
    assert [p.returncode for p in processes] == [4, 4, 4], outputs
    (out0, err0), (out1, err1), (lone_out, lone_err) = outputs
    assert re.fullmatch(rf"rank 0: waiting for rank\(s\) 2 \(1 of 3\) to join at localhost:{ports[0]}; giving up in "
                        r"[01] s \(--dist-timeout\)\n", out0), out0
    assert out1 == ""  # rank 0 speaks for the group it holds
    assert re.fullmatch(rf"rank 1: waiting for rank 0 at localhost:{ports[1]}; giving up in [01] s "
                        r"\(--dist-timeout\)\n", lone_out), lone_out
    prefix = "error: rank {}: the process group did not form within --dist-timeout 6 s ("
    assert err0 == prefix.format(0) + (f"still waiting for rank(s) 2 (1 of 3) to join at localhost:{ports[0]}); start "
                                       f"the job again (--resume auto continues the run)\n")
    assert lone_err == prefix.format(1) + (f"still waiting for rank 0 at localhost:{ports[1]}); start the job again "
                                           f"(--resume auto continues the run)\n")
    # Rank 1 joined and waited in gloo's set-up until rank 0 went, taking its store: one line too.
    assert err1.startswith(prefix.format(1)) and err1.count("\n") == 1, err1
