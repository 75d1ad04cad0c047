"""Small pieces train.py builds on: torchrun set-up, checkpoint files, RNG state, signals, EMA."""
import contextlib
import copy
import fcntl
import inspect
import json
import os
import random
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


# ---------------------------------------------------------------------------------------------
# Distributed

@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    control: object = None  # a gloo group for CPU-side agreement (stop signals), None when alone

    @property
    def main(self):
        return self.rank == 0


def init_distributed():
    """torchrun's environment -> Dist. Plain `python train.py` is world size 1, no process group.
    NCCL on CUDA, gloo on CPU; one GPU per process (LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return Dist(device=device)
    cuda = device.type == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    # Stop flags are agreed on every step; a gloo group keeps that off the GPU stream (no sync).
    control = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    return Dist(rank, local_rank, world_size, device, control)


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


def barrier(env):
    if env.world_size > 1:
        dist.barrier()


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
    """Restore what rng_state saved; returns a note for the log when the CUDA state could not be
    restored as saved, else None."""
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda is None or device.type != "cuda":
        return None if cuda is None else "note: the checkpoint's CUDA random state is not used on the CPU"
    if isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda, device)
        return None
    # Checkpoints of earlier versions hold a list: the state of every GPU the process saw, by index.
    # The rank's own GPU was entry LOCAL_RANK when the GPUs per node are unchanged (or the only one).
    index = 0 if len(cuda) == 1 else device.index
    if index >= len(cuda):
        return (f"note: the checkpoint holds CUDA random states of {len(cuda)} GPUs, none for cuda:{device.index}; "
                f"its generator starts from the seed")
    torch.cuda.set_rng_state(cuda[index], device)
    if len(cuda) == 1:
        return None
    return (f"note: an older checkpoint with every GPU's random state: cuda:{device.index} takes entry {index}, "
            f"its own state only if the GPUs per node are as they were")


# ---------------------------------------------------------------------------------------------
# Checkpoint files

def _fsync_dir(folder):
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _replacing(path):
    """Yields a hidden temporary name beside `path` to write; when the block succeeds the file is
    renamed over `path` (atomic) and the folder fsynced, otherwise removed, `path` untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(folder)


def save_atomic(state, path):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at any
    moment leaves either the old file or the new one, never a partial one."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def copy_atomic(src, dst):
    """`dst` becomes the file `src` is now: a hard link (no copy) where the file system allows it."""
    with _replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def remove_stale_temporaries(folder):
    """Delete the temporary files of save_atomic / copy_atomic that a killed process left behind.
    Only call it while holding the folder's lock (no live writer then)."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp." in name:
            os.remove(os.path.join(folder, name))


def load_checkpoint(path):
    """torch.load with weights_only=True; a missing, truncated or foreign file raises UsageError."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle and torch errors alike mean: not a usable checkpoint
        raise UsageError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:120]}); resume from another one") from None
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


def write_jsonl(path, rows):
    """Rewrite `path` with one JSON object per line, atomically."""
    with _replacing(path) as tmp, open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


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


# ---------------------------------------------------------------------------------------------
# Preemption

class StopSignal:
    """Records SIGTERM / SIGUSR1 (SLURM's warning signal) instead of dying; the training loop asks
    `requested()` at every step boundary, and all ranks agree if any rank got a signal.

    With several processes the ranks agree through an all_reduce that is started without waiting
    and read some calls later, so no rank waits for the others in a step. It is read every
    `interval` calls: as many steps as take about `check_seconds` (the slowest rank's step time
    travels in the same all_reduce, so every rank computes the same interval), at most
    `max_interval`. A signal therefore stops all ranks at the same step, within about two
    intervals."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, env, check_seconds=1.0, max_interval=50):
        self.env, self.name = env, None
        self.check_seconds, self.max_interval = check_seconds, max_interval
        self._calls, self._due = 0, 1
        self._pending = None  # (work, [signal number, seconds per step]) of the all_reduce in flight
        self._started_at, self._started_time = 0, time.monotonic()
        for sig in self.SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum, frame):
        self.name = signal.Signals(signum).name

    def _start(self):
        now = time.monotonic()
        per_step = (now - self._started_time) / max(1, self._calls - self._started_at)
        flags = torch.tensor([signal.Signals[self.name].value if self.name else 0, per_step], dtype=torch.float64)
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.env.control, async_op=True)
        self._pending, self._started_at, self._started_time = (work, flags), self._calls, now

    def _finish(self):
        """Waits for the all_reduce in flight: True if any rank had a signal when it started it."""
        (work, flags), self._pending = self._pending, None
        work.wait()
        number, per_step = flags.tolist()  # a CPU tensor: no device synchronisation
        if number:
            self.name = signal.Signals(int(number)).name
            return True
        self._due = self._calls + min(self.max_interval, max(1, int(self.check_seconds / max(per_step, 1e-9))))
        return False

    def requested(self, now=False):
        """Collective: every rank must call it at the same steps, with the same `now`. Decides on
        reduced values only (a signal that arrives meanwhile is seen at a later check). `now`
        decides at this very call (blocking): at the end of an epoch, before starting another.
        Afterwards `name` is the signal on every rank, whichever rank received it."""
        if self.env.world_size == 1:
            return self.name is not None
        self._calls += 1
        if self._pending is not None and (now or self._calls >= self._due) and self._finish():
            return True
        if now:
            self._start()
            return self._finish()
        if self._pending is None:
            self._start()
        return False


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
    rank 0 to write. The package is optional; without it the flag is a usage error at start."""

    def __init__(self, folder):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard), "
                             "or leave the flag out") from None
        self.writer = SummaryWriter(folder)

    def add(self, group, figures, step):
        """`figures` {name: number} as scalars `group/name` at `step`; non-numbers are skipped."""
        for name, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{name}", value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()
