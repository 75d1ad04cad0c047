"""How this process joins its group: torchrun's or srun's variables, the process group, and what a lost
peer looks like."""
import contextlib
import ctypes
import datetime
import functools
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


def init_distributed(timeout=datetime.timedelta(minutes=30)):
    """torchrun's variables, or srun's (slurm_launch) -> Dist; alone (no group) without them. NCCL on
    CUDA, gloo on CPU; GPU LOCAL_RANK (under srun modulo the visible ones). Contradictory variables raise
    UsageError at once; no group within `timeout` raises RuntimeError (DistError), as later collectives."""
    launch = slurm_launch(os.environ)
    cuda = torch.cuda.is_available()
    world_size, rank, local_rank = check_variables({**os.environ, **launch},
                                                   torch.cuda.device_count() if cuda and not launch else 0)
    os.environ.update(launch)  # as torchrun would: data.default_workers and the store read these names
    if "OMP_NUM_THREADS" in launch:
        torch.set_num_threads(1)  # this process started without it: torch took one thread per core
    device = torch.device("cpu")
    if cuda:  # srun's --gpus-per-task=1 shows each task one GPU; torchrun's processes see them all
        device = torch.device("cuda", local_rank % torch.cuda.device_count() if launch else local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return Dist(device=device)
    if cuda:
        # torchrun sets 1 (TearDown): on a timeout NCCL's watchdog aborts the process (SIGABRT) before
        # Python sees it; 2 (CleanUpOnly) lets the next collective raise, for train.py's one line (exit 4).
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    with _quiet_cpp_log():
        store = _group_store(rank, world_size, timeout)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timeout,
                                store=store, rank=rank, world_size=world_size)
        # Stop flags are agreed on every step; a gloo group keeps that off the GPU stream (no sync). On
        # the CPU no reference to the group: one held past exit aborts ~1 exit in 7 (SIGABRT, gloo's threads).
        control = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return Dist(rank, local_rank, world_size, device, control, "srun" if launch else "torchrun")


def check_variables(environ, gpus=0):
    """(world_size, rank, local_rank) from torchrun's variables in `environ`; UsageError naming them and
    the fix where they contradict each other or exceed `gpus` (the GPUs a torchrun process sees; 0: not
    checked), as such a process would wait for ranks that can never come."""
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


def _whole(environ, name, default=None, minimum=0, launcher="torchrun", fix=LAUNCHED):
    value = environ.get(name)
    if value is None and default is not None:
        return default
    if value is None or not re.fullmatch(r"\s*\d+\s*", value) or int(value) < minimum:
        raise UsageError(f"{name} is {'not set' if value is None else repr(value)}, where {launcher} sets a number"
                         f"{f' of {minimum} or more' if minimum else ''}: {fix}")
    return int(value)


# MASTER_PORT under srun without one: 10000 + job id % 20000, the same in every task (and in a requeued
# job) with no exchange; above the well-known ports, below Linux's ephemeral ones (32768-60999) that
# outgoing connections take; two jobs on a node collide only if their ids are equal modulo 20000.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000
SRUN = "start train.py with srun (one task per GPU) or with torchrun"


def slurm_launch(environ):
    """torchrun's variables for a task that srun started, from SLURM's; MASTER_ADDR and MASTER_PORT
    from `environ`, else the step's first host (task 0 runs there) and a port from the job id;
    OMP_NUM_THREADS=1 unless set, as torchrun (threads change CPU float sums). {} under torchrun, for
    one task and outside srun: only srun sets SLURM_STEP_NUM_TASKS (a batch script or salloc shell
    runs alone). Contradictory values raise UsageError."""
    if "WORLD_SIZE" in environ or "RANK" in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    number = functools.partial(_whole, environ, launcher="srun", fix=SRUN)
    world_size = number("SLURM_STEP_NUM_TASKS", minimum=1)
    if world_size == 1:
        return {}
    rank, local_rank = number("SLURM_PROCID"), number("SLURM_LOCALID")
    if rank >= world_size:
        raise UsageError(f"SLURM_PROCID={rank} but SLURM_STEP_NUM_TASKS={world_size}: {SRUN}, which sets both")
    job = environ.get("SLURM_JOB_ID", "")
    if not (environ.get("MASTER_PORT") or job.isdigit()):
        raise UsageError(f"srun's SLURM_JOB_ID is {job or 'not set'}, so no port can be derived from it: "
                         f"export MASTER_PORT=<a free port, the same for every task>")
    launch = {"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(local_rank),
              "MASTER_ADDR": environ.get("MASTER_ADDR") or _slurm_master_addr(environ, world_size),
              "MASTER_PORT": environ.get("MASTER_PORT") or str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN)}
    if "OMP_NUM_THREADS" not in environ:
        launch["OMP_NUM_THREADS"] = "1"
    if text := environ.get("SLURM_STEP_TASKS_PER_NODE"):
        counts = tasks_per_node(text)
        node = number("SLURM_NODEID", 0)
        if node >= len(counts):
            raise UsageError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE={text} names {len(counts)} node(s)")
        if local_rank >= counts[node]:
            raise UsageError(f"SLURM_LOCALID={local_rank} but SLURM_STEP_TASKS_PER_NODE={text} gives node {node} "
                             f"{counts[node]} task(s): {SRUN}, which sets both")
        launch["LOCAL_WORLD_SIZE"] = str(counts[node])
    return launch


def _slurm_master_addr(environ, world_size):
    for name in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST"):
        if environ.get(name):
            try:
                return expand_hostlist(environ[name])[0]
            except ValueError as e:
                raise UsageError(f"{name}={environ[name]} is not a SLURM host list ({e}); export MASTER_ADDR="
                                 f"<the host of task 0>") from None
    raise UsageError(f"srun started {world_size} tasks, but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
                     f"nor MASTER_ADDR is set: export MASTER_ADDR=<the host of task 0>, e.g. "
                     f"$(scontrol show hostnames | head -n 1)")


def expand_hostlist(text):
    """SLURM's host list -> its host names: "gpu[01-03,07],login2" -> gpu01, gpu02, gpu03, gpu07, login2
    (zero padding kept); bracket groups anywhere in a name, expanded left to right ("r[1-2]n[1-2]" ->
    r1n1, r1n2, r2n1, r2n2). ValueError for unbalanced brackets, an empty name or a bad range."""
    hosts = []
    for name in re.split(r",(?![^\[\]]*\])", text):  # the commas outside brackets
        parts = re.split(r"\[([^\[\]]*)\]", name)  # text, ranges, text, ..., text
        if not name or any("[" in piece or "]" in piece for piece in parts[::2]):
            raise ValueError(f"bad host name {name!r}")
        choices = [[piece] for piece in parts]
        for i in range(1, len(parts), 2):
            choices[i] = []
            for span in parts[i].split(","):
                bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", span)
                low, high = (bounds[1], bounds[2] or bounds[1]) if bounds else ("1", "0")
                if int(high) < int(low):
                    raise ValueError(f"bad range [{parts[i]}]")
                choices[i] += [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
        hosts += ["".join(chosen) for chosen in itertools.product(*choices)]
    return hosts


def tasks_per_node(text):
    """SLURM's tasks per node, compressed -> one count per node: "8(x2),4" -> [8, 8, 4]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise UsageError(f"SLURM_STEP_TASKS_PER_NODE={text} is not a list of task counts like 8(x2),4")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


@contextlib.contextmanager
def _quiet_cpp_log():
    """c10's logger writes each retry of a store connection to stderr with its C++ stack (~40 lines)
    and reads TORCH_CPP_LOG_LEVEL only at import: so the set-up alone runs at its level FATAL (unless
    one was asked for). What went wrong still reaches the caller, as the exception."""
    try:
        level = ctypes.c_int.in_dll(ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")),
                                    "FLAGS_caffe2_log_level")
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
        store = _wait(lambda: _connect(host, port), lambda: f"rank 0 at {host}:{port}", rank, deadline)
    store.set_timeout(timeout)
    if agent and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
        return dist.PrefixStore(_this_attempts_prefix(store, rank, world_size, deadline, f"{host}:{port}"), store)
    store.set(f"train.py/joined/{rank}", "")
    if rank == 0:
        _wait_for_ranks(store, "train.py", world_size, deadline, f"{host}:{port}")
    return dist.PrefixStore("train.py", store)


def _connect(host, port):
    """A client of the store at host:port, or None within ~2 s (asked for 0.5 s, it retries once)."""
    with contextlib.suppress(dist.DistError):
        return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=0.5))


def _wait(ready, whom, rank, deadline):
    """ready()'s first true value, asked every 0.1 s; meanwhile says on stdout whom() this rank waits
    for, after FIRST_NOTE seconds, then every NOTE_EVERY. DistStoreError at `deadline`."""
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


def _wait_for_ranks(store, prefix, world_size, deadline, where):
    """Rank 0: until every other rank has set `prefix`/joined/RANK, naming those that have not."""
    keys = [f"{prefix}/joined/{r}" for r in range(1, world_size)]

    def missing():
        late = [r for r, key in enumerate(keys, 1) if not store.check([key])]
        shown = ", ".join(map(str, late[:8])) + ", ..." * (len(late) > 8)
        return f"rank(s) {shown} ({len(late)} of {world_size}) to join at {where}"
    _wait(lambda: store.check(keys), missing, 0, deadline)


def _this_attempts_prefix(store, rank, world_size, deadline, where):
    """A key prefix for this attempt alone: torchrun's agent keeps its store over restarts and torch
    2.14 puts no attempt in the keys, so a restarted rank would connect to the dead ranks' addresses
    (2 ranks, rank 0 killed: 2-3 of 8 restarts formed without this). Agents count only their own
    restarts, so rank 0 publishes a token and answers each rank's nonce; a stale token gets no answer."""
    if rank == 0:
        token = os.urandom(8).hex()
        store.set("train.py/attempt", token)
        _wait_for_ranks(store, f"train.py/{token}", world_size, deadline, where)
        nonces = [n.decode() for n in store.multi_get([f"train.py/{token}/joined/{r}" for r in range(1, world_size)])]
        store.multi_set([f"train.py/{token}/welcome/{n}" for n in nonces], ["1"] * len(nonces))
        return f"train.py/{token}"
    nonce, token = os.urandom(8).hex(), None
    while token is None or not store.check([f"train.py/{token}/welcome/{nonce}"]):
        if time.monotonic() > deadline:
            raise dist.DistStoreError(f"rank 0 did not answer at {where}")
        latest = store.get("train.py/attempt").decode()
        if latest != token:
            token = latest
            store.set(f"train.py/{token}/joined/{rank}", nonce)
        time.sleep(0.2)
    return f"train.py/{token}"


def is_peer_failure(error):
    """Whether `error` (raised by a collective or by set-up) means that another process of the
    group stopped answering or went away, rather than a bug of this one."""
    text = str(error)
    return (isinstance(error, dist.DistError) or "gloo/transport" in text or "Gloo connectFullMesh" in text
            or "timeout caused pair closure" in text)  # gloo, when the timeout hits inside DDP's backward


def first_line(error):
    """The gist of an error for a one-line message: its first sentence, without C++ source
    locations or the stack that TORCH_SHOW_CPP_STACKTRACES=1 appends."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(error)).strip()
    return text.splitlines()[0].split(". ")[0][:300] if text else type(error).__name__
