"""Small pieces train.py builds on: torchrun (or srun) set-up, checkpoint files, RNG state, signals,
EMA."""
import contextlib
import copy
import datetime
import errno
import fcntl
import inspect
import json
import os
import random
import re
import shutil
import signal
import socket
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad command-line input: train.py prints the message on one line and exits with code 2."""


class DiskFull(Exception):
    """A file of the run did not fit on its disk (the previous version of it is kept)."""


class DataError(Exception):
    """A problem with the data itself (layout or file); the message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# Distributed

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control: object = None  # a gloo group for CPU-side agreement (stop signals), None when alone
    launcher: str = None  # "torchrun" or "srun" (no torchrun: SLURM's variables), None when alone

    @property
    def main(self):
        return self.rank == 0


def init_distributed(timeout=datetime.timedelta(minutes=30)):
    """torchrun's environment, or SLURM's in a task that srun started (slurm_launch) -> Dist. Plain
    `python train.py` is world size 1, no process group. NCCL on CUDA, gloo on CPU; one GPU per
    process: LOCAL_RANK (under srun modulo the visible GPUs, so that --gpus-per-task=1, one visible
    each, and all of a node's GPUs visible both work). Set-up and every collective give up after `timeout`
    (RuntimeError) instead of waiting for a stopped or vanished process."""
    launch = slurm_launch(os.environ)
    os.environ.update(launch)  # as torchrun would: data.default_workers and env:// read these names
    if "OMP_NUM_THREADS" in launch:
        torch.set_num_threads(1)  # this process started without it: torch took one thread per core
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # srun's --gpus-per-task=1 shows each task one GPU; torchrun's processes see them all
        device = torch.device("cuda", local_rank % torch.cuda.device_count() if launch else local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return Dist(device=device)
    cuda = device.type == "cuda"
    if cuda:
        # torchrun sets 1 (TearDown): on a timeout NCCL's watchdog then aborts the process (SIGABRT)
        # before Python sees it. 2 (CleanUpOnly) aborts the communicators and lets the next
        # collective raise, so that train.py reports the --dist-timeout in one line (exit 4).
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
    store = _this_attempts_store(rank, world_size, timeout) if _under_torchrun_agent_store() else None
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, timeout=timeout,
                            store=store, rank=rank, world_size=world_size)
    # Stop flags are agreed on every step; a gloo group keeps that off the GPU stream (no sync).
    control = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    return Dist(rank, local_rank, world_size, device, control, "srun" if launch else "torchrun")


# MASTER_PORT under srun without one: 10000 + job id % 20000. Every task of a job derives the same
# port with no exchange, a requeued job (same id) the same again; 10000-29999 lies above the
# well-known ports and below Linux's ephemeral range (32768-60999), from which the system takes
# the local ports of outgoing connections; two jobs on one node collide only if their ids are
# equal modulo 20000.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000


def slurm_launch(environ):
    """torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT) for a task that srun started, from SLURM's: SLURM_STEP_NUM_TASKS, SLURM_PROCID,
    SLURM_LOCALID, SLURM_STEP_TASKS_PER_NODE at SLURM_NODEID; MASTER_ADDR and MASTER_PORT from
    `environ` when set, else the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST; task 0
    runs there) and a port from SLURM_JOB_ID. OMP_NUM_THREADS=1 unless set, torchrun's default
    (on the CPU the thread count changes the float sums: bitwise equal runs need the same).
    {} when torchrun's own are set (torchrun inside an allocation), when this is no srun task,
    and for a step of one task. Only srun sets SLURM_STEP_NUM_TASKS: the batch script
    (SLURM_PROCID 0) and an salloc shell carry the allocation's SLURM_NTASKS, and a plain
    `python train.py` there runs alone."""
    if "WORLD_SIZE" in environ or "RANK" in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return {}
    world_size = _slurm_int(environ, "SLURM_STEP_NUM_TASKS")
    if world_size == 1:
        return {}
    launch = {"WORLD_SIZE": str(world_size), "RANK": str(_slurm_int(environ, "SLURM_PROCID")),
              "LOCAL_RANK": str(_slurm_int(environ, "SLURM_LOCALID")),
              "MASTER_ADDR": environ.get("MASTER_ADDR") or _slurm_master_addr(environ, world_size),
              "MASTER_PORT": environ.get("MASTER_PORT") or _slurm_master_port(environ)}
    if "OMP_NUM_THREADS" not in environ:
        launch["OMP_NUM_THREADS"] = "1"
    if environ.get("SLURM_STEP_TASKS_PER_NODE"):
        counts = tasks_per_node(environ["SLURM_STEP_TASKS_PER_NODE"])
        node = _slurm_int(environ, "SLURM_NODEID") if "SLURM_NODEID" in environ else 0
        if node >= len(counts):
            raise UsageError(f"SLURM_NODEID={node} but SLURM_STEP_TASKS_PER_NODE="
                             f"{environ['SLURM_STEP_TASKS_PER_NODE']} names {len(counts)} node(s)")
        launch["LOCAL_WORLD_SIZE"] = str(counts[node])
    return launch


def _slurm_int(environ, name):
    value = environ.get(name)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} is {'not set' if value is None else repr(value)}, where srun sets a number: "
                         f"start train.py with srun (one task per GPU) or with torchrun") from None


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


def _slurm_master_port(environ):
    job = environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        raise UsageError(f"srun's SLURM_JOB_ID is {job or 'not set'}, so no port can be derived from it: "
                         f"export MASTER_PORT=<a free port, the same for every task>")
    return str(SLURM_PORT_BASE + int(job) % SLURM_PORT_SPAN)


def expand_hostlist(text):
    """SLURM's host list -> the host names in its order: "gpu[01-03,07],login2" -> gpu01, gpu02,
    gpu03, gpu07, login2 (zero padding kept); brackets may stand anywhere in a name ("a[1-2]-b",
    "r[1-2]n[1-4]"). ValueError for unbalanced brackets, an empty name or a bad range."""
    names, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        depth += (char == "[") - (char == "]")
        if depth not in (0, 1):
            raise ValueError("unbalanced or nested brackets")
        if char == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced brackets")
    return [host for name in names for host in _expand_name(name)]


def _expand_name(name):
    """One name of a host list, its bracket groups expanded left to right: "r[1-2]n[1-2]" -> r1n1,
    r1n2, r2n1, r2n2."""
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", name)
    if match is None:
        if not name or "]" in name:
            raise ValueError(f"bad host name {name!r}")
        return [name]
    head, ranges, rest = match.groups()
    tails = _expand_name(rest) if rest else [""]
    numbers = []
    for part in ranges.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if bounds is None or int(bounds[2] or bounds[1]) < int(bounds[1]):
            raise ValueError(f"bad range [{ranges}]")
        low, high = bounds[1], bounds[2] or bounds[1]
        numbers += [f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1)]
    return [head + number + tail for number in numbers for tail in tails]


def tasks_per_node(text):
    """SLURM's tasks per node, compressed -> one count per node: "8(x2),4" -> [8, 8, 4]."""
    counts = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise UsageError(f"SLURM_STEP_TASKS_PER_NODE={text} is not a list of task counts like 8(x2),4")
        counts += [int(match[1])] * int(match[2] or 1)
    return counts


def _under_torchrun_agent_store():
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _this_attempts_store(rank, world_size, timeout):
    """The store of torchrun's agent, seen under a prefix that only this attempt's processes use.

    The agent keeps one TCPStore for the whole job, restarts included (--max-restarts), and torch
    puts no attempt prefix on the keys: a restarted group would read the addresses that the
    killed processes published there, and gloo (NCCL likewise) would connect to a dead port
    ("Connection refused") or to whatever listens there now (a hang). TORCHELASTIC_RESTART_COUNT
    cannot be the prefix: every node's agent counts only its own restarts. So rank 0 publishes a
    fresh token and answers each other rank by a nonce of that rank's; a rank that read a dead
    attempt's token gets no answer, reads the token again and joins anew.

    torch 2.14 still needs it, for static and c10d rendezvous alike (--standalone is c10d): the
    agent makes the shared store's server once (DynamicRendezvousHandler.next_rendezvous) and keeps
    it over restarts, and the workers' keys carry no round ("default_pg/0//cpu//0/1" in every
    attempt); measured here, 2 ranks, rank 0 killed under --max-restarts=1: static 2/8 restarts
    formed their group, c10d 3/8, --standalone 3/8, with this 8/8.
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment also avoids it, for c10d only
    (the agent then exports TORCHELASTIC_USE_AGENT_STORE=False and this is not used)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    current = "train.py/attempt"
    if rank == 0:
        token = os.urandom(8).hex()
        store.set(current, token)
        joined = [f"train.py/{token}/joined/{r}" for r in range(1, world_size)]
        store.wait(joined)  # the store's timeout bounds it
        nonces = [n.decode() for n in store.multi_get(joined)]
        store.multi_set([f"train.py/{token}/welcome/{n}" for n in nonces], ["1"] * len(nonces))
    else:
        nonce, token, deadline = os.urandom(8).hex(), None, time.monotonic() + timeout.total_seconds()
        while token is None or not store.check([f"train.py/{token}/welcome/{nonce}"]):
            if time.monotonic() > deadline:
                raise dist.DistStoreError(f"rank 0 did not answer within {timeout.total_seconds():g} s")
            latest = store.get(current).decode()
            if latest != token:
                token = latest
                store.set(f"train.py/{token}/joined/{rank}", nonce)
            time.sleep(0.2)
    return dist.PrefixStore(f"train.py/{token}", store)


def is_peer_failure(error):
    """Whether `error` (raised by a collective or by set-up) means that another process of the
    group stopped answering or went away, rather than a bug of this one."""
    text = str(error)
    return (isinstance(error, dist.DistError) or "gloo/transport" in text or "Gloo connectFullMesh" in text
            or "timeout caused pair closure" in text)  # gloo, when the timeout hits inside DDP's backward


def first_line(error):
    """The gist of an error for a one-line message: its first sentence, without C++ source locations."""
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", str(error)).strip()
    return text.splitlines()[0].split(". ")[0][:300] if text else type(error).__name__


def all_reduce(tensor, env, op=dist.ReduceOp.SUM, group=None):
    if env.world_size > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def broadcast_object(obj, env):
    """Rank 0's `obj` on every rank."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, env):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if env.world_size == 1:
        return [obj]
    out = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module, env):
    """Give every rank rank 0's BatchNorm statistics (each rank's running stats follow its own
    batches), so that all ranks evaluate and save the very same model."""
    if env.world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def data_parallel(model, env):
    """DDP for training. No BatchNorm buffer broadcast before every forward (DDP's default):
    running statistics only matter for evaluation, and broadcast_buffers() gives every rank rank
    0's before each one. Gradients live in DDP's all-reduce buckets (no gradient-sized copy)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the switch (and deprecated the old name); with both, buffers start equal.
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(model, device_ids=[env.device] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True, **no_buffer_sync)


# ---------------------------------------------------------------------------------------------
# Random state: every generator a run draws from, per rank

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state(device=torch.device("cpu")):
    """Every generator this process draws from. On CUDA only `device`'s own generator: the other
    GPUs of the node belong to other ranks, and their index differs between layouts (1x8 vs 2x4)."""
    keys = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (keys[0], torch.from_numpy(keys[1].astype(np.int64)), *keys[2:]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device=torch.device("cpu")):
    """Restore what rng_state saved (a CUDA state only on CUDA: a CPU run goes on without it)."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------
# Checkpoint files. torch.save writes in place (a crash or a full disk mid-write leaves a truncated
# last.pt), and torch.distributed.checkpoint writes a folder of shards that torch.load cannot read
# and a pasted efficientnet.py cannot use; so a temporary file, fsync and rename, here.

def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _out_of_space(error):
    """Whether a write failed for want of space (or quota); torch.save reports it as a RuntimeError
    raised while handling the OSError, so the chain of causes is searched."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _megabytes(size):
    return f"{size / 2 ** 20:,.0f} MB" if size >= 2 ** 20 else f"{size / 2 ** 10:,.1f} kB"


@contextlib.contextmanager
def _replacing(path, size):
    """Yields a hidden temporary name beside `path` to write (about `size` bytes); when the block
    succeeds the file is renamed over `path` (atomic) and the folder fsynced, otherwise removed,
    `path` untouched. A full disk raises DiskFull naming the folder and the space needed."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and _out_of_space(e):
            raise DiskFull(f"no space left in {folder} for {os.path.basename(path)}: it needs about "
                           f"{_megabytes(size)}, {_megabytes(shutil.disk_usage(folder).free)} are free") from None
        raise
    _fsync_dir(folder)


def _tensor_bytes(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def save_atomic(state, path):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at any
    moment leaves either the old file or the new one, never a partial one."""
    with _replacing(path, _tensor_bytes(state)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def copy_atomic(src, dst):
    """`dst` becomes the file `src` is now: a hard link (no copy) where the file system allows it."""
    with _replacing(dst, os.path.getsize(src)) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def write_atomic(path, write, size=0):
    """`write(tmp)` writes the file under a temporary name beside `path` (for writers that take a
    path: torch.export.save, ONNX); when it returns, the file is fsynced and renamed over `path`,
    when it raises, the temporary is removed and `path` left as it was. `size`: about the bytes."""
    with _replacing(path, size) as tmp:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def remove_stale_temporaries(folder):
    """Delete the temporary files of save_atomic / copy_atomic that a killed process left behind.
    Only call it while holding the folder's lock (no live writer then)."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp." in name:
            os.remove(os.path.join(folder, name))


READ_ATTEMPTS = 4  # a network file system's transient errors (EIO, ESTALE, timeouts) get 3 more tries
READ_BACKOFF_SECONDS = 0.05  # doubled after each failed try: 0.05 + 0.1 + 0.2 s at most


def read_retrying(read, what, fix, retries=None):
    """read()'s bytes, tried again after an OSError, READ_ATTEMPTS times in all, then DataError naming
    `what` and `fix`. `retries`: a multiprocessing.Value counting the retries of all loader workers
    (torch's DataLoader passes nothing else back from them)."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except OSError as e:
            if attempt + 1 == READ_ATTEMPTS:
                raise DataError(f"cannot read {what}: {e.strerror or e} ({READ_ATTEMPTS} attempts; {fix})") from None
            if retries is not None:
                with retries.get_lock():
                    retries.value += 1
            time.sleep(READ_BACKOFF_SECONDS * 2 ** attempt)


def read_file(path, retries=None):
    """The bytes of the file `path`, read with retries (read_retrying)."""
    def read():
        with open(path, "rb") as f:
            return f.read()
    return read_retrying(read, f"image {path}", "check the file system, or remove the file", retries)


def load_checkpoint(path, what="checkpoint", advice="resume from another one"):
    """torch.load with weights_only=True; a missing, truncated or foreign file raises UsageError
    (naming it as `what`, ending with `advice`)."""
    if not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):  # torch.save's zip archive or older pickle
        raise UsageError(f"{what} {path} is not a file that torch.save wrote; {advice}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and torch errors alike mean: not a usable checkpoint
        raise UsageError(f"{what} {path} is corrupt or truncated ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); {advice}") from None
    if not isinstance(state, dict):
        raise UsageError(f"{path} is not a checkpoint or state dict (it holds a {type(state).__name__})")
    return state


def newest_good_checkpoint(folder, names=("last.pt", "best.pt")):
    """(path, state) of the newest checkpoint in `folder` that loads, skipping corrupt ones and
    reporting them in the third item; (None, None, skipped) when there is none."""
    candidates = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    candidates.sort(key=os.path.getmtime, reverse=True)
    skipped = []
    for path in candidates:
        try:
            state = load_checkpoint(path)
        except UsageError as e:
            skipped.append(str(e))
            continue
        if "model" in state and "epoch" in state:
            return path, state, skipped
        skipped.append(f"{path} holds no training state")
    return None, None, skipped


RUN_FILES = re.compile(r"last\.pt|best\.pt|best-epoch\d+\.pt|args\.json|metrics\.jsonl")


def same_file(a, b):
    """Whether paths `a` and `b` name one file (links and other spellings included)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def refuse_overwriting(output, inputs, flag_name):
    """UsageError when writing `output` would destroy one of `inputs` or a file that a run folder
    needs (a run folder holds last.pt or args.json), naming a place that works."""
    folder, name = os.path.split(os.path.abspath(output))
    elsewhere = os.path.join(folder, "averaged.pt" if name.endswith(".pt") else "out-" + name)
    for path in inputs:
        if same_file(output, path):
            raise UsageError(f"{flag_name} {output} is one of the inputs, which it would overwrite; "
                             f"write elsewhere, e.g. {flag_name} {elsewhere}")
    is_run = any(os.path.exists(os.path.join(folder, f)) for f in ("last.pt", "args.json"))
    if is_run and RUN_FILES.fullmatch(name):
        raise UsageError(f"{flag_name} {output} is a file of the run in {folder}, which needs it to resume; "
                         f"write elsewhere, e.g. {flag_name} {elsewhere}")


def write_text(path, text):
    """Rewrite `path` with `text`, atomically."""
    with _replacing(path, len(text.encode())) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def lock_run_dir(folder):
    """Hold an exclusive lock on `folder` for this process's life; a folder locked by a running run
    raises UsageError naming its owner."""
    handle = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"{folder} is in use by a running run ({owner}); wait for it to end or "
                         f"choose another --output-dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def unlock_run_dir(handle):
    """End the lock of lock_run_dir (None: nothing held) and remove the lock file."""
    if handle is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(handle.name)
        handle.close()


# ---------------------------------------------------------------------------------------------
# Preemption

class StopSignal:
    """Records SIGTERM, SIGUSR1 (SLURM's warning signal) and a first SIGINT (Ctrl-C) instead of
    dying; a second SIGINT raises KeyboardInterrupt at once. The training loop asks `requested()`
    at every step boundary, and all ranks agree if any rank got a signal, so that all stop at the
    same step and save one checkpoint together. torch has no such agreement (torchrun forwards a
    signal to every rank, SLURM may send it to one, at different steps).

    With several processes the ranks agree through a small all_reduce on the CPU control group,
    started without waiting and read at the next call: no rank waits for the others inside a step,
    and a signal stops every rank one step after the check that sees it."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, env):
        self.env, self.name = env, None
        self._pending = None  # (work, flag tensor) of the all_reduce in flight
        self._before = {sig: signal.signal(sig, self._record) for sig in self.SIGNALS}

    def close(self):
        """Give the signals back to the handlers they had (a notebook or test that ran main())."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum, frame):
        if signum == signal.SIGINT and self.name == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.name = self.name or signal.Signals(signum).name

    def _start(self):
        flag = torch.tensor([signal.Signals[self.name].value if self.name else 0])
        self._pending = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.env.control, async_op=True), flag

    def _finish(self):
        """Waits for the all_reduce in flight: True if any rank had a signal when it started it."""
        (work, flag), self._pending = self._pending, None
        work.wait()
        number = int(flag.item())  # a CPU tensor: no device synchronisation
        if number:
            self.name = signal.Signals(number).name
        return bool(number)

    def requested(self, now=False):
        """Collective: every rank must call it at the same steps, with the same `now`. Decides on
        reduced values only (a signal that arrives meanwhile is seen at the next check). `now`
        decides at this very call (blocking): at the end of an epoch, before starting another.
        Afterwards `name` is the signal on every rank, whichever rank received it."""
        if self.env.world_size == 1:
            return self.name is not None
        if self._pending is not None and self._finish():
            return True
        self._start()
        return self._finish() if now else False


# ---------------------------------------------------------------------------------------------
# Non-finite steps

class NonFiniteWatch:
    """Counts bad (non-finite) steps on the device, without synchronising: `skipped` in all, and
    the first step at which `limit` bad steps came in a row. `tripped_at` reads it (collective)."""

    NEVER = 2 ** 62

    def __init__(self, limit, device):
        self.limit = limit
        self.consecutive = torch.zeros((), dtype=torch.int64, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.trip = torch.full((), self.NEVER, dtype=torch.int64, device=device)

    def update(self, bad, step):
        """`bad`: a bool tensor for step number `step`."""
        self.consecutive.copy_(torch.where(bad, self.consecutive + 1, 0))
        self.skipped.add_(bad.long())
        tripped = (self.trip == self.NEVER) & (self.consecutive >= self.limit)
        self.trip.copy_(torch.where(tripped, step, self.trip))

    def tripped_at(self, env):
        """The first tripping step over all ranks, or None. Collective; synchronises."""
        trip = int(all_reduce(self.trip.clone(), env, op=dist.ReduceOp.MIN).item())
        return None if trip == self.NEVER else trip


# ---------------------------------------------------------------------------------------------
# Exponential moving average of the weights

class EMA:
    """ema = mu * ema + (1 - mu) * model for every floating-point parameter and buffer, with
    NVIDIA's warm-up of the decay: mu = min(decay, (1 + step) / (10 + step))."""

    def __init__(self, model, decay):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        # Aliases of the live tensors: the optimizer and load_state_dict update them in place.
        self._model = [t for t in model.state_dict().values() if t.is_floating_point()]
        self._ema = [t for t in self.module.state_dict().values() if t.is_floating_point()]

    @torch.no_grad()
    def update(self, step):
        mu = min(self.decay, (1.0 + step) / (10.0 + step))
        torch._foreach_lerp_(self._ema, self._model, 1.0 - mu)

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# TensorBoard (optional package)

class TensorBoard:
    """`--tensorboard`: the interval and epoch figures as scalars in OUTPUT_DIR/tensorboard, for
    rank 0 to write. Needs the optional tensorboard package (train.py checks for it at start)."""

    def __init__(self, folder):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(folder)

    def add(self, group, figures, step):
        """`figures` {name: number} as scalars `group/name` at `step`; non-numbers are skipped."""
        for name, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{name}", value, step)
        self.writer.flush()

