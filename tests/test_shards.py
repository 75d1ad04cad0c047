"""Packed shards (python prepare.py pack DATA OUT, then --data OUT): the same samples as the folders,
read by one positioned read each; packing that resumes and refuses what is not its own; a pack that
differs from what was written refused at start, cheaply, and repaired by the same pack command."""
import errno
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import prepare
import shards
import utils
from conftest import make_folder, make_imagenet, photo
from utils import DataError


def varied_imagenet(root):
    """Train and val with JPEG, PNG, CMYK JPEG and grayscale JPEG files, dotted names, a non-image."""
    root = make_imagenet(root, train=3, val=2)
    for split in ("train", "val"):
        folder = os.path.join(root, split, "b")
        Image.fromarray(photo(40, 30, seed=7)).save(os.path.join(folder, "b.png.v2.png"))
        Image.fromarray(photo(36, 28, seed=8)).convert("CMYK").save(os.path.join(folder, "cmyk.jpg"))
        Image.fromarray(photo(30, 44, seed=9)[..., 1]).save(os.path.join(folder, "gray.JPEG"))
    open(os.path.join(root, "train", "a", "notes.txt"), "w").write("-")
    return root


@pytest.fixture
def packed(tmp_path, capsys):
    root = varied_imagenet(tmp_path / "data")
    out = str(tmp_path / "pack")
    assert prepare.main(["pack", root, out, "--shard-size", "16kB"]) == 0
    printed = capsys.readouterr().out
    assert f"packed 12 train images in 5 shards, 9 val images in 4 shards into {out}" in printed
    assert f"skipped 1 files that are not images: {root}/train/a/notes.txt" in printed
    return root, out


def members(shard):
    """{name: bytes} of a tar file, by Python's tarfile: a reader that is not ShardReader's."""
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.mark.quick
def test_pack_round_trips_every_samples_bytes_and_label(packed):
    root, out = packed
    for split in ("train", "val"):
        folder, reader = data.ImageFolder(os.path.join(root, split), None), shards.ShardReader(out, split)
        assert reader.classes == folder.classes and len(reader.paths) > 1  # 16 kB: several shards
        assert all(os.path.getsize(shard) <= 16_000 for shard in reader.paths)  # --shard-size is the most
        assert reader.names == [os.path.relpath(p, folder.root) for p, _ in folder.samples]
        assert reader.skipped_files == folder.skipped_files
        in_tars = {}
        for shard in reader.paths:
            in_tars.update(members(shard))
        assert len(in_tars) == 2 * len(folder)
        for i, (path, label) in enumerate(folder.samples):
            source = open(path, "rb").read()
            assert reader.read(i)[0] == source and reader.labels[i] == label
            ext = ".png" if path.endswith(".png") else ".jpg"
            key = f"{i:08d}_{os.path.splitext(os.path.basename(path))[0].replace('.', '_')}"
            assert in_tars[key + ext] == source and in_tars[key + ".cls"] == str(label).encode()


@pytest.mark.quick
def test_webdataset_and_tar_read_the_shards_as_the_folders(packed):
    webdataset = pytest.importorskip("webdataset")  # in requirements-dev; an optional extra to train
    root, out = packed
    reader = shards.ShardReader(out, "train")
    rows = list(webdataset.WebDataset(reader.paths, shardshuffle=False))
    folder = data.ImageFolder(os.path.join(root, "train"), None)
    assert len(rows) == len(folder)
    for row, (path, label) in zip(rows, folder.samples):
        content = row["png" if path.endswith(".png") else "jpg"]
        assert content == open(path, "rb").read() and int(row["cls"]) == label
    listed = subprocess.run(["tar", "tf", reader.paths[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listed == list(members(reader.paths[0]))  # tar(1) lists what Python's tarfile reads


@pytest.mark.quick
def test_training_and_eval_samples_from_shards_equal_the_folders(packed):
    root, out = packed
    a = data.build_datasets(root, 32, 36, seed=3, augment="randaugment")
    b = data.build_datasets(out, 32, 36, seed=3, augment="randaugment")
    for folder, packed_set in zip(a, b):
        assert isinstance(packed_set.pack, shards.ShardReader) and len(packed_set) == len(folder)
        for item in [(i, 1) for i in range(len(folder))] + list(range(len(folder))):
            x, y = folder[item], packed_set[item]
            assert torch.equal(x[0], y[0]) and x[1] == y[1]
    loader = data.build_loader(b[0], data.TrainSampler(len(b[0]), 0, 1, seed=3), 4, workers=2, train=True)
    alone = data.build_loader(b[0], data.TrainSampler(len(b[0]), 0, 1, seed=3), 4, workers=0, train=True)
    batches = list(zip(loader, alone))
    assert len(batches) == len(loader) == len(alone) == len(b[0]) // 4
    for (x, y), (x0, y0) in batches:  # the workers' own shard descriptors read the same
        assert torch.equal(x, x0) and torch.equal(y, y0)


@pytest.mark.quick
def test_pack_resumes_where_it_stopped_and_refuses_other_packs(tmp_path, monkeypatch, capsys):
    root = make_imagenet(tmp_path / "data", train=6, val=2)
    out, fresh = str(tmp_path / "pack"), str(tmp_path / "fresh")
    write_shard, written = shards.write_shard, []

    def stop_at_the_third(path, plan, chunk):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        write_shard(path, plan, chunk)
    monkeypatch.setattr(shards, "write_shard", stop_at_the_third)
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 130
    assert "error: packing stopped; the same command continues it" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, shards.PACK_HEAD)) and not os.path.exists(os.path.join(out, "index.json"))
    kept = {path: os.stat(path).st_mtime_ns for path in written}
    open(os.path.join(out, ".train-000002.tar.tmp.12345"), "wb").write(b"what a killed packing left")
    monkeypatch.setattr(shards, "write_shard", write_shard)
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    assert {path: os.stat(path).st_mtime_ns for path in written} == kept  # finished shards not rewritten
    assert prepare.main(["pack", root, fresh, "--shard-size", "8kB"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    for name in os.listdir(fresh):  # a resumed pack is byte for byte the uninterrupted one
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(fresh, name), "rb").read(), name
    capsys.readouterr()
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    assert f"{out} already holds this pack" in capsys.readouterr().out
    os.truncate(written[1], 5120)  # a shard cut short after packing: the same command writes it again
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    assert "packed 18 train images" in capsys.readouterr().out
    assert open(written[1], "rb").read() == open(written[1].replace(out, fresh), "rb").read()
    assert prepare.main(["pack", root, out, "--shard-size", "9kB"]) == 2
    assert f"error: {out} holds the pack of other files or another --shard-size" in capsys.readouterr().err
    Image.fromarray(photo(20, 20)).save(os.path.join(root, "train", "a", "new.JPEG"))
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 2
    assert "holds the pack of other files" in capsys.readouterr().err
    assert prepare.main(["pack", root, os.path.join(root, "train")]) == 2  # a folder of other files
    assert "holds files that are not this pack's (a, b, c)" in capsys.readouterr().err
    assert len(shards.ShardReader(out, "train")) == 18  # the pack is untouched


@pytest.mark.quick
def test_shard_reads_are_retried_reopened_and_counted(packed, monkeypatch):
    _, out = packed
    folder = data.open_split(out, "val", None, index=shards.read_index(out))
    expected = folder.read(0)[0]
    pread, opened, left = os.pread, [], [utils.READ_ATTEMPTS - 1]

    def flaky_pread(fd, size, offset):
        if left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ESTALE, "Stale file handle")
        return pread(fd, size, offset)
    monkeypatch.setattr(utils, "READ_BACKOFF_SECONDS", 0.001)
    monkeypatch.setattr(shards.os, "pread", flaky_pread)
    monkeypatch.setattr(shards.os, "open", lambda *a, _open=os.open: opened.append(a[0]) or _open(*a))
    assert folder.read(0)[0] == expected and folder.read_retries.value == utils.READ_ATTEMPTS - 1
    assert len(opened) == utils.READ_ATTEMPTS - 1  # each retry opens the shard again; the last one is kept
    folder.read(1)
    assert len(opened) == utils.READ_ATTEMPTS - 1 + (folder.pack.shard_of[1] != folder.pack.shard_of[0])
    left[0] = utils.READ_ATTEMPTS
    name = f"{folder.samples[0][0]} in {folder.pack.paths[0]}"
    with pytest.raises(DataError, match=f"cannot read image {name}: Stale file handle \\(4 attempts"):
        folder.read(0)


@pytest.mark.quick
def test_a_process_keeps_at_most_max_open_shards_open(packed, monkeypatch):
    root, out = packed
    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 2)
    reader, folder = shards.ShardReader(out, "train"), data.ImageFolder(os.path.join(root, "train"), None)
    assert len(reader.paths) == 5
    for i in [*range(len(reader)), *reversed(range(len(reader)))]:
        assert reader.read(i)[0] == open(folder.samples[i][0], "rb").read()
        assert len(reader.files) <= 2
    reader.close()
    assert reader.files == {}


@pytest.mark.quick
def test_check_on_a_pack_finds_bad_samples_and_a_wrong_index(packed, tmp_path, capsys):
    root, _ = packed
    out = str(tmp_path / "one")  # one shard a split: samples 1 and 2 sit inside it, not at its ends
    assert prepare.main(["pack", root, out]) == 0
    assert prepare.main(["check", out, "--workers", "1"]) == 0
    result = capsys.readouterr().out
    assert "checked 21 samples: 0 undecodable, 4 odd formats; 1 files skipped as not images" in result
    assert "odd format (loads as RGB): b/cmyk.jpg in " in result
    reader = shards.ShardReader(out, "train")
    i = reader.names.index("a/a_1.jpeg")
    shard, offset = reader.paths[reader.shard_of[i]], int(reader.offsets[i])
    with open(shard, "r+b") as f:  # garbage over the JPEG's header: one undecodable sample
        f.seek(offset)
        f.write(b"\0" * 64)
    table = np.load(os.path.join(out, "val.npy"))
    span = lambda k: shards.tar_member_bytes(int(table["size"][k]))  # two samples inside the shard, alike in size
    i, j = next((i, j) for i in range(1, len(table) - 1) for j in range(i + 1, len(table) - 1) if span(i) == span(j))
    table["offset"][[i, j]] = table["offset"][[j, i]]  # an index that points at the wrong samples
    np.save(os.path.join(out, "val.npy"), table)
    index = json.load(open(os.path.join(out, "index.json")))  # ... consistently: its checksum says the same
    index["splits"]["val"]["table_sha256"] = hashlib.sha256(open(os.path.join(out, "val.npy"), "rb").read()).hexdigest()
    json.dump(index, open(os.path.join(out, "index.json"), "w"))
    assert prepare.main(["check", out, "--workers", "2"]) == 1
    result = capsys.readouterr().out
    assert f"UNDECODABLE: a/a_1.jpeg in {shard}: UnidentifiedImageError" in result
    names = [shards.member_name(k, index["splits"]["val"]["names"][k]) for k in (i, j)]
    assert f"the shard holds {names[1]}" in result and f"index says {names[0]}" in result
    assert f"the shard holds {names[0]}" in result and f"index says {names[1]}" in result
    assert "checked 21 samples: 3 undecodable" in result


@pytest.mark.quick
def test_a_missing_or_cut_shard_and_a_split_not_packed_are_named(tmp_path, capsys):
    make_folder(str(tmp_path / "data" / "val"), per_class=2)
    out = str(tmp_path / "pack")
    assert prepare.main(["pack", str(tmp_path / "data"), out]) == 0
    with pytest.raises(DataError, match="the pack .* has no train set .* had no train/ when it was packed"):
        data.build_datasets(out, 32, 36)
    assert len(data.build_datasets(out, 32, 36, with_train=False)[1]) == 6  # evaluation needs val alone
    shard = os.path.join(out, "val-000000.tar")
    os.truncate(shard, 10240)
    with pytest.raises(DataError, match=f"shard {shard} is 10,240 bytes, the index says .*: repair it with python "
                                        f"prepare.py pack {tmp_path / 'data'} {out} \\(it rewrites what is damaged\\)"):
        data.build_datasets(out, 32, 36, with_train=False)
    os.remove(shard)
    with pytest.raises(DataError, match=f"shard {shard} is missing"):
        data.build_datasets(out, 32, 36, with_train=False)


@pytest.mark.quick
@pytest.mark.parametrize("text, size", [("1GB", 10 ** 9), ("500MB", 5 * 10 ** 8), ("256MiB", 2 ** 28),
                                        ("1.5kB", 1500), ("4096", 4096)])
def test_shard_sizes_read_as_people_write_them(text, size):
    assert prepare.parse_size(text) == size


def test_train_py_names_a_missing_shard_in_one_line(tmp_path):
    from test_train import run_train
    root = make_imagenet(tmp_path / "data")
    out = str(tmp_path / "pack")
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    shard = shards.ShardReader(out, "train").paths[1]
    os.remove(shard)
    result = run_train(["--data", out, "--output-dir", tmp_path / "run", "--image-size", "32", "--epochs", "1"])
    assert result.returncode == 2 and not os.path.exists(tmp_path / "run")
    assert result.stderr.strip() == f"error: shard {shard} is missing: repair it with python prepare.py pack {root} " \
                                    f"{out} --shard-size 8000 (it rewrites what is damaged)"


@pytest.mark.quick
def test_a_full_disk_while_packing_keeps_the_finished_shards_and_says_so(tmp_path, monkeypatch, capsys):
    root = make_imagenet(tmp_path / "data", train=6, val=2)
    out = str(tmp_path / "pack")
    add_member, calls = shards.add_member, []

    def fills_the_disk(tar, name, content):
        calls.append(name)
        if len(calls) == 7:  # sample 3's image: 8 kB shards (below tar's 10 kB record) hold one sample each
            raise OSError(errno.ENOSPC, "No space left on device")
        add_member(tar, name, content)
    monkeypatch.setattr(shards, "add_member", fills_the_disk)
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 5
    err = capsys.readouterr().err
    assert f"error: no space left in {os.path.abspath(out)} for train-000003.tar" in err and \
        "run the same command to continue" in err
    assert sorted(os.listdir(out)) == [shards.PACK_HEAD] + [f"train-00000{n}.tar" for n in range(3)]  # no temporary
    monkeypatch.setattr(shards, "add_member", add_member)
    assert prepare.main(["pack", root, out, "--shard-size", "8kB"]) == 0 and len(shards.ShardReader(out, "val")) == 6


# ------------------------------------------------------------------ a pack that is not what was written

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A pack of 16 kB shards, as prepare.py pack wrote it, with its source: (root, pack, {name: bytes})."""
    tmp = tmp_path_factory.mktemp("pristine")
    root, out = varied_imagenet(tmp / "data"), str(tmp / "pack")
    for folder, _, names in os.walk(os.path.join(root, "val")):  # val files named apart from train's, as ImageNet's
        for name in names:
            os.rename(os.path.join(folder, name), os.path.join(folder, "val_" + name))
    assert prepare.main(["pack", root, out, "--shard-size", "16kB"]) == 0
    return root, out, {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}


def same_size_shards(out, exclude=()):
    """Two shards of the pack with the same size (tar files end on 10 kB records: many have)."""
    by_size = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar") and name not in exclude:
            by_size.setdefault(os.path.getsize(os.path.join(out, name)), []).append(name)
    return next(names[:2] for names in by_size.values() if len(names) > 1)


def swap(out, a, b):
    os.replace(os.path.join(out, a), os.path.join(out, "x"))
    os.replace(os.path.join(out, b), os.path.join(out, a))
    os.replace(os.path.join(out, "x"), os.path.join(out, b))


def damage(out, how):
    """Damage the pack `out` as `how` says -> the file the refusal must name."""
    path = lambda name: os.path.join(out, name)
    if how in ("index missing", "table missing", "shard missing"):
        name = {"index missing": "index.json", "table missing": "train.npy", "shard missing": "val-000001.tar"}[how]
        os.remove(path(name))
        return path(name)
    if how == "index damaged":
        open(path("index.json"), "r+b").truncate(100)
        return path("index.json")
    if how == "table damaged":  # one label changed: the same size, another checksum
        table = np.load(path("val.npy"))
        table["label"][0] += 1
        np.save(path("val.npy"), table)
        return path("val.npy")
    if how == "shard cut":
        os.truncate(path("train-000002.tar"), os.path.getsize(path("train-000002.tar")) - 512)
        return path("train-000002.tar")
    train = [n for n in sorted(os.listdir(out)) if n.startswith("train-")]
    if how == "shards renamed":  # two shards of a split, each under the other's name
        a, b = same_size_shards(out, exclude=[n for n in os.listdir(out) if n not in train])
        swap(out, a, b)
        return path(a)
    val = next(n for n in sorted(os.listdir(out)) if n.startswith("val-") and  # "shard exchanged": a train
               any(os.path.getsize(path(n)) == os.path.getsize(path(t)) for t in train))  # shard for a val one
    other = next(t for t in train if os.path.getsize(path(t)) == os.path.getsize(path(val)))
    swap(out, val, other)
    return path(val)  # the val set is opened first


DAMAGE = ["index missing", "index damaged", "table missing", "table damaged", "shard missing", "shard cut",
          "shards renamed", "shard exchanged"]


@pytest.mark.quick
@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_pack_is_refused_at_start_and_the_pack_command_repairs_it(pristine, tmp_path, capsys, how):
    root, clean, files = pristine
    out = str(tmp_path / "pack")
    shutil.copytree(clean, out)
    named = damage(out, how)
    with pytest.raises(DataError) as refusal:
        data.build_datasets(out, 32, 36)
    message = str(refusal.value)
    assert named in message and "\n" not in message, message
    repair = f"repair it with python prepare.py pack {root} {out} --shard-size 16000 (it rewrites what is damaged)"
    assert message.endswith(repair), message
    assert prepare.main(["check", out, "--workers", "1"]) == 2  # check refuses it as a run does, in one line
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith(f"{repair}\n") and err.count("\n") == 1
    assert prepare.main(repair.split(" (")[0].split("python prepare.py ")[1].split()) == 0  # the advice, as given
    assert "packed 12 train images in 5 shards, 9 val images in 4 shards" in capsys.readouterr().out
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == files
    assert len(data.build_datasets(out, 32, 36)[0]) == 12


@pytest.mark.quick
def test_a_damaged_pack_json_gives_one_line_of_advice_not_a_recursion(pristine, tmp_path, capsys):
    root, clean, files = pristine
    out = str(tmp_path / "pack")
    shutil.copytree(clean, out)
    pathlib.Path(out, shards.PACK_HEAD).write_text("{not json")  # repair() reads it for its advice
    os.remove(os.path.join(out, shards.PACK_INDEX))
    repair = f"repair it with python prepare.py pack DATA {out} (DATA: the folder it was packed from) (it rewrites " \
             f"what is damaged)"
    with pytest.raises(DataError) as refusal:
        data.build_datasets(out, 32, 36)
    assert str(refusal.value).endswith(repair) and "\n" not in str(refusal.value)
    assert prepare.main(["check", out, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith(f"{repair}\n") and err.count("\n") == 1
    assert prepare.main(["pack", root, out, "--shard-size", "16kB"]) == 0  # and packing again rewrites pack.json
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == files


@pytest.mark.quick
def test_a_pack_is_checked_at_start_without_reading_it(pristine, tmp_path):
    root, clean, _ = pristine
    def read_so_far():  # bytes this process has read through system calls (Linux)
        return int(next(line for line in open("/proc/self/io") if line.startswith("rchar")).split()[1])
    if not os.path.exists("/proc/self/io"):
        pytest.skip("needs /proc/self/io (Linux)")
    shard_bytes = sum(os.path.getsize(os.path.join(clean, n)) for n in os.listdir(clean) if n.endswith(".tar"))
    small = sum(os.path.getsize(os.path.join(clean, n)) for n in os.listdir(clean) if not n.endswith(".tar"))
    before = read_so_far()
    data.build_datasets(clean, 32, 36)
    read = read_so_far() - before
    assert read < small + 9 * 2 * 512 + 16_384 < shard_bytes, (read, small, shard_bytes)  # two headers a shard


@pytest.mark.quick
def test_a_pack_of_an_earlier_version_is_upgraded_by_the_pack_command_without_rewriting_its_shards(pristine, tmp_path,
                                                                                                   capsys):
    root, clean, files = pristine
    out = str(tmp_path / "pack")
    shutil.copytree(clean, out)
    index = json.load(open(os.path.join(out, "index.json")))
    for entry in index["splits"].values():
        del entry["table_sha256"]  # what the earlier version wrote: no checksum, no pack.json
    json.dump(index, open(os.path.join(out, "index.json"), "w"))
    os.remove(os.path.join(out, "pack.json"))
    written = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.endswith(".tar")}
    with pytest.raises(DataError, match=f"val.npy is not the table the index lists .*: repair it with python prepare.py "
                                        f"pack {root} {out} --shard-size 16000"):
        data.build_datasets(out, 32, 36)
    assert prepare.main(["pack", root, out, "--shard-size", "16kB"]) == 0
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in written} == written
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == files
