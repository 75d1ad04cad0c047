"""Packed shards: the writer behind `python prepare.py pack` and the reader behind `--data PACK`.

PACK/<split>-000000.tar, ...: WebDataset's layout (<key>.jpg, ... the file's bytes, then <key>.cls);
PACK/<split>.npy: each sample's shard, offset, size, label; PACK/index.json (written last): classes,
shards, names, the .npy's checksum; PACK/pack.json: the source and --shard-size. Sample i is one
os.pread. Not webdataset (streams: no exact sampler order or resume) nor wids (scans every header).
"""
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
TAR_BLOCK = 512
MAX_OPEN_SHARDS = 256  # per process; the one opened first is closed to open another
READ_AHEAD = 64  # files read at once, by as many threads, while packing (a network file system's latency)
DEFAULT_SHARD_SIZE = 10 ** 9


def looks_packed(folder):
    """Whether `folder` holds a pack, whole or not (its index, head, a table or a first shard)."""
    names = (PACK_INDEX, PACK_HEAD, "train.npy", "val.npy", "train-000000.tar", "val-000000.tar")
    return any(os.path.exists(os.path.join(folder, name)) for name in names)


def read_json(pack, name):
    """The pack's index or head, checked to be one; None when missing."""
    path = os.path.join(pack, name)
    try:
        with open(path) as f:
            held = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"the pack file {path} is damaged ({e}): {repair(pack)}") from None
    if not isinstance(held, dict) or held.get("format") != PACK_FORMAT:
        raise DataError(f"{path} is not a {PACK_FORMAT} pack's: {repair(pack)}")
    return held


def read_index(pack):
    """The index of `pack`, or DataError naming what is missing or damaged and the repair."""
    index = read_json(pack, PACK_INDEX)
    if index is None:
        raise DataError(f"the pack index {os.path.join(pack, PACK_INDEX)} is missing (or the packing did not "
                        f"finish): {repair(pack)}")
    return index


def repair(pack, head=None):
    """The advice for a damaged pack: the command that rewrites what is missing or damaged."""
    with contextlib.suppress(DataError, OSError):
        head = head or read_json(pack, PACK_HEAD) or read_json(pack, PACK_INDEX)
    source = head["source"] if head else "DATA"
    size = f" --shard-size {head['shard_size']}" if head and head["shard_size"] != DEFAULT_SHARD_SIZE else ""
    given = "" if head else " (DATA: the folder it was packed from)"
    return f"repair it with python prepare.py pack {source} {pack}{size}{given} (it rewrites what is damaged)"


def member_name(index, name, label=None):
    """The tar name of sample `index`: <key>.jpg/.png/... or <key>.cls, the key without dots
    (WebDataset's key ends at the first one): the index, then the file's stem."""
    stem, ext = os.path.splitext(os.path.basename(name))
    key = f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[:60]}"
    if label is not None:
        return key + ".cls"
    return key + (".jpg" if ext.lower() in (".jpg", ".jpeg") else ext.lower())


def tar_header(block):
    """A tar header block -> (name, size); tarfile.HeaderError when it is none."""
    info = tarfile.TarInfo.frombuf(block[:TAR_BLOCK], "utf-8", "surrogateescape")
    return info.name, info.size


def shard_problem(path, expected_bytes, headers):
    """What is wrong with shard `path` (missing, cut, renamed, exchanged), or None, cheaply: its size and
    the tar `headers` [(offset, name, size)] of its first and last member."""
    try:
        with open(path, "rb", buffering=0) as f:  # unbuffered: a block read is a block read
            size, held = os.fstat(f.fileno()).st_size, []
            for offset, _, _ in headers if size == expected_bytes else ():
                f.seek(offset)
                with contextlib.suppress(tarfile.HeaderError):
                    held.append(tar_header(f.read(TAR_BLOCK)))
    except FileNotFoundError:
        return f"shard {path} is missing"
    if size != expected_bytes:
        return f"shard {path} is {size:,} bytes, the index says {expected_bytes:,}"
    if held != [(name, size) for _, name, size in headers]:
        return f"shard {path} does not hold {headers[0][1]} to {headers[-1][1]}, as the pack has it there: a shard " \
               f"renamed or exchanged"
    return None


def shard_headers(names, table, count):
    """[(offset, member name, size) of the first and the last tar header] of each of a split's `count` shards."""
    starts = np.searchsorted(table["shard"], np.arange(count + 1)).tolist()
    headers = []
    for first, last in zip(starts[:-1], [end - 1 for end in starts[1:]]):
        label, size = int(table["label"][last]), int(table["size"][last])
        cls_offset = int(table["offset"][last]) + -(-size // TAR_BLOCK) * TAR_BLOCK
        headers.append([(0, member_name(first, names[first]), int(table["size"][first])),
                        (cls_offset, member_name(last, names[last], label), len(str(label)))])
    return headers


def read_table(pack, split, entry):
    """PACK/<split>.npy, the one the index lists (its checksum) -> the table, or what is wrong (str)."""
    path = os.path.join(pack, f"{split}.npy")
    try:
        with open(path, "rb") as f:
            content = f.read()
    except FileNotFoundError:
        return f"{path} is missing"
    if hashlib.sha256(content).hexdigest() != entry.get("table_sha256"):  # none: an earlier version's pack
        return f"{path} is not the table the index lists (another checksum)"
    return np.load(io.BytesIO(content))


class ShardReader:
    """One split of a pack, checked at open: `names`, `labels`, `classes`, `skipped_files` of the
    folders it was packed from. read(i) is one os.pread, each shard opened once per process."""

    def __init__(self, pack, split, index=None):
        index = index or read_index(pack)
        if split not in index["splits"]:
            raise DataError(f"the pack {pack} has no {split} set ({index['source']} had no {split}/ when it was "
                            f"packed): pack a DATA that has {split}/")
        entry = index["splits"][split]
        self.classes, self.skipped_files, self.names = entry["classes"], entry["skipped_files"], entry["names"]
        self.paths = [os.path.join(pack, name) for name in entry["shards"]]
        table = read_table(pack, split, entry)
        problem = table if isinstance(table, str) else next(filter(None, map(  # the first, cheaply
            shard_problem, self.paths, entry["shard_bytes"], shard_headers(self.names, table, len(self.paths)))), None)
        if problem:
            raise DataError(f"{problem}: {repair(pack, index)}")
        self.shard_of, self.offsets, self.sizes = table["shard"], table["offset"], table["size"]
        self.labels = table["label"].tolist()
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


# ---------------------------------------------------------------------------------------------
# The writer

def tar_member_bytes(size):
    """Bytes of one file in a tar: its 512-byte header, then its data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(members_end):
    """A tar file's size: its members, two zero blocks, padded to whole records (as tarfile ends it)."""
    return -(-(members_end + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def plan_split(folder, shard_size):
    """Where each sample of `folder` (listed class folders) goes: its shard, offset; each shard's size."""
    names = [os.path.relpath(path, folder.root) for path, _ in folder.samples]
    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:  # a network file system's latency
        stats = list(pool.map(os.stat, [path for path, _ in folder.samples]))
    shard_of, offsets, shard_bytes, pos = [], [], [], 0
    for (_, label), st in zip(folder.samples, stats):
        need = tar_member_bytes(st.st_size) + tar_member_bytes(len(str(label)))
        if pos and tar_file_bytes(pos + need) > shard_size:
            shard_bytes.append(tar_file_bytes(pos))
            pos = 0
        shard_of.append(len(shard_bytes))
        offsets.append(pos + TAR_BLOCK)
        pos += need
    shard_bytes.append(tar_file_bytes(pos))
    table = np.zeros(len(names), TABLE)
    table["shard"], table["offset"], table["size"] = shard_of, offsets, [st.st_size for st in stats]
    table["label"] = [label for _, label in folder.samples]
    return {"classes": folder.classes, "names": names, "sources": [path for path, _ in folder.samples],
            "mtimes": [st.st_mtime_ns for st in stats], "table": table, "shard_bytes": shard_bytes,
            "skipped_files": folder.skipped_files}


def pack_plan(listed, shard_size):
    """A plan per split of `listed` and its identity: a hash of each sample's name, label, size and
    modification time, and of the shard size."""
    plans = {split: plan_split(folder, shard_size) for split, folder in listed.items()}
    what = [PACK_FORMAT, shard_size] + [[split, p["classes"], p["names"], p["table"]["label"].tolist(),
                                         p["table"]["size"].tolist(), p["mtimes"]] for split, p in plans.items()]
    return plans, hashlib.sha256(json.dumps(what).encode()).hexdigest()


def shard_names(split, plan):
    return [f"{split}-{n:06d}.tar" for n in range(len(plan["shard_bytes"]))]


def write_shard(path, plan, members):
    """Shard `path` of samples `members`, atomically (a shard that exists is whole), as planned."""
    table = plan["table"]

    def write(tmp):
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar, \
                concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:
            for start in range(0, len(members), READ_AHEAD):
                chunk = members[start:start + READ_AHEAD]
                for i, encoded in zip(chunk, pool.map(utils.read_file, [plan["sources"][i] for i in chunk])):
                    if len(encoded) != table["size"][i]:
                        raise DataError(f"{plan['sources'][i]} changed while packing: pack again into a new folder")
                    add_member(tar, member_name(i, plan["names"][i]), encoded)
                    if tar.offset - tar_member_bytes(len(encoded)) + TAR_BLOCK != table["offset"][i]:
                        raise RuntimeError(f"tarfile placed {plan['sources'][i]} elsewhere than planned in {path}")
                    label = int(table["label"][i])
                    add_member(tar, member_name(i, plan["names"][i], label), str(label).encode())
    utils.write_atomic(path, write, int(table["size"][members].sum()))


def add_member(tar, name, content):
    """A regular file in `tar`, with nothing of this machine in its header (same bytes every time)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(content), 0o644, 0
    tar.addfile(info, io.BytesIO(content))


def held_index(out, identity, plans):
    """OUT's index when it holds this pack (else None: empty, unfinished, damaged); a folder holding
    another pack, or other files, raises DataError."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out} is a file: give a new or empty folder to pack into")
    held = set(os.listdir(out)) if os.path.isdir(out) else set()
    ours = {PACK_INDEX, PACK_HEAD} | {f"{split}.npy" for split in plans}
    ours |= {name for split, plan in plans.items() for name in shard_names(split, plan)}
    found = {}
    for name in (PACK_INDEX, PACK_HEAD):
        with contextlib.suppress(DataError):  # damaged: rewritten, what it described checked file by file
            found[name] = read_json(out, name) if name in held else None
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
    return found.get(PACK_INDEX)


def pack(data, out, listed, shard_size=DEFAULT_SHARD_SIZE):
    """Pack `listed` ({split: class folders of DATA}) into OUT, continuing an unfinished packing and
    rewriting whatever is missing or damaged -> ({split: (images, shards)}, whether it was whole already)."""
    plans, identity = pack_plan(listed, shard_size)
    counts = {split: (len(p["names"]), len(p["shard_bytes"])) for split, p in plans.items()}
    head = {"format": PACK_FORMAT, "source": os.path.abspath(data), "shard_size": shard_size, "identity": identity}
    tables = {split: npy_bytes(plan["table"]) for split, plan in plans.items()}
    index = dict(head, splits={split: {
        "classes": plan["classes"], "shards": shard_names(split, plan), "names": plan["names"],
        "shard_bytes": plan["shard_bytes"], "skipped_files": plan["skipped_files"],
        "table_sha256": hashlib.sha256(tables[split]).hexdigest()} for split, plan in plans.items()})
    held = held_index(out, identity, plans)
    todo = shards_to_write(out, plans)
    if not todo and held == json.loads(json.dumps(index)) and \
            not any(isinstance(read_table(out, split, entry), str) for split, entry in index["splits"].items()):
        return counts, True
    os.makedirs(out, exist_ok=True)
    utils.write_text(os.path.join(out, PACK_HEAD), json.dumps(head))
    for plan, path, members in tqdm(todo, desc="packing", unit="shard", disable=not sys.stderr.isatty()):
        write_shard(path, plan, members)
    for split, content in tables.items():
        utils.write_atomic(os.path.join(out, f"{split}.npy"), lambda tmp, b=content: pathlib.Path(tmp).write_bytes(b))
    utils.write_text(os.path.join(out, PACK_INDEX), json.dumps(index))
    return counts, False


def npy_bytes(table):
    out = io.BytesIO()
    np.save(out, table)
    return out.getvalue()


def shards_to_write(out, plans):
    """[(plan, shard path, its sample indices)] of the shards OUT lacks or holds damaged (shard_problem)."""
    todo = []
    for split, plan in plans.items():
        table, count = plan["table"], len(plan["shard_bytes"])
        members = np.split(np.arange(len(table)), np.searchsorted(table["shard"], np.arange(1, count)))
        for name, expected, indices, headers in zip(shard_names(split, plan), plan["shard_bytes"], members,
                                                    shard_headers(plan["names"], table, count)):
            if shard_problem(os.path.join(out, name), expected, headers):
                todo.append((plan, os.path.join(out, name), indices.tolist()))
    return todo
