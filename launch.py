"""How this process joins its group: torchrun's or srun's variables, the process group, what a lost peer looks like."""
import contextlib
import ctypes
import datetime
import itertools
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils import UsageError


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control: object = None  # on CUDA a gloo group for CPU-side agreement (stop signals); None: the default group
    launcher: str = None  # "torchrun" or "srun" (no torchrun: SLURM's variables), None when alone

    @property
    def main(self):
        return self.rank == 0


FIRST_NOTE, NOTE_EVERY = 5.0, 60.0  # seconds: a start that waits for peers says so after 5 s, then each minute
LAUNCHED = "start train.py with torchrun (or srun), which sets them, or unset them to run one process"
SRUN = "start train.py with srun (one task per GPU) or with torchrun"


def init_distributed(timeout=datetime.timedelta(minutes=30)):
    """torchrun's or srun's variables -> Dist (alone, no group, without them); NCCL on CUDA, gloo on CPU.
    Contradictory variables raise UsageError at once; no group within `timeout` raises DistError."""
    launch = slurm_launch(os.environ)
    cuda = torch.cuda.is_available()
    world_size, rank, local_rank = check_variables({**os.environ, **launch},
                                                   torch.cuda.device_count() if cuda and not launch else 0)
    os.environ.update(launch)  # as torchrun would: data.default_workers and the store read these names
    if "OMP_NUM_THREADS" in launch:
        torch.set_num_threads(1)  # this process started without it: torch took one thread per core
    device = torch.device("cpu")
    if cuda:  # srun's --gpus-per-task=1 shows each task one GPU; torchrun's processes see them all
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        # torchrun sets 1 (TearDown): on a timeout NCCL's watchdog aborts the process (SIGABRT) before
        # Python sees it; 2 (CleanUpOnly) lets the next collective raise, for train.py's one line (exit 4).
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    if world_size == 1:
        return Dist(device=device)
    with _quiet_cpp_log():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timeout,
                                store=_group_store(rank, world_size, timeout), rank=rank, world_size=world_size)
        # Stop flags are agreed on every step; a gloo group keeps that off the GPU stream (no sync). On
        # the CPU no reference to the group: one held past exit aborts ~1 exit in 7 (SIGABRT, gloo's threads).
        control = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return Dist(rank, local_rank, world_size, device, control, "srun" if launch else "torchrun")


def check_variables(environ, gpus=0):
    """(world_size, rank, local_rank) from torchrun's variables; UsageError naming them and the fix where they
    contradict each other or exceed `gpus` (0: not checked): such a process would wait for ranks that never come."""
    world_size = _whole(environ, "WORLD_SIZE", 1, minimum=1)
    rank, local_rank = _whole(environ, "RANK", 0), _whole(environ, "LOCAL_RANK", 0)
    local_name = "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in environ else "WORLD_SIZE"
    local_world = _whole(environ, local_name, 1, minimum=1)
    port = _whole(environ, "MASTER_PORT", 0) if world_size > 1 else 0
    contradictions = [
        (rank >= world_size, f"RANK={rank} but WORLD_SIZE={environ.get('WORLD_SIZE', '1 (not set)')} (ranks run "
                             f"from 0 to WORLD_SIZE-1)"),
        (local_world > world_size, f"LOCAL_WORLD_SIZE={local_world} but WORLD_SIZE={world_size}"),
        (local_rank >= local_world, f"LOCAL_RANK={local_rank} but {local_name}={environ.get(local_name, '1 (not set)')}"
                                    f" (local ranks run from 0 to {local_name}-1)"),
        (world_size > 1 and not environ.get("MASTER_ADDR"), f"WORLD_SIZE={world_size} but MASTER_ADDR (the host "
                                                            f"of rank 0) is not set"),
        (world_size > 1 and not 1 <= port <= 65535, f"WORLD_SIZE={world_size} but MASTER_PORT is "
                                                    f"{environ.get('MASTER_PORT') or 'not set'} (ports: 1-65535)")]
    for found, text in contradictions:
        if found:
            raise UsageError(f"{text}: {LAUNCHED}")
    if gpus and local_rank >= gpus:
        raise UsageError(f"LOCAL_RANK={local_rank} but this process sees {gpus} GPU(s): start at most "
                         f"{gpus} process(es) per node (torchrun --nproc_per_node={gpus})")
    return world_size, rank, local_rank


def _whole(environ, name, default=None, minimum=0, launcher="torchrun"):
    value = environ.get(name)
    if value is None and default is not None:
        return default
    if value is None or not re.fullmatch(r"\s*\d+\s*", value) or int(value) < minimum:
        raise UsageError(f"{name} is {'not set' if value is None else repr(value)}, where {launcher} sets a number"
                         f"{f' of {minimum} or more' if minimum else ''}: {SRUN if launcher == 'srun' else LAUNCHED}")
    return int(value)


def slurm_launch(environ):
    """torchrun's variables for a task that srun started, from SLURM's: MASTER_ADDR the step's first host (task 0
    runs there), OMP_NUM_THREADS 1 as torchrun (threads change CPU float sums), each unless set. {} under torchrun,
    for one task and outside srun (only srun sets SLURM_STEP_NUM_TASKS). Contradictory values raise UsageError."""
    if "WORLD_SIZE" in environ or "RANK" in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    world_size = _whole(environ, "SLURM_STEP_NUM_TASKS", minimum=1, launcher="srun")
    if world_size == 1:
        return {}
    rank, local_rank = (_whole(environ, name, launcher="srun") for name in ("SLURM_PROCID", "SLURM_LOCALID"))
    if rank >= world_size:
        raise UsageError(f"SLURM_PROCID={rank} but SLURM_STEP_NUM_TASKS={world_size}: {SRUN}, which sets both")
    job = environ.get("SLURM_JOB_ID", "")
    if not (environ.get("MASTER_PORT") or job.isdigit()):
        raise UsageError(f"srun's SLURM_JOB_ID is {job or 'not set'}, so no port can be derived from it: "
                         f"export MASTER_PORT=<a free port, the same for every task>")
    nodes = next((name for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if environ.get(name)), None)
    if not (environ.get("MASTER_ADDR") or nodes):
        raise UsageError(f"srun started {world_size} tasks, but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
                         f"nor MASTER_ADDR is set: export MASTER_ADDR=<the host of task 0>, e.g. "
                         f"$(scontrol show hostnames | head -n 1)")
    try:
        host = environ.get("MASTER_ADDR") or expand_hostlist(environ[nodes])[0]
    except ValueError as e:
        raise UsageError(f"{nodes}={environ[nodes]} is not a SLURM host list ({e}); export MASTER_ADDR=<the host "
                         f"of task 0>") from None
    # The port from the job id is the same in every task (and in a requeued job) with no exchange: above
    # the well-known ports, below Linux's ephemeral ones (32768-60999); jobs collide if equal modulo 20000.
    launch = {"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(local_rank), "MASTER_ADDR": host,
              "MASTER_PORT": environ.get("MASTER_PORT") or str(10000 + int(job) % 20000)}
    if "OMP_NUM_THREADS" not in environ:
        launch["OMP_NUM_THREADS"] = "1"
    if text := environ.get("SLURM_STEP_TASKS_PER_NODE"):
        counts, node = tasks_per_node(text), _whole(environ, "SLURM_NODEID", 0, launcher="srun")
        if node >= len(counts):
            raise UsageError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={text} names {len(counts)} node(s)")
        if local_rank >= counts[node]:
            raise UsageError(f"SLURM_LOCALID={local_rank} but SLURM_STEP_TASKS_PER_NODE={text} gives node {node} "
                             f"{counts[node]} task(s): {SRUN}, which sets both")
        launch["LOCAL_WORLD_SIZE"] = str(counts[node])
    return launch


def expand_hostlist(text):
    """SLURM's host list -> its host names: "gpu[01-03,07],login2" -> gpu01 gpu02 gpu03 gpu07 login2, "r[1-2]n[1-2]"
    -> r1n1 r1n2 r2n1 r2n2. ValueError for unbalanced brackets, an empty name or a bad range."""
    hosts = []
    for name in re.split(r",(?![^\[\]]*\])", text):  # the commas outside brackets
        parts = re.split(r"\[([^\[\]]*)\]", name)  # text, ranges, text, ..., text
        if not name or any("[" in piece or "]" in piece for piece in parts[::2]):
            raise ValueError(f"bad host name {name!r}")
        choices = [[piece] for piece in parts]
        for i in range(1, len(parts), 2):
            spans = [re.fullmatch(r"(\d+)(?:-(\d+))?", span) for span in parts[i].split(",")]
            if not all(spans) or any(int(span[2] or span[1]) < int(span[1]) for span in spans):
                raise ValueError(f"bad range [{parts[i]}]")
            choices[i] = [f"{n:0{len(span[1])}d}" for span in spans  # zero padding kept
                          for n in range(int(span[1]), int(span[2] or span[1]) + 1)]
        hosts += ["".join(chosen) for chosen in itertools.product(*choices)]
    return hosts


def tasks_per_node(text):
    """SLURM's tasks per node, compressed -> one count per node: "8(x2),4" -> [8, 8, 4]."""
    parts = [re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip()) for part in text.split(",")]
    if not all(parts):
        raise UsageError(f"SLURM_STEP_TASKS_PER_NODE={text} is not a list of task counts like 8(x2),4")
    return [int(part[1]) for part in parts for _ in range(int(part[2] or 1))]


@contextlib.contextmanager
def _quiet_cpp_log():
    """c10's logger writes each retry of a store connection with its C++ stack (~40 lines) and reads
    TORCH_CPP_LOG_LEVEL only at import: the set-up alone runs at FATAL (3), unless a level was asked for."""
    try:
        level = ctypes.c_int.in_dll(ctypes.CDLL("libc10.so"), "FLAGS_caffe2_log_level")  # torch's, by its soname
    except (OSError, ValueError):  # not Linux, or a build whose logger is glog: its level stays
        level = ctypes.c_int(0)
    saved, level.value = level.value, level.value if "TORCH_CPP_LOG_LEVEL" in os.environ else max(level.value, 3)
    try:
        yield
    finally:
        level.value = saved


def _group_store(rank, world_size, timeout):
    """The store the group forms through (rank 0's, or torchrun's agent's) once every rank joined it;
    while one waits it says for whom: rank 0 names the missing ranks, the others an unreachable rank 0."""
    deadline = time.monotonic() + timeout.total_seconds()
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent serves the store
    if rank == 0 and not agent:
        store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    else:
        def connect():  # a client, or None within ~2 s (asked for 0.5 s, it retries once)
            with contextlib.suppress(dist.DistError):
                return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=0.5))
        store = _wait(connect, lambda: f"rank 0 at {host}:{port}", rank, deadline)
    store.set_timeout(timeout)
    # Under torchrun's restarts each attempt forms under its own prefix: the agent's store outlives restarts with no
    # attempt in torch 2.14's keys, so a new rank could read the dead ranks' addresses (2-3 of 8 restarts formed
    # without this), and agents count only their own restarts. Rank 0 publishes the prefix and answers each rank's
    # nonce under it; a rank that read a stale prefix gets no answer and reads the prefix again.
    prefix, restartable = "train.py", agent and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    if restartable and rank > 0:
        nonce, prefix = os.urandom(8).hex(), None
        while prefix is None or not store.check([f"{prefix}/welcome/{nonce}"]):
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"rank 0 did not answer at {host}:{port}")
            prefix = store.get("train.py/attempt").decode()
            store.set(f"{prefix}/joined/{rank}", nonce)
            time.sleep(0.2)
        return dist.PrefixStore(prefix, store)
    if restartable:
        prefix = f"train.py/{os.urandom(8).hex()}"
        store.set("train.py/attempt", prefix)
    store.set(f"{prefix}/joined/{rank}", "")
    if rank == 0:
        keys = [f"{prefix}/joined/{r}" for r in range(1, world_size)]

        def missing():
            late = [r for r, key in enumerate(keys, 1) if not store.check([key])]
            shown = ", ".join(map(str, late[:8])) + ", ..." * (len(late) > 8)
            return f"rank(s) {shown} ({len(late)} of {world_size}) to join at {host}:{port}"
        _wait(lambda: store.check(keys), missing, 0, deadline)
        if restartable:
            nonces = [nonce.decode() for nonce in store.multi_get(keys)]
            store.multi_set([f"{prefix}/welcome/{nonce}" for nonce in nonces], ["1"] * len(nonces))
    return dist.PrefixStore(prefix, store)


def _wait(ready, whom, rank, deadline):
    """ready()'s first true value, asked every 0.1 s; says on stdout whom it waits for (FIRST_NOTE, NOTE_EVERY)."""
    note = time.monotonic() + FIRST_NOTE
    while not (result := ready()):
        now = time.monotonic()
        if now >= note:  # also when a try to connect outlasted the deadline: the note comes first
            print(f"rank {rank}: waiting for {whom()}; giving up in {max(deadline - now, 0):.0f} s (--dist-timeout)",
                  flush=True)
            note = now + NOTE_EVERY
        if now >= deadline:
            raise dist.DistStoreError(f"still waiting for {whom()}")
        time.sleep(0.1)
    return result


def is_peer_failure(error):
    """Whether `error` (from a collective or the set-up) means that a peer stopped answering or went away."""
    gloo = ("gloo/transport", "Gloo connectFullMesh", "timeout caused pair closure")  # the last: in DDP's backward
    return isinstance(error, dist.DistError) or any(text in str(error) for text in gloo)


def first_line(error):
    """An error's first sentence, without C++ source locations or TORCH_SHOW_CPP_STACKTRACES's frames."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(error)).strip()
    return text.splitlines()[0].split(". ")[0][:300] if text else type(error).__name__
