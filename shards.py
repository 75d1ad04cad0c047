"""Packed shards: the writer behind `python prepare.py pack` and the reader behind `--data PACK`.

PACK/<split>-000000.tar, ...: WebDataset's layout (<key>.jpg, ... the file's bytes, then <key>.cls);
PACK/<split>.npy: each sample's shard, offset, size, label; PACK/index.json: classes, shards, names, the .npy's sha256;
PACK/pack.json: the source and --shard-size. Sample i is one os.pread. Not webdataset (streams: no exact sampler order
or resume) nor wids (scans every header)."""
import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import pathlib
import re
import sys
import tarfile

import numpy as np
from tqdm import tqdm

import utils
from utils import DataError

PACK_FORMAT = "efficientnet-pack/1"
PACK_INDEX = "index.json"  # written last: a folder holding it is a complete pack
PACK_HEAD = "pack.json"  # written first and kept: the source and shard size, for the repair command
TABLE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i4")])
INDEX_KEYS = ("classes", "shards", "names", "shard_bytes", "skipped_files", "table_sha256")  # a split's
TAR_BLOCK = 512
MAX_OPEN_SHARDS = 256  # per process; the one opened first is closed to open another
READ_AHEAD = 64  # files read at once, by as many threads, while packing (a network file system's latency)
DEFAULT_SHARD_SIZE = 10 ** 9


def looks_packed(folder):
    """Whether `folder` holds a pack, whole or not (its index, head, a table or a first shard)."""
    names = (PACK_INDEX, PACK_HEAD, "train.npy", "val.npy", "train-000000.tar", "val-000000.tar")
    return any(os.path.exists(os.path.join(folder, name)) for name in names)


def read_json(pack, name, advise=True):
    """The pack's index or head, checked to be one; None when missing."""
    path = os.path.join(pack, name)
    try:
        held = json.loads(pathlib.Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problem = f"the pack file {path} is damaged ({e})"
    else:
        if isinstance(held, dict) and held.get("format") == PACK_FORMAT:
            return held
        problem = f"{path} is not a {PACK_FORMAT} pack's"
    raise DataError(f"{problem}: {repair(pack)}" if advise else problem)


def read_index(pack):
    index = read_json(pack, PACK_INDEX)
    if index is None:
        raise DataError(f"the pack index {os.path.join(pack, PACK_INDEX)} is missing (or the packing did not "
                        f"finish): {repair(pack)}")
    return index


def repair(pack, head=None):
    """The advice for a damaged pack: the command that rewrites what is missing or damaged."""
    with contextlib.suppress(DataError, OSError):  # advise=False: no advice from a damaged head
        head = head or read_json(pack, PACK_HEAD, False) or read_json(pack, PACK_INDEX, False)
    source = head["source"] if head else "DATA"
    size = f" --shard-size {head['shard_size']}" if head and head["shard_size"] != DEFAULT_SHARD_SIZE else ""
    given = "" if head else " (DATA: the folder it was packed from)"
    return f"repair it with python prepare.py pack {source} {pack}{size}{given} (it rewrites what is damaged)"


def member_name(index, name, label=None):
    """Sample `index`'s tar name (with `label`, its label's); no dots in the key, where WebDataset's key would end."""
    stem, ext = os.path.splitext(os.path.basename(name))
    ext = ".cls" if label is not None else {".jpeg": ".jpg"}.get(ext.lower(), ext.lower())
    return f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[:60]}{ext}"


def tar_member_bytes(size):
    """Bytes of one file in a tar: its 512-byte header, then its data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_header(block):
    """(name, size) of a tar header block; ('no tar header (why)', 0) when it is none."""
    try:
        info = tarfile.TarInfo.frombuf(block[:TAR_BLOCK], "utf-8", "surrogateescape")
    except tarfile.HeaderError as e:
        return f"no tar header ({e})", 0
    return info.name, info.size


def sample_headers(names, table, i):
    """[(offset, tar name, size)] of the tar headers of sample i, its file's and its label's."""
    offset, size, label = int(table["offset"][i]), int(table["size"][i]), int(table["label"][i])
    return [(offset - TAR_BLOCK, member_name(i, names[i]), size),
            (offset - TAR_BLOCK + tar_member_bytes(size), member_name(i, names[i], label), len(str(label)))]


def shard_problems(pack, entry, table):
    """(path, its samples, what is wrong with it or None) of each of a split's shards, found cheaply and
    lazily: its size, and the tar headers of its first and last member (missing, cut, renamed, exchanged)."""
    starts = np.searchsorted(table["shard"], np.arange(len(entry["shards"]) + 1)).tolist()
    for name, expected_bytes, first, end in zip(entry["shards"], entry["shard_bytes"], starts, starts[1:]):
        path, samples = os.path.join(pack, name), range(first, end)
        headers = [sample_headers(entry["names"], table, first)[0], sample_headers(entry["names"], table, end - 1)[1]]
        try:
            with open(path, "rb", buffering=0) as f:  # unbuffered: a block read is a block read
                size = os.fstat(f.fileno()).st_size
                held = [tar_header(os.pread(f.fileno(), TAR_BLOCK, at)) for at, _, _ in headers]
        except FileNotFoundError:
            yield path, samples, f"shard {path} is missing"
            continue
        if size != expected_bytes:
            yield path, samples, f"shard {path} is {size:,} bytes, the index says {expected_bytes:,}"
        elif held != [(member, member_size) for _, member, member_size in headers]:
            yield path, samples, f"shard {path} does not hold {headers[0][1]} to {headers[-1][1]}, as the pack " \
                                 f"has it there: a shard renamed or exchanged"
        else:
            yield path, samples, None


def read_table(pack, split, entry):
    """PACK/<split>.npy, the one the index lists (its checksum) -> the table, or what is wrong (str)."""
    path = os.path.join(pack, f"{split}.npy")
    try:
        content = pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        return f"{path} is missing"
    if hashlib.sha256(content).hexdigest() != entry.get("table_sha256"):  # none: an earlier version's pack
        return f"{path} is not the table the index lists (another checksum)"
    return np.load(io.BytesIO(content))


class ShardReader:
    """One split of a pack, checked at open: the packed folders' `names`, `labels`, `classes`, `skipped_files`."""

    def __init__(self, pack, split, index=None):
        index = index or read_index(pack)
        if split not in index["splits"]:
            raise DataError(f"the pack {pack} has no {split} set ({index['source']} had no {split}/ when it was "
                            f"packed): pack a DATA that has {split}/")
        entry = index["splits"][split]
        self.classes, self.skipped_files, self.names = entry["classes"], entry["skipped_files"], entry["names"]
        self.paths = [os.path.join(pack, name) for name in entry["shards"]]
        table = read_table(pack, split, entry)
        problem = table if isinstance(table, str) else \
            next((problem for _, _, problem in shard_problems(pack, entry, table) if problem), None)
        if problem:
            raise DataError(f"{problem}: {repair(pack, index)}")
        self.shard_of, self.offsets, self.sizes = table["shard"], table["offset"], table["size"]
        self.table, self.labels = table, table["label"].tolist()
        self.files = {}  # shard -> file descriptor, in this process

    def __len__(self):
        return len(self.names)

    def __getstate__(self):  # descriptors do not cross a spawn; each process opens its own
        return dict(self.__dict__, files={})

    def close(self):
        """Close the shards this process opened (the next read opens them again)."""
        while self.files:
            os.close(self.files.popitem()[1])

    def read_span(self, shard, offset, size, what, retries=None):
        """One os.pread, retried (utils.read_retrying) with the shard opened again (a stale handle)."""
        def read():
            try:
                if shard not in self.files:
                    if len(self.files) >= MAX_OPEN_SHARDS:  # small shards: stay far below the fd limit
                        os.close(self.files.pop(next(iter(self.files))))
                    self.files[shard] = os.open(self.paths[shard], os.O_RDONLY)
                content = os.pread(self.files[shard], size, offset)
            except OSError:
                with contextlib.suppress(KeyError, OSError):
                    os.close(self.files.pop(shard))
                raise
            if len(content) != size:
                raise DataError(f"shard {self.paths[shard]} ends inside {what}: "
                                f"{repair(os.path.dirname(self.paths[shard]))}")
            return content
        return utils.read_retrying(read, f"{what} in {self.paths[shard]}", "check the file system", retries)

    def read(self, index, retries=None):
        """(the bytes of sample `index`, the name messages give it)."""
        shard, name = int(self.shard_of[index]), self.names[index]
        encoded = self.read_span(shard, int(self.offsets[index]), int(self.sizes[index]), f"image {name}", retries)
        return encoded, f"{name} in {self.paths[shard]}"


# The writer
def tar_file_bytes(members_end):
    """A tar file's size: its members, two zero blocks, padded to whole records (as tarfile ends it)."""
    return -(-(members_end + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def plan_split(split, folder, shard_size):
    """The index entry of `folder` (listed class folders), its table (and as .npy bytes), its files and mtimes."""
    sources = [path for path, _ in folder.samples]
    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:  # a network file system's latency
        stats = list(pool.map(os.stat, sources))
    rows, shard_bytes, pos = [], [], 0  # rows of the table: (shard, offset, size, label)
    for (_, label), st in zip(folder.samples, stats):
        need = tar_member_bytes(st.st_size) + tar_member_bytes(len(str(label)))
        if pos and tar_file_bytes(pos + need) > shard_size:
            shard_bytes.append(tar_file_bytes(pos))
            pos = 0
        rows.append((len(shard_bytes), pos + TAR_BLOCK, st.st_size, label))
        pos += need
    shard_bytes.append(tar_file_bytes(pos))
    table, npy = np.array(rows, TABLE), io.BytesIO()
    np.save(npy, table)
    return {"classes": folder.classes, "shards": [f"{split}-{n:06d}.tar" for n in range(len(shard_bytes))],
            "names": [os.path.relpath(path, folder.root) for path in sources], "shard_bytes": shard_bytes,
            "skipped_files": folder.skipped_files, "table_sha256": hashlib.sha256(npy.getvalue()).hexdigest(),
            "table": table, "npy": npy.getvalue(), "sources": sources, "mtimes": [st.st_mtime_ns for st in stats]}


def write_shard(path, plan, members):
    """Shard `path` of samples `members`, atomically (a shard that exists is whole), as planned."""
    table, sources = plan["table"], plan["sources"]

    def write(tmp):
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar, \
                concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:
            for start in range(0, len(members), READ_AHEAD):
                chunk = members[start:start + READ_AHEAD]
                for i, encoded in zip(chunk, pool.map(utils.read_file, [sources[i] for i in chunk])):
                    (_, name, size), (label_at, label_name, _) = sample_headers(plan["names"], table, i)
                    if len(encoded) != size:
                        raise DataError(f"{sources[i]} changed while packing: pack again into a new folder")
                    add_member(tar, name, encoded)
                    if tar.offset != label_at:
                        raise RuntimeError(f"tarfile placed {sources[i]} elsewhere than planned in {path}")
                    add_member(tar, label_name, str(table["label"][i]).encode())
    utils.write_atomic(path, write, int(table["size"][members].sum()))


def add_member(tar, name, content):
    """A regular file in `tar`, with nothing of this machine in its header (same bytes every time)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(content), 0o644, 0
    tar.addfile(info, io.BytesIO(content))


def held_files(out, identity, plans):
    """{name: content or None if missing} of OUT's index and head, a damaged one left out; DataError if OUT
    holds another pack or files that are not this pack's."""
    held = set(os.listdir(out)) if os.path.isdir(out) else set()
    ours = {PACK_INDEX, PACK_HEAD} | {f"{split}.npy" for split in plans}
    ours |= {name for plan in plans.values() for name in plan["shards"]}
    found = {}
    for name in (PACK_INDEX, PACK_HEAD):
        with contextlib.suppress(DataError):  # damaged: rewritten, what it described checked file by file
            found[name] = read_json(out, name)
    other = next((f for f in found.values() if f and f.get("identity") != identity), None)
    if other:
        raise DataError(f"{out} holds the pack of other files or another --shard-size ({other.get('source')}, "
                        f"--shard-size {other.get('shard_size')}): give another folder, or remove {out}")
    stale = {name for name in held if name.startswith(".") and name[1:].split(".tmp.")[0] in ours}
    others = sorted(held - ours - stale)  # stale: what utils.write_atomic left of a killed packing
    if others:
        raise DataError(f"{out} holds files that are not this pack's ({', '.join(others[:3])}): "
                        f"give a new or empty folder to pack into")
    if stale:
        utils.remove_stale_temporaries(out)  # all of them ours, as just checked
    return found


def pack(data, out, listed, shard_size=DEFAULT_SHARD_SIZE):
    """Pack `listed` ({split: class folders of DATA}) into OUT, continuing an unfinished packing and
    rewriting whatever is missing or damaged -> ({split: (images, shards)}, whether it was whole already)."""
    plans = {split: plan_split(split, folder, shard_size) for split, folder in listed.items()}
    # The pack's identity: each sample's name, label, size and modification time, and the shard size.
    what = [PACK_FORMAT, shard_size] + [[split, p["classes"], p["names"], p["table"]["label"].tolist(),
                                         p["table"]["size"].tolist(), p["mtimes"]] for split, p in plans.items()]
    head = {"format": PACK_FORMAT, "source": os.path.abspath(data), "shard_size": shard_size,
            "identity": hashlib.sha256(json.dumps(what).encode()).hexdigest()}
    index = dict(head, splits={split: {key: plan[key] for key in INDEX_KEYS} for split, plan in plans.items()})
    held = held_files(out, head["identity"], plans)
    todo = [(plan, path, list(samples)) for plan in plans.values()  # the shards missing or damaged
            for path, samples, problem in shard_problems(out, plan, plan["table"]) if problem]
    counts = {split: (len(plan["names"]), len(plan["shards"])) for split, plan in plans.items()}
    if not todo and held == json.loads(json.dumps({PACK_INDEX: index, PACK_HEAD: head})) and \
            not any(isinstance(read_table(out, split, entry), str) for split, entry in index["splits"].items()):
        return counts, True
    os.makedirs(out, exist_ok=True)
    utils.write_text(os.path.join(out, PACK_HEAD), json.dumps(head))
    for plan, path, members in tqdm(todo, desc="packing", unit="shard", disable=not sys.stderr.isatty()):
        write_shard(path, plan, members)
    for split, plan in plans.items():
        utils.write_atomic(os.path.join(out, f"{split}.npy"), lambda tmp: pathlib.Path(tmp).write_bytes(plan["npy"]))
    utils.write_text(os.path.join(out, PACK_INDEX), json.dumps(index))
    return counts, False
