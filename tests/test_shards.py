"""Packed shards (python data.py pack DATA OUT, then --data OUT): the same samples as the folders,
read by one positioned read each; packing that resumes and refuses what is not its own."""
import errno
import os
import subprocess
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
from conftest import make_folder, make_imagenet, photo
from data import DataError


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
    assert data.main(["pack", root, out, "--shard-size", "16kB"]) == 0
    printed = capsys.readouterr().out
    assert f"packed 12 train images in 5 shards, 9 val images in 4 shards into {out}" in printed
    assert f"skipped 1 files that are not images: {root}/train/a/notes.txt" in printed
    return root, out


def members(shard):
    """{name: bytes} of a tar file, by Python's tarfile: a reader that is not ShardFolder's."""
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_pack_round_trips_every_samples_bytes_and_label(packed):
    root, out = packed
    for split in ("train", "val"):
        folder, shards = data.ImageFolder(os.path.join(root, split), None), data.ShardFolder(out, split, None)
        assert shards.classes == folder.classes and len(shards.shards) > 1  # 16 kB: several shards
        assert all(os.path.getsize(shard) <= 16_000 for shard in shards.shards)  # --shard-size is the most
        assert [name for name, _ in shards.samples] == [os.path.relpath(p, folder.root) for p, _ in folder.samples]
        assert shards.skipped_files == folder.skipped_files
        in_tars = {}
        for shard in shards.shards:
            in_tars.update(members(shard))
        assert len(in_tars) == 2 * len(folder)
        for i, (path, label) in enumerate(folder.samples):
            source = open(path, "rb").read()
            assert shards.read(i)[0] == source and shards.samples[i][1] == label
            ext = ".png" if path.endswith(".png") else ".jpg"
            key = f"{i:08d}_{os.path.splitext(os.path.basename(path))[0].replace('.', '_')}"
            assert in_tars[key + ext] == source and in_tars[key + ".cls"] == str(label).encode()


def test_webdataset_and_tar_read_the_shards_as_the_folders(packed):
    webdataset = pytest.importorskip("webdataset")  # in requirements-dev; an optional extra to train
    root, out = packed
    shards = data.ShardFolder(out, "train", None)
    rows = list(webdataset.WebDataset(shards.shards, shardshuffle=False))
    folder = data.ImageFolder(os.path.join(root, "train"), None)
    assert len(rows) == len(folder)
    for row, (path, label) in zip(rows, folder.samples):
        content = row["png" if path.endswith(".png") else "jpg"]
        assert content == open(path, "rb").read() and int(row["cls"]) == label
    listed = subprocess.run(["tar", "tf", shards.shards[0]], capture_output=True, text=True, check=True).stdout.split()
    assert listed == list(members(shards.shards[0]))  # tar(1) lists what Python's tarfile reads


def test_training_and_eval_samples_from_shards_equal_the_folders(packed):
    root, out = packed
    a = data.build_datasets(root, 32, 36, seed=3, augment="randaugment")
    b = data.build_datasets(out, 32, 36, seed=3, augment="randaugment")
    for folder, shards in zip(a, b):
        assert isinstance(shards, data.ShardFolder) and len(shards) == len(folder)
        for item in [(i, 1) for i in range(len(folder))] + list(range(len(folder))):
            x, y = folder[item], shards[item]
            assert torch.equal(x[0], y[0]) and x[1] == y[1]
    loader = data.build_loader(b[0], data.TrainSampler(len(b[0]), 0, 1, seed=3), 4, workers=2, train=True)
    alone = data.build_loader(b[0], data.TrainSampler(len(b[0]), 0, 1, seed=3), 4, workers=0, train=True)
    batches = list(zip(loader, alone))
    assert len(batches) == len(loader) == len(alone) == len(b[0]) // 4
    for (x, y), (x0, y0) in batches:  # the workers' own shard descriptors read the same
        assert torch.equal(x, x0) and torch.equal(y, y0)


def test_pack_resumes_where_it_stopped_and_refuses_other_packs(tmp_path, monkeypatch, capsys):
    root = make_imagenet(tmp_path / "data", train=6, val=2)
    out, fresh = str(tmp_path / "pack"), str(tmp_path / "fresh")
    write_shard, written = data.write_shard, []

    def stop_at_the_third(path, plan, chunk):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path)
        write_shard(path, plan, chunk)
    monkeypatch.setattr(data, "write_shard", stop_at_the_third)
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 130
    assert "error: packing stopped; the same command continues it" in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, data.PACK_PROGRESS)) and not data.is_pack(out)
    kept = {path: os.stat(path).st_mtime_ns for path in written}
    open(os.path.join(out, ".train-000002.tar.tmp.12345"), "wb").write(b"what a killed packing left")
    monkeypatch.setattr(data, "write_shard", write_shard)
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    assert {path: os.stat(path).st_mtime_ns for path in written} == kept  # finished shards not rewritten
    assert data.main(["pack", root, fresh, "--shard-size", "8kB"]) == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))
    for name in os.listdir(fresh):  # a resumed pack is byte for byte the uninterrupted one
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(fresh, name), "rb").read(), name
    capsys.readouterr()
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    assert f"{out} already holds this pack" in capsys.readouterr().out
    os.truncate(written[1], 5120)  # a shard cut short after packing: the same command writes it again
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    assert "packed 18 train images" in capsys.readouterr().out
    assert open(written[1], "rb").read() == open(written[1].replace(out, fresh), "rb").read()
    assert data.main(["pack", root, out, "--shard-size", "9kB"]) == 2
    assert f"error: {out} holds the pack of other files or another --shard-size" in capsys.readouterr().err
    Image.fromarray(photo(20, 20)).save(os.path.join(root, "train", "a", "new.JPEG"))
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 2
    assert "holds the pack of other files" in capsys.readouterr().err
    assert data.main(["pack", root, os.path.join(root, "train")]) == 2  # a folder of other files
    assert "holds files that are not this pack's (a, b, c)" in capsys.readouterr().err
    assert data.is_pack(out) and len(data.ShardFolder(out, "train", None)) == 18  # the pack is untouched


def test_shard_reads_are_retried_reopened_and_counted(packed, monkeypatch):
    _, out = packed
    shards = data.ShardFolder(out, "val", None)
    expected = shards.read(0)[0]
    pread, opened, left = os.pread, [], [data.READ_ATTEMPTS - 1]

    def flaky_pread(fd, size, offset):
        if left[0] > 0:
            left[0] -= 1
            raise OSError(errno.ESTALE, "Stale file handle")
        return pread(fd, size, offset)
    monkeypatch.setattr(data, "READ_BACKOFF_SECONDS", 0.001)
    monkeypatch.setattr(data.os, "pread", flaky_pread)
    monkeypatch.setattr(data.os, "open", lambda *a, _open=os.open: opened.append(a[0]) or _open(*a))
    assert shards.read(0)[0] == expected and shards.read_retries.value == data.READ_ATTEMPTS - 1
    assert len(opened) == data.READ_ATTEMPTS - 1  # each retry opens the shard again; the last one is kept
    shards.read(1)
    assert len(opened) == data.READ_ATTEMPTS - 1 + (shards.shard_of[1] != shards.shard_of[0])
    left[0] = data.READ_ATTEMPTS
    name = f"{shards.samples[0][0]} in {shards.shards[0]}"
    with pytest.raises(DataError, match=f"cannot read image {name}: Stale file handle \\(4 attempts"):
        shards.read(0)


def test_a_process_keeps_at_most_max_open_shards_open(packed, monkeypatch):
    root, out = packed
    monkeypatch.setattr(data, "MAX_OPEN_SHARDS", 2)
    shards, folder = data.ShardFolder(out, "train", None), data.ImageFolder(os.path.join(root, "train"), None)
    assert len(shards.shards) == 5
    for i in [*range(len(shards)), *reversed(range(len(shards)))]:
        assert shards.read(i)[0] == open(folder.samples[i][0], "rb").read()
        assert len(shards.files) <= 2
    shards.close()
    assert shards.files == {}


def test_check_on_a_pack_finds_bad_samples_and_a_wrong_index(packed, capsys):
    root, out = packed
    assert data.main(["check", out, "--workers", "1"]) == 0
    result = capsys.readouterr().out
    assert "checked 21 samples: 0 undecodable, 4 odd formats; 1 files skipped as not images" in result
    assert "odd format (loads as RGB): b/cmyk.jpg in " in result
    shards = data.ShardFolder(out, "train", None)
    i = next(i for i, (name, _) in enumerate(shards.samples) if name == "a/a_1.jpeg")
    shard, offset = shards.shards[shards.shard_of[i]], int(shards.offsets[i])
    with open(shard, "r+b") as f:  # garbage over the JPEG's header: one undecodable sample
        f.seek(offset)
        f.write(b"\0" * 64)
    table = np.load(os.path.join(out, "val.npy"))
    table["offset"][[0, 1]] = table["offset"][[1, 0]]  # an index that points at the wrong samples
    np.save(os.path.join(out, "val.npy"), table)
    assert data.main(["check", out, "--workers", "2"]) == 1
    result = capsys.readouterr().out
    assert f"UNDECODABLE: a/a_1.jpeg in {shard}: UnidentifiedImageError" in result
    names = [f"{n:08d}_a_{n}" for n in (0, 1)]
    assert f"the shard holds {names[1]}.jpg" in result and f"index says {names[0]}.jpg" in result
    assert "checked 21 samples: 3 undecodable" in result


def test_a_missing_or_cut_shard_and_a_split_not_packed_are_named(tmp_path, capsys):
    make_folder(str(tmp_path / "data" / "val"), per_class=2)
    out = str(tmp_path / "pack")
    assert data.main(["pack", str(tmp_path / "data"), out]) == 0
    with pytest.raises(DataError, match="the pack .* has no train set .* had no train/ when it was packed"):
        data.build_datasets(out, 32, 36)
    assert len(data.build_datasets(out, 32, 36, with_train=False)[1]) == 6  # evaluation needs val alone
    shard = os.path.join(out, "val-000000.tar")
    os.truncate(shard, 10240)
    with pytest.raises(DataError, match=f"shard {shard} is 10,240 bytes, the index says .*: copy the pack again"):
        data.build_datasets(out, 32, 36, with_train=False)
    os.remove(shard)
    with pytest.raises(DataError, match=f"shard {shard} is missing"):
        data.build_datasets(out, 32, 36, with_train=False)


@pytest.mark.parametrize("text, size", [("1GB", 10 ** 9), ("500MB", 5 * 10 ** 8), ("256MiB", 2 ** 28),
                                        ("1.5kB", 1500), ("4096", 4096)])
def test_shard_sizes_read_as_people_write_them(text, size):
    assert data.parse_size(text) == size


def test_train_py_names_a_missing_shard_in_one_line(tmp_path):
    from test_train import run_train
    root = make_imagenet(tmp_path / "data")
    out = str(tmp_path / "pack")
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 0
    shard = data.ShardFolder(out, "train", None).shards[1]
    os.remove(shard)
    result = run_train(["--data", out, "--output-dir", tmp_path / "run", "--image-size", "32", "--epochs", "1"])
    assert result.returncode == 2 and not os.path.exists(tmp_path / "run")
    assert result.stderr.strip() == f"error: shard {shard} is missing: copy the pack again, or pack again into {out}"


def test_a_full_disk_while_packing_keeps_the_finished_shards_and_says_so(tmp_path, monkeypatch, capsys):
    root = make_imagenet(tmp_path / "data", train=6, val=2)
    out = str(tmp_path / "pack")
    add_member, calls = data.add_member, []

    def fills_the_disk(tar, name, content):
        calls.append(name)
        if len(calls) == 7:  # sample 3's image: 8 kB shards (below tar's 10 kB record) hold one sample each
            raise OSError(errno.ENOSPC, "No space left on device")
        add_member(tar, name, content)
    monkeypatch.setattr(data, "add_member", fills_the_disk)
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 5
    err = capsys.readouterr().err
    assert f"error: no space left in {os.path.abspath(out)} for train-000003.tar" in err and \
        "run the same command to continue" in err
    assert sorted(os.listdir(out)) == [data.PACK_PROGRESS] + [f"train-00000{n}.tar" for n in range(3)]  # no temporary
    monkeypatch.setattr(data, "add_member", add_member)
    assert data.main(["pack", root, out, "--shard-size", "8kB"]) == 0 and data.is_pack(out)
