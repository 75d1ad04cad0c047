"""What every module builds on: its errors, collectives, checkpoint files, RNG state, signals, EMA."""
import contextlib
import copy
import errno
import fcntl
import inspect
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """Bad command-line input: train.py prints the message on one line and exits with code 2."""


class DiskFull(Exception):
    """A file of the run did not fit on its disk (the previous version of it is kept)."""


class DataError(Exception):
    """A problem with the data itself (layout or file); the message names it and the fix."""


# Collectives: `env` is launch.Dist (or anything with its world_size and device)

def all_reduce(tensor, env, op=dist.ReduceOp.SUM):
    if env.world_size > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def broadcast_object(obj, env):
    box = [obj]
    if env.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, env):
    out = [obj] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(module, env):
    """Rank 0's BatchNorm statistics on every rank (each follows its own batches): all evaluate and save one model."""
    if env.world_size > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def data_parallel(model, env):
    """DDP, gradients in its all-reduce buckets (no gradient-sized copy), without its broadcast of BatchNorm
    buffers before every forward: only evaluation uses running statistics, after broadcast_buffers()."""
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch 2.13 renamed the switch (and deprecated the old name); with both, buffers start equal.
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                      else {"broadcast_buffers": False})
    return ddp(model, device_ids=[env.device] if env.device.type == "cuda" else None,
               gradient_as_bucket_view=True, **no_buffer_sync)


def write_on_main(env, write, *args):
    """Collective: rank 0 calls `write(*args)`, which writes a file of the run; a full disk there
    raises DiskFull on every rank, so that all stop together. Doubles as a barrier: nobody exits
    (and so gets the others killed by torchrun) before the write."""
    problem = None
    if env.main:
        try:
            write(*args)
        except DiskFull as e:
            problem = str(e)
    problem = broadcast_object(problem, env)
    if problem:
        raise DiskFull(problem)


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


# Files. torch.save writes in place (a crash or a full disk mid-write leaves a truncated last.pt),
# and torch.distributed.checkpoint writes a folder of shards that torch.load cannot read and a
# pasted efficientnet.py cannot use; so a temporary file, fsync and rename, here.

def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
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


def write_atomic(path, write, size=0):
    """`write(tmp)` writes the file under a hidden name beside `path`: a crash leaves the old file or the new one, an
    exception the old one and no temporary; a full disk raises DiskFull naming the space needed (`size`)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, Exception) and _out_of_space(e):
            raise DiskFull(f"no space left in {folder} for {os.path.basename(path)}: it needs about "
                           f"{_megabytes(size)}, {_megabytes(shutil.disk_usage(folder).free)} are free") from None
        raise
    _fsync(folder)


def tensor_bytes(obj):
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return obj.nbytes if isinstance(obj, torch.Tensor) else 0


def save_atomic(state, path):
    def save(tmp):
        with open(tmp, "wb") as f:  # a file object: a full disk comes up as its OSError (see _out_of_space)
            torch.save(state, f)
    write_atomic(path, save, tensor_bytes(state))


def copy_atomic(src, dst):
    """`dst` becomes the file `src` is now: a hard link (no copy) where the file system allows it."""
    def link_or_copy(tmp):
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    write_atomic(dst, link_or_copy, os.path.getsize(src))


def write_text(path, text):
    write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text), len(text.encode()))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def write_jsonl(path, rows):
    write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def remove_stale_temporaries(folder):
    """Delete what write_atomic left of killed processes; only while holding the folder's lock (no live writer)."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp." in name:
            os.remove(os.path.join(folder, name))


def existing_parent(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def lock_run_dir(folder):
    """Hold an exclusive lock on `folder` for this process's life; UsageError naming the run that holds it."""
    handle = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"{folder} is in use by a running run ({owner}); wait for it to end or "
                         f"choose another --output-dir") from None
    handle.truncate(0)  # "a+": the write goes to the end, now 0
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle


def unlock_run_dir(handle):
    if handle is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(handle.name)
        handle.close()


READ_ATTEMPTS = 4  # a network file system's transient errors (EIO, ESTALE, timeouts) get 3 more tries
READ_BACKOFF_SECONDS = 0.05  # doubled after each failed try: 0.05 + 0.1 + 0.2 s at most


def read_retrying(read, what, fix, retries=None):
    """read()'s bytes, tried READ_ATTEMPTS times. `retries`: a multiprocessing.Value counting the retries of all
    loader workers (torch's DataLoader passes nothing else back from them)."""
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
    def read():
        with open(path, "rb") as f:
            return f.read()
    return read_retrying(read, f"image {path}", "check the file system, or remove the file", retries)


def load_checkpoint(path, what="checkpoint", advice="resume from another one"):
    """The dict in a torch.save file; a missing, truncated or foreign file raises UsageError."""
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
        raise UsageError(f"{what} {path} holds a {type(state).__name__}, not a checkpoint or state dict; {advice}")
    return state


def newest_good_checkpoint(folder, names=("last.pt", "best.pt")):
    """(path, state, skipped) of the newest training checkpoint in `folder` that loads, `skipped`
    saying why the newer ones did not; (None, None, skipped) when there is none."""
    candidates = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    skipped = []
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        try:
            state = load_checkpoint(path)
        except UsageError as e:
            skipped.append(str(e))
            continue
        if "model" in state and "epoch" in state:
            return path, state, skipped
        skipped.append(f"{path} holds no training state")
    return None, None, skipped


# The commands after training (predict.py, average.py, export.py): their outputs and errors

def same_file(a, b):
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
    if is_run and re.fullmatch(r"last\.pt|best\.pt|best-epoch\d+\.pt|args\.json|metrics\.jsonl", name):
        raise UsageError(f"{flag_name} {output} is a file of the run in {folder}, which needs it to resume; "
                         f"write elsewhere, e.g. {flag_name} {elsewhere}")


def check_writable(path, flag_name="--output"):
    """UsageError unless a command can write the file `path`, before any work."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or (os.path.islink(path) and not os.path.exists(path)):
        problem = "is a folder" if os.path.isdir(path) else "is a broken link"
    elif not os.path.isdir(folder):
        problem = f"is in {folder}, which is {'a file' if os.path.exists(folder) else 'not there'}"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"is in {folder}, where this process may not write"
    else:
        return
    raise UsageError(f"{flag_name} {path} {problem}: name a file in a folder you can write")


@contextlib.contextmanager
def writing(path):
    """Around the write of a command's output: an OSError other than a full disk (a read-only file
    system, a permission taken away since check_writable) becomes a UsageError naming `path`."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"cannot write {path} ({e.strerror or e}): write it elsewhere") from None


def run_command(work, output):
    """work()'s exit code, for predict.py, average.py, export.py, whose result is `output` (None: stdout).
    What stops it is one line on stderr; its writes are atomic: an error or Ctrl-C leaves `output` as it was."""
    try:
        code = work()
        sys.stdout.flush()  # here, where a reader that left is caught
        return code
    except (UsageError, DataError) as e:
        line, code = str(e), 2
    except BrokenPipeError:  # stdout's reader left (e.g. | head): stop without a word, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python exits
        return 141  # 128 + SIGPIPE, what a shell reports for such a tool
    except OSError as e:  # an input that cannot be read
        line, code = f"cannot read {e.filename}: {e.strerror}" if e.filename else str(e), 2
    except DiskFull as e:
        line, code = f"{e}. Free space there, then run the same command again", 5
    except KeyboardInterrupt:
        kept = f"nothing written to {output}" if output else "the predictions on stdout stop early"
        line, code = f"interrupted: {kept}; run the same command again", 130
    print(f"error: {line}", file=sys.stderr)
    return code


# The training loop's helpers: preemption, non-finite steps, EMA, TensorBoard

class StopSignal:
    """Records SIGTERM, SIGUSR1 (SLURM's warning signal) and a first SIGINT (Ctrl-C) instead of dying;
    a second SIGINT raises KeyboardInterrupt at once. All ranks agree on a signal any rank got (torchrun
    forwards it to every rank, SLURM may send it to one, at different steps), so that all stop at the
    same step and save one checkpoint together: through a small all_reduce on the CPU control group,
    started without waiting and read at the next `requested()`, so no rank waits inside a step."""

    def __init__(self, env):
        self.env, self.name = env, None
        self._pending = None  # (work, flag tensor) of the all_reduce in flight
        self._before = {s: signal.signal(s, self._record) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def close(self):
        """Give the signals back to the handlers they had (a notebook or test that ran main())."""
        for sig, handler in self._before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def _record(self, signum, frame):
        if signum == signal.SIGINT and self.name == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.name = self.name or signal.Signals(signum).name

    def _finish(self):
        """Waits for the all_reduce in flight: True if any rank had a signal when it started it."""
        (work, flag), self._pending = self._pending, None
        work.wait()
        number = int(flag.item())  # a CPU tensor: no device synchronisation
        if number:
            self.name = signal.Signals(number).name
        return bool(number)

    def requested(self, now=False):
        """Collective: every rank calls it at the same steps, with the same `now`. True when any rank
        had a signal at the previous check (decided on reduced values only), or with `now` (blocking,
        at the end of an epoch) at this one. Afterwards `name` is the signal on every rank."""
        if self.env.world_size == 1:
            return self.name is not None
        if self._pending is not None and self._finish():
            return True
        flag = torch.tensor([signal.Signals[self.name].value if self.name else 0])
        self._pending = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.env.control, async_op=True), flag
        return self._finish() if now else False


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


class TensorBoard:
    """`--tensorboard`: the interval and epoch figures as scalars in OUTPUT_DIR/tensorboard, for
    rank 0 to write. Needs the optional tensorboard package (train.py checks for it at start)."""

    def __init__(self, folder):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(folder)

    def add(self, group, figures, step):
        for name, value in figures.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{group}/{name}", value, step)
        self.writer.flush()

