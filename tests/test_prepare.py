"""prepare.py: check, sort-val and pack as a user meets them: their findings, their refusals (one
line, exit 2) of hostile input, and Ctrl-C (exit 130, one line saying what was kept and what next)."""
import contextlib
import importlib.util
import io
import os
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
from PIL import Image

import data
import prepare
from conftest import ROOT, make_imagenet, photo


def run_prepare(*args):
    """prepare.py in this process: its exit code, stdout and stderr, as a subprocess's."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = prepare.main([str(a) for a in args])
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


# ------------------------------------------------------------------------------- check

@pytest.mark.quick
def test_check_command_lists_skipped_files_and_what_odd_formats_become(tmp_path, capsys):
    root = make_imagenet(tmp_path)
    a = os.path.join(root, "train", "a")
    open(os.path.join(a, "._a_0.jpeg"), "wb").write(b"\0\5\x16\7 macOS resource fork")
    open(os.path.join(a, "notes.txt"), "w").write("-")
    gray16 = os.path.join(a, "gray16.png")
    Image.fromarray(photo(30, 20)[..., 0].astype(np.uint16) * 257).save(gray16)
    assert prepare.main(["check", root, "--workers", "1"]) == 0  # skipped files are no error
    out = capsys.readouterr().out
    assert f"not an image (training skips it): {os.path.join(a, '._a_0.jpeg')}\n" in out
    assert f"not an image (training skips it): {os.path.join(a, 'notes.txt')}\n" in out
    assert f"odd format (loads as RGB): {gray16}: mode I;16, 16-bit grayscale, scaled to 8 bits\n" in out
    assert "checked 22 files: 0 undecodable, 1 odd formats; 2 files skipped as not images" in out


def test_check_command_reports_bad_and_odd_files(tmp_path):
    root = make_imagenet(tmp_path)
    run = lambda: subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "check", root,
                                  "--workers", "2"], capture_output=True, text=True, timeout=120)
    result = run()
    assert result.returncode == 0, result.stderr
    assert "checked 21 files: 0 undecodable, 0 odd formats" in result.stdout
    Image.fromarray(photo(30, 30)).convert("CMYK").save(os.path.join(root, "val", "a", "cmyk.JPEG"))
    bad = os.path.join(root, "train", "c", "c_2.jpeg")
    open(bad, "r+b").truncate(300)
    result = run_prepare("check", root, "--workers", "2")  # the command line's process above; in this one now
    assert result.returncode == 1
    assert f"UNDECODABLE: {bad}" in result.stdout
    assert "cmyk.JPEG: mode CMYK" in result.stdout
    assert "checked 22 files: 1 undecodable, 1 odd formats" in result.stdout


# ------------------------------------------------------------------------------- sort-val

def make_loose_val(folder, wnids):
    """Val as downloaded: ILSVRC2012_val_<n>.JPEG files in one folder, image n of class wnids[n-1]."""
    os.makedirs(folder)
    for n in range(1, len(wnids) + 1):
        Image.fromarray(photo(20, 16, seed=n)).save(os.path.join(folder, f"ILSVRC2012_val_{n:08d}.JPEG"))
    return folder


def run_sort_val(*args):
    return run_prepare("sort-val", *args)


@pytest.mark.quick
def test_sort_val_from_kaggle_csv_moves_once_and_loads_as_image_folder(tmp_path):
    wnids = ["n01440764", "n01443537", "n01440764", "n01484850", "n01443537", "n01484850"]
    val = make_loose_val(tmp_path / "val", wnids)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in enumerate(wnids, 1)]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")  # any row order
    before = {n: os.stat(val / f"ILSVRC2012_val_{n:08d}.JPEG").st_ino for n in range(1, 7)}
    result = run_sort_val(val, "--labels", csv)
    assert result.returncode == 0, result.stderr
    assert "moved 6 images" in result.stdout and "0 were already in place" in result.stdout
    dataset = data.ImageFolder(str(val), transform=lambda img, rng: img)
    assert dataset.classes == sorted(set(wnids))
    assert sorted((os.path.basename(p), dataset.classes[c]) for p, c in dataset.samples) == sorted(
        (f"ILSVRC2012_val_{n:08d}.JPEG", w) for n, w in enumerate(wnids, 1))
    # Moved, not copied: the same inodes.
    assert {n: os.stat(val / wnids[n - 1] / f"ILSVRC2012_val_{n:08d}.JPEG").st_ino for n in range(1, 7)} == before
    again = run_sort_val(val, "--labels", csv)
    assert again.returncode == 0 and "moved 0 images" in again.stdout and "6 were already in place" in again.stdout


@pytest.mark.quick
def test_sort_val_from_wnid_list_links_into_another_folder(tmp_path):
    wnids = ["n00000002", "n00000001", "n00000002", "n00000001"]
    val = make_loose_val(tmp_path / "flat", wnids)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(wnids) + "\n")
    out = tmp_path / "val"
    result = run_sort_val(val, "--labels", labels, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "linked 4 images" in result.stdout
    for n, w in enumerate(wnids, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        assert os.path.samefile(val / name, out / w / name)  # a hard link: no second copy
    assert run_sort_val(val, "--labels", labels, "--out", out).stdout.startswith("linked 0 images")


@pytest.mark.quick
def test_sort_val_refuses_mismatches_and_touches_nothing(tmp_path):
    wnids = ["n00000001", "n00000002", "n00000001"]
    val = make_loose_val(tmp_path / "val", wnids)
    short = tmp_path / "short.txt"
    short.write_text("n00000001\nn00000002\n")
    result = run_sort_val(val, "--labels", short)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "labels 2 images but" in result.stderr and "holds 3" in result.stderr
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n00000001 1 2 3 4\n"
                   "ILSVRC2012_val_00000009,n00000002 1 2 3 4\nILSVRC2012_val_00000003,n00000001 1 2 3 4\n")
    result = run_sort_val(val, "--labels", csv)
    assert result.returncode == 2 and "ILSVRC2012_val_00000009" in result.stderr
    assert "ILSVRC2012_val_00000002" in result.stderr
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n171\n")
    result = run_sort_val(val, "--labels", devkit)
    assert result.returncode == 2 and "--meta" in result.stderr
    assert sorted(os.listdir(val)) == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in (1, 2, 3)]  # untouched
    # Sorted with one file, then offered another that disagrees: refused.
    good = tmp_path / "good.txt"
    good.write_text("\n".join(wnids) + "\n")
    assert run_sort_val(val, "--labels", good).returncode == 0
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("n00000002\nn00000001\nn00000001\n")
    result = run_sort_val(val, "--labels", swapped)
    assert result.returncode == 2 and "another class folder" in result.stderr


def tree(folder):
    """Every path under `folder`, relative: a snapshot to compare before and after."""
    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, dirs, files in os.walk(folder) for n in dirs + files)


def sort_val_refused(capsys, val, *args):
    """prepare.main's sort-val on `val` must fail with one line and exit 2; returns that line."""
    assert prepare.main(["sort-val", str(val), *map(str, args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    return captured.err


def kaggle_csv(path, rows):
    path.write_text("ImageId,PredictionString\n" + "".join(row + "\n" for row in rows))
    return path


def write_meta(path, synsets):
    """A devkit meta.mat of synsets [(ILSVRC2012_ID, wnid, num_children)]."""
    from scipy.io import savemat
    savemat(str(path), {"synsets": np.array(synsets, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"),
                                                             ("num_children", "O")])})
    return path


@pytest.mark.quick
@pytest.mark.parametrize("label", ["../x", "OUTSIDE", "a/b", "..", ".", ".hidden", "n00000001/../../x", "n0000001"])
@pytest.mark.parametrize("form", ["csv", "list", "meta"])
def test_sort_val_takes_only_class_names_and_moves_nothing_else(tmp_path, capsys, form, label):
    label = str(tmp_path / "outside") if label == "OUTSIDE" else label
    wnids = ["n00000001", "n00000002", "n00000001"]
    val = make_loose_val(tmp_path / "val", wnids)
    bad = wnids[:2] + [label]  # the last line only: the whole file is checked before anything moves
    labels, meta = tmp_path / "labels.txt", tmp_path / "meta.mat"
    if form == "csv":
        kaggle_csv(labels, [f"ILSVRC2012_val_{n:08d},{w} 1 2 3 4" for n, w in enumerate(bad, 1)])
    elif form == "list":
        labels.write_text("\n".join(bad) + "\n")
    else:
        pytest.importorskip("scipy")
        write_meta(meta, [(i, w, 0) for i, w in enumerate(bad, 1)])
        labels.write_text("1\n2\n3\n")
    before = tree(tmp_path)
    error = sort_val_refused(capsys, val, "--labels", labels, *(["--meta", meta] if form == "meta" else []))
    assert repr(label[:40]) in error and "is not a WordNet id" in error
    named = {"csv": f"{labels} line 4: class ", "list": f"{labels} line 3: class ",  # the header is line 1
             "meta": f"{meta} is not the devkit's meta.mat: "}[form]
    assert error.startswith("error: " + named)
    assert tree(tmp_path) == before


@pytest.mark.quick
@pytest.mark.parametrize("case", ["no comma", "empty prediction", "empty image id", "header only", "twice",
                                  "binary", "empty", "blank lines", "not labels", "word among ids"])
def test_sort_val_malformed_label_files_give_one_line(tmp_path, capsys, case):
    val = make_loose_val(tmp_path / "val", ["n00000001", "n00000002"])
    labels = tmp_path / "labels"
    row1 = "ILSVRC2012_val_00000001,n00000001 1 2 3 4"
    content, expected = {
        "no comma": ([row1, "ILSVRC2012_val_00000002 n00000002 1 2 3 4"], "line 3: 'ILSVRC2012_val_00000002 n0000"),
        "empty prediction": ([row1, "ILSVRC2012_val_00000002,"], "line 3: 'ILSVRC2012_val_00000002,' is not 'ImageId,"),
        "empty image id": ([row1, ",n00000002 1 2 3 4"], "line 3: ',n00000002 1 2 3 4' is not 'ImageId,"),
        "header only": ([], "has a header but no labels"),
        "twice": ([row1, row1.replace("n00000001", "n00000002")],
                  "line 3: image ILSVRC2012_val_00000001 again (first on line 2)"),
    }.get(case, (None, None))
    if content is not None:
        kaggle_csv(labels, content)
    elif case == "binary":
        buf = io.BytesIO()
        Image.fromarray(photo(20, 20)).save(buf, "JPEG")
        labels.write_bytes(buf.getvalue())
        expected = "is not a text file"
    elif case in ("empty", "blank lines"):
        labels.write_text("" if case == "empty" else "\n  \n\n")
        expected = "is empty"
    elif case == "not labels":
        labels.write_text("cat\ndog\n")
        expected = "is not a val label file (line 1: 'cat')"
    else:
        labels.write_text("490\nn00000001\n")
        expected = "line 2: 'n00000001' is not an ILSVRC2012_ID"
    before = tree(tmp_path)
    error = sort_val_refused(capsys, val, "--labels", labels)
    assert error.startswith(f"error: {labels}") and expected in error
    assert tree(tmp_path) == before


@pytest.mark.quick
def test_sort_val_devkit_ground_truth_with_meta(tmp_path, capsys):
    """The devkit form end to end (needs scipy), and its meta.mat checked: a file that is not one,
    an ID it does not list, a synset with children (not a class)."""
    wnids = ["n00000002", "n00000001", "n00000002"]
    val = make_loose_val(tmp_path / "val", wnids)
    open(val / "._ILSVRC2012_val_00000001.JPEG", "wb").write(b"\0\5\x16\7")  # macOS metadata: not an image
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("2\n1\n2\n")
    if importlib.util.find_spec("scipy") is None:
        assert "needs scipy" in sort_val_refused(capsys, val, "--labels", truth, "--meta", tmp_path / "meta.mat")
        pytest.skip("scipy is not installed: the devkit form is refused, in one line")
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"MATLAB? no. " * 20)
    before = tree(tmp_path)
    assert sort_val_refused(capsys, val, "--labels", truth, "--meta", garbage).startswith(
        f"error: {garbage} is not the devkit's meta.mat (ValueError: ")
    meta = write_meta(tmp_path / "meta.mat", [(1, "n00000001", 0), (2, "n00000002", 0), (3, "n00000003", 2)])
    truth3 = tmp_path / "truth3.txt"
    truth3.write_text("2\n3\n2\n")
    assert f"line 2 has ILSVRC2012_ID 3, which {meta} does not list as a class" in sort_val_refused(
        capsys, val, "--labels", truth3, "--meta", meta)
    assert tree(tmp_path) == sorted(before + ["meta.mat", "truth3.txt"])
    assert prepare.main(["sort-val", str(val), "--labels", str(truth), "--meta", str(meta)]) == 0
    assert "moved 3 images" in capsys.readouterr().out
    assert tree(val) == ["._ILSVRC2012_val_00000001.JPEG",  # left where it was
                         "n00000001", "n00000001/ILSVRC2012_val_00000002.JPEG", "n00000002",
                         "n00000002/ILSVRC2012_val_00000001.JPEG", "n00000002/ILSVRC2012_val_00000003.JPEG"]


# ------------------------------------------------------------------------------- Ctrl-C

SLOW = """import os, sys, time
import prepare, shards
module, name = os.environ["SLOW"].rsplit(".", 1)  # prepare._inspect, shards.write_shard or os.replace
owner, calls = {"prepare": prepare, "shards": shards, "os": os}[module], []
real = getattr(owner, name)
def slow(*args, **kwargs):  # after AFTER calls: say so in MARKER, then take a minute
    if len(calls) == int(os.environ["AFTER"]):
        open(os.environ["MARKER"], "w").close()
        time.sleep(60)
    calls.append(1)
    return real(*args, **kwargs)
setattr(owner, name, slow)
sys.exit(prepare.main(sys.argv[1:]))
"""


def interrupted(tmp_path, slow, after, *args):
    """Run prepare.py `args` with `slow` stalling after `after` calls, press Ctrl-C there (SIGINT to
    its whole process group, as a terminal does) -> (exit code, stderr)."""
    script, marker = tmp_path / "slow_prepare.py", tmp_path / "stalled"
    script.write_text(SLOW)
    env = dict(os.environ, PYTHONPATH=ROOT, SLOW=slow, AFTER=str(after), MARKER=str(marker))
    process = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not marker.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def test_ctrl_c_in_check_exits_130_with_one_line_and_no_worker_tracebacks(tmp_path):
    root = make_imagenet(tmp_path / "data")
    code, err = interrupted(tmp_path, "prepare._inspect", 0, "check", root, "--workers", "2")
    assert (code, err) == (130, "error: check stopped; nothing was written: run the same command again\n")


def test_ctrl_c_in_pack_keeps_the_finished_shards_and_the_same_command_continues(tmp_path, capsys):
    root, out = make_imagenet(tmp_path / "data", train=6, val=2), tmp_path / "pack"
    code, err = interrupted(tmp_path, "shards.write_shard", 2, "pack", root, out, "--shard-size", "8kB")
    assert (code, err) == (130, f"error: packing stopped; the same command continues it (finished shards in {out} "
                                f"are kept)\n")
    assert sorted(os.listdir(out)) == ["pack.json", "train-000000.tar", "train-000001.tar"]
    assert prepare.main(["pack", root, str(out), "--shard-size", "8kB"]) == 0
    assert f"packed 18 train images in 18 shards, 6 val images in 6 shards into {out}" in capsys.readouterr().out
    assert len(data.build_datasets(str(out), 32, 36)[0]) == 18


def test_ctrl_c_in_sort_val_says_what_was_moved_and_the_same_command_finishes(tmp_path, capsys):
    wnids = ["n00000001", "n00000002", "n00000001", "n00000003", "n00000002", "n00000003"]
    val, labels = make_loose_val(tmp_path / "val", wnids), tmp_path / "labels.txt"
    labels.write_text("\n".join(wnids) + "\n")
    code, err = interrupted(tmp_path, "os.replace", 2, "sort-val", val, "--labels", labels)
    assert (code, err) == (130, f"error: sort-val stopped: moved 2 of 6 images into class folders of {val}; "
                                f"the same command finishes it\n")
    assert prepare.main(["sort-val", str(val), "--labels", str(labels)]) == 0
    assert "moved 4 images into class folders" in capsys.readouterr().out
    assert sorted(data.ImageFolder(str(val), None).classes) == ["n00000001", "n00000002", "n00000003"]


# ------------------------------------------------------------------------------- hostile input

@contextlib.contextmanager
def read_only(folder):
    """`folder` (made if missing) read-only: bind-mounted read-only where this process may (root, who
    ignores permission bits), else by its permission bits."""
    os.makedirs(folder, exist_ok=True)
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "--bind", str(folder), str(folder)]).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)]).returncode != 0:
        subprocess.run(["umount", str(folder)], check=True)
        mounted = False
    if not mounted:
        os.chmod(folder, 0o555)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True) if mounted else os.chmod(folder, 0o755)


def refused(capsys, *args):
    """prepare.py `args` must exit 2 with one `error:` line, nothing on stdout; returns the line."""
    try:
        code = prepare.main([str(a) for a in args])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and captured.err.startswith("error: ") \
        and captured.err.count("\n") == 1, (code, captured)
    return captured.err.strip()


@pytest.mark.quick
def test_check_refuses_what_it_cannot_check_in_one_line(tmp_path, capsys, monkeypatch):
    root = make_imagenet(tmp_path / "data")
    cores = os.cpu_count()
    assert refused(capsys, "check", tmp_path / "none") == f"error: DATA {tmp_path / 'none'} does not exist"
    assert refused(capsys, "check", os.path.join(root, "val", "a", "a_0.jpeg")).endswith("is a file, not a folder")
    for workers in ("0", "-3", str(cores + 1), "100000"):
        assert refused(capsys, "check", root, "--workers", workers) == (f"error: argument --workers: '{workers}': give "
                                                                        f"1 to {cores} (this machine's cores) (see "
                                                                        f"python prepare.py check --help)")
    assert "argument --workers: 'many': give 1 to" in refused(capsys, "check", root, "--workers", "many")
    scandir = os.scandir

    def unreadable(path):  # a folder this user may not list (root ignores permissions, so simulated)
        if str(path).endswith(os.path.join("train", "b")):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", unreadable)
    assert refused(capsys, "check", root) == (f"error: cannot list {os.path.join(root, 'train', 'b')}: Permission "
                                              f"denied; check needs to read every folder under {root}")


@pytest.mark.quick
def test_check_skips_fifos_and_stops_at_a_link_loop(tmp_path, capsys):
    root = make_imagenet(tmp_path / "data")
    fifo = os.path.join(root, "train", "a", "pipe.JPEG")
    os.mkfifo(fifo)  # opening it would wait forever for a writer
    assert prepare.main(["check", root, "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert f"not an image (training skips it): {fifo}\n" in out and "checked 21 files" in out
    os.symlink(os.path.join(root, "train"), os.path.join(root, "train", "a", "loop"))
    assert refused(capsys, "check", root, "--workers", "1") == (f"error: {os.path.join(root, 'train', 'a', 'loop')} "
                                                                f"links back to {os.path.join(root, 'train')}, a loop: "
                                                                f"remove the link")


@pytest.mark.quick
def test_sort_val_refuses_hostile_input_in_one_line_and_touches_nothing(tmp_path, capsys):
    wnids = ["n00000001", "n00000002", "n00000001"]
    val, labels = make_loose_val(tmp_path / "val", wnids), tmp_path / "labels.txt"
    labels.write_text("\n".join(wnids) + "\n")
    image = val / "ILSVRC2012_val_00000001.JPEG"
    before = tree(tmp_path)
    cases = {  # arguments -> the line
        (tmp_path / "none", "--labels", labels): f"val folder {tmp_path / 'none'} does not exist",
        (image, "--labels", labels): f"val folder {image} is a file, not a folder",
        (val, "--labels", tmp_path / "none.txt"): f"--labels {tmp_path / 'none.txt'} does not exist",
        (val, "--labels", tmp_path): f"--labels {tmp_path} is a folder, not a file",
        (val, "--labels", labels, "--out", image): f"--out {image} is a file, not a folder: give a new or sorted folder",
        (val, "--labels", labels, "--out", image / "x"): f"--out {image / 'x'}: {image} is a file, not a folder; give a folder",
        (val, "--labels", tmp_path / "fifo"): f"--labels {tmp_path / 'fifo'} is not a regular file",
        (val, "--labels", labels, "--meta", labels): f"--meta maps the devkit's ILSVRC2012_IDs, and {labels} names the "
                                                     f"classes itself: leave --meta out",
    }
    os.mkfifo(tmp_path / "fifo")  # reading it would wait for a writer for ever
    for args, line in cases.items():
        assert refused(capsys, "sort-val", *args) == f"error: {line}", args
    devkit = tmp_path / "truth.txt"
    devkit.write_text("2\n1\n2\n")
    if importlib.util.find_spec("scipy") is not None:
        assert refused(capsys, "sort-val", val, "--labels", devkit, "--meta", tmp_path / "meta.mat") == \
            f"error: --meta {tmp_path / 'meta.mat'} does not exist"
        assert refused(capsys, "sort-val", val, "--labels", devkit, "--meta", tmp_path) == \
            f"error: --meta {tmp_path} is a folder, not a file"
    other = tmp_path / "other.txt"  # the label file of another val set
    other.write_text("n00000001\n" * 50_000)
    assert refused(capsys, "sort-val", val, "--labels", other) == (
        f"error: {other} labels 50000 images but {val} holds 3: is it the label file of this val set?")
    assert tree(tmp_path) == sorted(before + ["fifo", "other.txt", "truth.txt"])


@pytest.mark.quick
def test_sort_val_refuses_two_images_of_one_id_and_moves_nothing(tmp_path, capsys):
    """Kaggle's CSV labels image ids: a .JPEG and a .png of one id cannot both take its label."""
    val = make_loose_val(tmp_path / "val", ["n00000001", "n00000002"])
    (val / "ILSVRC2012_val_00000001.png").write_bytes((val / "ILSVRC2012_val_00000001.JPEG").read_bytes())
    csv = kaggle_csv(tmp_path / "LOC_val_solution.csv", ["ILSVRC2012_val_00000001,n00000001 1 2 3 4",
                                                          "ILSVRC2012_val_00000002,n00000002 1 2 3 4"])
    before = tree(val)
    assert sort_val_refused(capsys, val, "--labels", csv) == (
        f"error: {val} holds ILSVRC2012_val_00000001.JPEG and ILSVRC2012_val_00000001.png, two images of one id "
        f"in {csv}: remove one\n")
    assert tree(val) == before


@pytest.mark.quick
def test_sort_val_refuses_a_read_only_destination_before_moving_anything(tmp_path, capsys):
    wnids = ["n00000001", "n00000002"]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(wnids) + "\n")
    val = make_loose_val(tmp_path / "val", wnids)
    with read_only(tmp_path / "ro") as ro:
        assert refused(capsys, "sort-val", val, "--labels", labels, "--out", ro / "sorted") == (
            f"error: --out {ro / 'sorted'}: no permission to write in {ro} (or it is read-only); give a folder "
            f"you can write to")
    with read_only(val):  # moving within a val folder on a read-only file system
        assert refused(capsys, "sort-val", val, "--labels", labels) == (
            f"error: val folder {val}: no permission to write in {val} (or it is read-only); give a folder "
            f"you can write to")
    assert sorted(os.listdir(val)) == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in (1, 2)]


@pytest.mark.quick
def test_pack_refuses_hostile_input_in_one_line(tmp_path, capsys):
    root = make_imagenet(tmp_path / "data", train=2, val=1)
    image = os.path.join(root, "val", "a", "a_0.jpeg")
    cases = {
        (tmp_path / "none", tmp_path / "p"): f"DATA {tmp_path / 'none'} does not exist",
        (image, tmp_path / "p"): f"DATA {image} is a file, not a folder",
        (os.path.join(root, "train"), tmp_path / "p"): f"{os.path.join(root, 'train')} has neither train/ nor val/ "
                                                       f"to pack (expected DATA/train/<class>/*.JPEG and "
                                                       f"DATA/val/<class>/*.JPEG)",
        (root, image): f"OUT {image}: {image} is a file, not a folder; give a folder",
        (root, os.path.join(root, "train", "a", "p")): f"OUT {os.path.join(root, 'train', 'a', 'p')} is inside "
                                                       f"{os.path.join(root, 'train')}, which is packed: give a folder "
                                                       f"outside it",
    }
    os.symlink(tmp_path / "gone", tmp_path / "link")
    cases[(root, tmp_path / "link")] = f"OUT {tmp_path / 'link'} is a link to {tmp_path / 'gone'}, which does not exist"
    for (source, out), line in cases.items():
        assert refused(capsys, "pack", source, out) == f"error: {line}", (source, out)
    for size in ("0", "-1", "abc", "1XB"):
        assert refused(capsys, "pack", root, tmp_path / "p", "--shard-size", size).startswith(
            f"error: argument --shard-size: '{size}' is not a size (e.g. 1GB, 500MB, 256MiB)")
    assert prepare.main(["pack", root, str(tmp_path / "p")]) == 0
    capsys.readouterr()
    assert refused(capsys, "pack", tmp_path / "p", tmp_path / "q") == (
        f"error: {tmp_path / 'p'} is a pack already: train and evaluate with --data {tmp_path / 'p'}")
    with read_only(tmp_path / "ro") as ro:
        assert refused(capsys, "pack", root, ro / "p") == (
            f"error: OUT {ro / 'p'}: no permission to write in {ro} (or it is read-only); give a folder you can "
            f"write to")
    assert not os.path.exists(tmp_path / "q")


@pytest.mark.quick
def test_progress_bars_only_where_stderr_is_a_terminal(tmp_path, capsys, monkeypatch):
    root = make_imagenet(tmp_path / "data", train=2, val=1)
    assert prepare.main(["check", root, "--workers", "1"]) == 0
    assert prepare.main(["pack", root, str(tmp_path / "a")]) == 0
    assert capsys.readouterr().err == ""  # a file or a pipe: no bars
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # now a terminal
    assert prepare.main(["check", root, "--workers", "1"]) == 0
    assert prepare.main(["pack", root, str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "decoding: 100%" in err and "packing: 100%" in err
