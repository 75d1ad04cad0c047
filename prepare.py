"""Prepare ImageNet before training: check every file decodes, sort the val images into class folders, pack shards."""
import argparse
import errno
import io
import os
import re
import signal
import sys
import warnings
from multiprocessing import Pool

from PIL import Image
from tqdm import tqdm

import data
import shards
import utils
from transforms import is_16_bit_gray
from utils import DataError


def core_count(text):
    """check --workers: 1 to this machine's cores (more only add processes that wait)."""
    cores = os.cpu_count() or 1
    if not re.fullmatch(r"-?[0-9]+", text) or not 1 <= int(text) <= cores:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 to {cores} (this machine's cores)")
    return int(text)


def check_writable(path, what):
    """Refuse, before any work, a destination this process may not write in (or create)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise DataError(f"{what} {path} is a link to {os.readlink(path)}, which does not exist")
    existing = utils.existing_parent(path)
    if not os.path.isdir(existing):
        raise DataError(f"{what} {path}: {existing} is a file, not a folder; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{what} {path}: no permission to write in {existing} (or it is read-only); give a "
                        f"folder you can write to")


# python prepare.py check DATA
def conversion(mode):
    """What load_rgb does to an image of PIL `mode` that is not RGB, in words."""
    return {"L": "grayscale, copied to R, G and B", "1": "black and white, copied to R, G and B",
            "P": "palette colours", "CMYK": "CMYK, converted to RGB", "F": "float grayscale, clipped to 0..255",
            "RGBA": "alpha dropped", "LA": "grayscale, alpha dropped", "PA": "palette colours, alpha dropped",
            "I": "integer grayscale, scaled from 16 to 8 bits (above 65535: white)",
            }.get(mode, "16-bit grayscale, scaled to 8 bits" if is_16_bit_gray(mode) else "converted to RGB")


def _inspect(path, encoded=None, shown=None):
    """(shown or path, problem or None, odd format or None) of a file (or its bytes), fully decoded."""
    try:
        with Image.open(path if encoded is None else io.BytesIO(encoded)) as img:
            fmt, mode, frames = img.format, img.mode, getattr(img, "n_frames", 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
                transparent = "transparency" in img.info
    except Exception as e:  # every failure is a finding here, whatever its type
        return shown or path, f"{type(e).__name__}: {e}", None
    ext = os.path.splitext(path)[1].lower()
    odd = []
    if mode != "RGB":
        alpha = ", alpha dropped" if transparent and mode not in ("RGBA", "LA", "PA") else ""
        odd.append(f"mode {mode}, {conversion(mode)}{alpha}")
    if frames > 1:
        odd.append(f"{frames} frames, the first one used")
    if ext in (".jpg", ".jpeg") and fmt != "JPEG":
        odd.append(f"{fmt} file named {ext}")
    return shown or path, None, "; ".join(odd) or None


_CHECKED = {}  # split -> shards.ShardReader, in each process of `check` on a pack


def _start_worker(readers):  # check's pool
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to report
    _CHECKED.update(readers)


def _inspect_packed(job):
    """_inspect of a pack's sample, checked against its two tar headers and its label: one positioned read."""
    split, i = job
    reader = _CHECKED[split]
    name, label, shard = reader.names[i], reader.labels[i], int(reader.shard_of[i])
    (start, member, size), (cls_at, cls_member, cls_size) = shards.sample_headers(reader.names, reader.table, i)
    path = reader.paths[shard]
    shown = f"{name} in {path}"
    try:
        block = reader.read_span(shard, start, cls_at - start + 2 * shards.TAR_BLOCK, f"sample {name}")
    except DataError as e:
        return shown, str(e), None
    header, cls = shards.tar_header(block), shards.tar_header(block[cls_at - start:])
    cls_text = block[cls_at - start + shards.TAR_BLOCK:][:cls[1]]
    if [header, cls, cls_text] != [(member, size), (cls_member, cls_size), str(label).encode()]:
        return shown, f"the shard holds {header[0]} ({header[1]} bytes), {cls[0]} = {cls_text[:10]!r} where the " \
                      f"index says {member} ({size} bytes) of label {label}: remove {path} and " \
                      f"{shards.repair(os.path.dirname(path))}", None  # the pack command rewrites a missing shard
    return _inspect(name, block[shards.TAR_BLOCK:shards.TAR_BLOCK + size], shown)


def list_files(root):
    """(image files, other entries) under `root`, following links; refused: a folder that cannot be
    listed, a link back up (os.walk would skip the one, loop in the other). FIFOs are not images."""
    def refuse(e):
        raise DataError(f"cannot list {e.filename}: {e.strerror}; check needs to read every folder under {root}")
    files = []
    for folder, folders, names in os.walk(root, onerror=refuse, followlinks=True):
        real = os.path.realpath(folder)
        for name in folders:
            target = os.path.realpath(os.path.join(folder, name))
            if (real + os.sep).startswith(target + os.sep):
                raise DataError(f"{os.path.join(folder, name)} links back to {target}, a loop: remove the link")
        files += [os.path.join(folder, name) for name in names]
    images = [p for p in files if data.is_image_name(os.path.basename(p)) and os.path.isfile(p)]
    return sorted(images), sorted(set(files) - set(images))


def check(root, workers):
    """Decode every image file under `root` (or every sample of the pack `root`); 1 if any is bad."""
    data.need(root, "DATA")
    readers, inspect = {}, _inspect
    if shards.looks_packed(root):
        index = shards.read_index(root)  # the pack is checked cheaply here, before the pool starts
        readers = {split: shards.ShardReader(root, split, index) for split in index["splits"]}
        jobs = [(split, i) for split, reader in readers.items() for i in range(len(reader))]
        skipped, inspect = [path for reader in readers.values() for path in reader.skipped_files], _inspect_packed
    else:
        jobs, skipped = list_files(root)
    if not jobs:
        raise DataError(f"no image files under {root} ({', '.join(data.IMG_EXTENSIONS)})")
    with Pool(workers, _start_worker, (readers,)) as pool:
        results = tqdm(pool.imap_unordered(inspect, jobs, chunksize=64), total=len(jobs), desc="decoding", unit="img",
                       disable=not sys.stderr.isatty())
        found = [(path, problem, oddity) for path, problem, oddity in results if problem or oddity]
    bad = [(path, problem) for path, problem, _ in found if problem]
    odd = [(path, oddity) for path, _, oddity in found if oddity]
    for path in skipped:
        print(f"not an image (training skips it): {path}")
    for path, oddity in sorted(odd):
        print(f"odd format (loads as RGB): {path}: {oddity}")
    for path, problem in sorted(bad):
        print(f"UNDECODABLE: {path}: {problem}")
    print(f"checked {len(jobs)} {'samples' if readers else 'files'}: {len(bad)} undecodable, {len(odd)} odd "
          f"formats; {len(skipped)} files skipped as not images")
    return 1 if bad else 0


# python prepare.py sort-val VAL --labels FILE
WNID = re.compile(r"n[0-9]{8}")  # a WordNet id: the only class names sort-val creates folders for
LABEL_FILES = "expected LOC_val_solution.csv, one wnid per line, or the devkit's ILSVRC2012_validation_ground_truth.txt"


def wnid_at(labels, n, text):  # the class on line n of `labels`: a folder name, never a path
    if not WNID.fullmatch(text):
        raise DataError(f"{labels} line {n}: class {text[:40]!r} is not a WordNet id (n and 8 digits, e.g. "
                        f"n01440764): sort-val makes a folder of each class, and takes no other names")
    return text


def read_kaggle_labels(labels, rows):
    """{image id: wnid} from LOC_val_solution.csv's rows [(line number, 'id,wnid x y x y ...')]."""
    labelled, line_of = {}, {}
    for n, text in rows:
        image_id, comma, prediction = text.partition(",")
        image_id, tokens = image_id.strip(), prediction.split()
        if not comma or not image_id or not tokens:
            raise DataError(f"{labels} line {n}: {text[:40]!r} is not 'ImageId,PredictionString' (e.g. "
                            f"'ILSVRC2012_val_00000001,n01751748 50 40 300 200')")
        if image_id in labelled:
            raise DataError(f"{labels} line {n}: image {image_id} again (first on line {line_of[image_id]})")
        labelled[image_id], line_of[image_id] = wnid_at(labels, n, tokens[0]), n
    if not labelled:
        raise DataError(f"{labels} has a header but no labels")
    return labelled


def read_devkit_meta(meta):
    """{ILSVRC2012_ID: wnid} of the devkit's meta.mat (torchvision's reader wants the whole archive)."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading the devkit's meta.mat needs scipy (pip install scipy), or use Kaggle's "
                        "LOC_val_solution.csv instead") from None
    data.need(meta, "--meta", "file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            synsets = loadmat(meta, squeeze_me=True)["synsets"]
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except OSError:
        raise
    except Exception as e:  # scipy's many ways to refuse a file that is not the devkit's
        raise DataError(f"{meta} is not the devkit's meta.mat ({type(e).__name__}: {e}); "
                        f"pass DEVKIT/data/meta.mat") from None
    bad = [w for w in wnid_of.values() if not WNID.fullmatch(w)]
    if not wnid_of or bad:
        problem = f"{bad[0][:40]!r} is not a WordNet id" if bad else "no leaf synsets"
        raise DataError(f"{meta} is not the devkit's meta.mat: {problem}; pass DEVKIT/data/meta.mat")
    return wnid_of


def read_val_labels(labels, meta=None):
    """{image id: wnid} from Kaggle's LOC_val_solution.csv, or [wnid] in file-name order from a file of one
    wnid a line or the devkit's ground truth (ILSVRC2012_IDs, mapped by its meta.mat); all of it checked."""
    data.need(labels, "--labels", "file")
    lines = data.read_label_lines(labels, LABEL_FILES)
    kaggle = lines[0][1].replace(" ", "").lower().startswith("imageid,predictionstring")
    if meta is not None and (kaggle or WNID.fullmatch(lines[0][1])):
        raise DataError(f"--meta maps the devkit's ILSVRC2012_IDs, and {labels} names the classes itself: leave "
                        f"--meta out")
    if kaggle:
        return read_kaggle_labels(labels, lines[1:])
    if WNID.fullmatch(lines[0][1]):
        return [wnid_at(labels, n, text) for n, text in lines]
    if not re.fullmatch(r"[0-9]+", lines[0][1]):
        raise DataError(f"{labels} is not a val label file (line {lines[0][0]}: {lines[0][1][:40]!r}): {LABEL_FILES}")
    for n, text in lines:  # the devkit's ground truth: ILSVRC2012_IDs
        if not re.fullmatch(r"[0-9]+", text):
            raise DataError(f"{labels} line {n}: {text[:40]!r} is not an ILSVRC2012_ID (a number, 1 to 1000)")
    if meta is None:
        raise DataError(f"{labels} holds ILSVRC2012_IDs, whose order is not the wnids' order: add --meta "
                        f"DEVKIT/data/meta.mat to map them")
    wnid_of = read_devkit_meta(meta)
    for n, text in lines:
        if int(text) not in wnid_of:
            raise DataError(f"{labels} line {n} has ILSVRC2012_ID {int(text)}, which {meta} does not list as a class")
    return [wnid_of[int(text)] for _, text in lines]


def val_classes(val_dir, labels, labelled, loose, placed):
    """{image file name: wnid} of every image, loose or placed; refused unless each has one label."""
    if isinstance(labelled, list):  # in file-name order: pair with every image, loose or sorted
        names = sorted(set(loose) | set(placed))
        if len(names) != len(labelled):
            raise DataError(f"{labels} labels {len(labelled)} images but {val_dir} holds {len(names)}: "
                            f"is it the label file of this val set?")
        return dict(zip(names, labelled))
    ids = {}  # keyed by image id: the file name without its extension
    for name in sorted(set(loose) | set(placed)):
        other = ids.setdefault(os.path.splitext(name)[0], name)
        if other != name:
            raise DataError(f"{val_dir} holds {other} and {name}, two images of one id in {labels}: remove one")
    unknown, missing = sorted(set(ids) - set(labelled)), sorted(set(labelled) - set(ids))
    if unknown or missing:
        raise DataError(f"{labels} and {val_dir} disagree: {len(missing)} labelled images missing "
                        f"(e.g. {', '.join(missing[:2]) or '-'}), {len(unknown)} images without a label "
                        f"(e.g. {', '.join(unknown[:2]) or '-'})")
    return {ids[i]: wnid for i, wnid in labelled.items()}


def sort_val(val_dir, labels, meta=None, out=None):
    """Move (or link into `out`) the loose val images into <wnid>/ folders, once every image has a label."""
    data.need(val_dir, "val folder")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"--out {out} is a file, not a folder: give a new or sorted folder")
    out = val_dir if out is None or (os.path.isdir(out) and os.path.samefile(out, val_dir)) else out
    labelled = read_val_labels(labels, meta)
    loose = sorted(e.name for e in os.scandir(val_dir) if e.is_file() and data.is_image_name(e.name))
    placed = {e.name: c.name for c in os.scandir(out) if c.is_dir()
              for e in os.scandir(c.path) if e.is_file() and data.is_image_name(e.name)} if os.path.isdir(out) else {}
    labelled = val_classes(val_dir, labels, labelled, loose, placed)
    wrong = [f"{name} in {placed[name]}/" for name in placed if labelled[name] != placed[name]]
    if wrong:
        raise DataError(f"{len(wrong)} images sit in another class folder than {labels} says "
                        f"(e.g. {wrong[0]}): was the folder sorted with another label file?")
    todo = [name for name in loose if name not in placed]
    check_writable(out, "--out" if out != val_dir else "val folder")
    verb, done = "moved" if out == val_dir else "linked", 0
    try:
        for done, name in enumerate(todo):  # `done`: the images moved before this one
            os.makedirs(os.path.join(out, labelled[name]), exist_ok=True)
            src, dst = os.path.join(val_dir, name), os.path.join(out, labelled[name], name)
            (os.replace if out == val_dir else os.link)(src, dst)  # a link: no copy of 6 GB
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"sort-val stopped: {verb} {done} of {len(todo)} images into class folders of "
                                f"{out}; the same command finishes it") from None
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        raise DataError(f"--out {out} is on another file system than {val_dir}: hard links cannot cross it; "
                        f"give an --out beside {val_dir}, or leave --out out to move within it") from None
    print(f"{verb} {len(todo)} images into class folders of {out}; {len(placed)} were already in place")
    return 0


# python prepare.py pack DATA OUT
def parse_size(text):
    """'1GB', '500MB', '64KiB', '1000000' -> bytes (kB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)\s*([kKMGT]i?B|B)?", text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1GB, 500MB, 256MiB)")
    unit = (match[2] or "B").upper()
    return max(1, int(float(match[1]) * (1024 if "I" in unit else 1000) ** "BKMGT".index(unit[0])))


def pack_command(root, out, shard_size):
    data.need(root, "DATA")
    if shards.looks_packed(root):
        raise DataError(f"{root} is a pack already: train and evaluate with --data {root}")
    listed = {split: data.ImageFolder(os.path.join(root, split), None)
              for split in ("train", "val") if os.path.isdir(os.path.join(root, split))}
    if not listed:
        raise DataError(f"{root} has neither train/ nor val/ to pack (expected DATA/train/<class>/*.JPEG "
                        f"and DATA/val/<class>/*.JPEG)")
    if len(listed) == 2:
        data.check_same_classes(root, listed["train"], listed["val"])
    check_writable(out, "OUT")
    inside = [f.root for f in listed.values() if os.path.abspath(out).startswith(os.path.abspath(f.root) + os.sep)]
    if inside:
        raise DataError(f"OUT {out} is inside {inside[0]}, which is packed: give a folder outside it")
    counts, already = shards.pack(root, out, listed, shard_size)
    done = ", ".join(f"{images} {split} images in {n} shards" for split, (images, n) in counts.items())
    note = data.skipped_note(*listed.values())
    print(f"{out} already holds this pack: {done}" if already else
          f"packed {done} into {out}; train and evaluate with --data {out}" + (f"\n{note}" if note else ""))
    return 0


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every other refusal
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parse_args(argv):
    parser = Parser(prog="python prepare.py", description="Prepare ImageNet for train.py.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("check", help="decode every image under DATA (or a pack's every sample): list the bad "
                                          "(exit 1) and odd ones")
    p.add_argument("data", help="the ImageNet root, any folder of images, or a pack")
    p.add_argument("--workers", type=core_count, default=os.cpu_count() or 1,
                   help=f"decoding processes, 1 to this machine's cores (default: all, {os.cpu_count()} here)")
    p = commands.add_parser("sort-val", help="sort the 50,000 loose val images into VAL/<wnid>/ folders")
    p.add_argument("val", help="the folder of the val images (ILSVRC2012_val_*.JPEG)")
    p.add_argument("--labels", required=True, help="LOC_val_solution.csv, a file of one wnid a line, or the "
                                                   "devkit's ILSVRC2012_validation_ground_truth.txt (with --meta)")
    p.add_argument("--meta", help="the devkit's data/meta.mat (needs scipy)")
    p.add_argument("--out", help="hard-link into OUT/<wnid>/, VAL left as it is (default: move within VAL)")
    p = commands.add_parser("pack", help="DATA's train and val as tar shards, for --data OUT; run again, it "
                                         "continues or repairs")
    p.add_argument("data", help="the ImageNet root (DATA/train/<class>/*, DATA/val/<class>/*)")
    p.add_argument("out", help="a new or empty folder, or one holding this pack (unfinished or damaged)")
    p.add_argument("--shard-size", type=parse_size, default=shards.DEFAULT_SHARD_SIZE, metavar="SIZE",
                   help="most bytes a shard holds (one sample at least), e.g. 1GB (the default), 500MB, 256MiB")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "check":
            return check(args.data, args.workers)
        if args.command == "pack":
            return pack_command(args.data, args.out, args.shard_size)
        return sort_val(args.val, args.labels, args.meta, args.out)
    except KeyboardInterrupt as e:  # what was kept, and the next step
        print("error: " + (str(e) or {
            "check": "check stopped; nothing was written: run the same command again",
            "sort-val": "sort-val stopped before moving any image: run the same command again",
            "pack": f"packing stopped; the same command continues it (finished shards in {getattr(args, 'out', '')} "
                    f"are kept)",
        }[args.command]), file=sys.stderr)
        return 130
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except utils.DiskFull as e:  # packing: the shard being written is removed, the finished ones kept
        print(f"error: {e}; free space and run the same command to continue", file=sys.stderr)
        return 5


if __name__ == "__main__":
    sys.exit(main())
