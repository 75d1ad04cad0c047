"""After training: predict.py, --keep-best and average.py, export.py, their refusals of hostile input,
and the evaluation sets beyond ImageNet val (--class-map for ImageNet-V2's folders, --real-labels for
ReaL, --eval-flip). References are computed here, independently: torchvision's transforms, eager
models, hand counts."""
import csv
import errno
import glob
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image

import average
import checkpoints
import export
import predict
import train
import utils
from conftest import ROOT, calibrate_bn_, make_folder, make_imagenet, photo, randomize_
from efficientnet import create_model
from test_train import last_json, read_metrics, run_train

# 32 px, eval resize 36 -> 32: the checkpoints below store these settings.
TINY = ["--image-size", "32", "--val-resize", "36", "--batch-size", "4", "--workers", "0"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def main(args, command=train):
    """`command`.main (train.py's, or predict's, average's, export's) in this process."""
    return command.main([str(a) for a in args])


def eval_transform(size=32, resize=36):
    """torchvision's eval pipeline: what predict.py and --evaluate must reproduce."""
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(MEAN, STD)])


def eager_logits(model, paths, transform=None):
    """The logits of `model` (in its mode: eval unless it was set to train) for the image files."""
    images = torch.stack([(transform or eval_transform())(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return model(images)


def model_of(checkpoint_path, key="model"):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    model = create_model(checkpoint["args"]["arch"], checkpoint["args"]["num_classes"])
    model.load_state_dict(checkpoint[key])
    return model.eval()


def read_csv(text):
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    # 3 classes: 4 train images each, 3 val images each (9: uneven over 2 ranks).
    return make_imagenet(tmp_path_factory.mktemp("data"), train=4, val=3)


@pytest.fixture(scope="module")
def run_dir(data_root, tmp_path_factory):
    """A 3-epoch run (one step each) keeping its 2 best epoch-end checkpoints, with an EMA."""
    out = tmp_path_factory.mktemp("run")
    assert main(["--data", data_root, *TINY, "--epochs", 3, "--warmup-epochs", 1, "--steps-per-epoch", 1,
                 "--ema-decay", 0.9, "--keep-best", 2, "--output-dir", out]) == 0
    return out


@pytest.fixture(scope="module")
def varied(run_dir, data_root, tmp_path_factory):
    """The run's last.pt with weights whose predictions differ from image to image (a run of three
    steps predicts one class for all): random, BatchNorm statistics those of the val images."""
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    model = randomize_(create_model("b0", num_classes=3, drop_path_rate=0.0), seed=0)  # deterministic in train mode
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
    images = sorted(glob.glob(os.path.join(data_root, "val", "*", "*")))
    eager_logits(model.train(), images)
    checkpoint.update(model=model.state_dict(), ema=None)
    path = tmp_path_factory.mktemp("varied") / "varied.pt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """Cheap inputs: two images, 3-class weights for 32 px, two tiny checkpoints for average.py and a
    run folder whose files are text (what makes a folder a run is its last.pt)."""
    root = tmp_path_factory.mktemp("small")
    make_folder(str(root / "images"), classes=("x",), per_class=2)
    model = calibrate_bn_(randomize_(create_model("b0", num_classes=3), seed=2), size=32, seed=2)
    torch.save(model.state_dict(), root / "w.pth")
    for epoch in (1, 2):
        torch.save({"model": {"w": torch.full((2,), float(epoch))}, "args": {"arch": "b0", "num_classes": 3},
                    "epoch": epoch}, root / f"c{epoch}.pt")
    os.makedirs(root / "run")
    for name in ("last.pt", "metrics.jsonl"):
        (root / "run" / name).write_text(name)
    return root


def command_line(command, small, output):
    """A command of each kind that writes `output` from the small inputs."""
    return {predict: [small / "images", "--weights", small / "w.pth", "--image-size", 32, "--val-resize", 36,
                      "--workers", 0, "--top-k", 3, "--output", output],
            average: [small / "c1.pt", small / "c2.pt", "--output", output],
            export: [output, "--weights", small / "w.pth", "--image-size", 32, "--val-resize", 36]}[command]


# ------------------------------------------------------------------------------ --keep-best

def test_keep_best_keeps_the_best_epochs_of_the_metrics(run_dir):
    rows = read_metrics(run_dir)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    ranked = sorted(rows, key=lambda row: (-row["val_top1"], row["epoch"]))  # ties: the earlier epoch
    kept = sorted(name for name in os.listdir(run_dir) if name.startswith("best-epoch"))
    assert kept == sorted(f"best-epoch{row['epoch']}.pt" for row in ranked[:2])
    best = torch.load(run_dir / "best.pt", weights_only=True)
    top = torch.load(run_dir / f"best-epoch{ranked[0]['epoch']}.pt", weights_only=True)
    assert best["epoch"] == top["epoch"] == ranked[0]["epoch"]
    assert all(torch.equal(best["model"][k], v) for k, v in top["model"].items())
    assert all(set(row) == set(rows[0]) for row in rows)  # the metrics rows carry nothing of it


def test_keep_best_links_the_new_epoch_in_and_deletes_the_ones_that_fall_out(tmp_path):
    for epoch in (1, 2):
        (tmp_path / f"best-epoch{epoch}.pt").write_text(f"epoch {epoch}")
    (tmp_path / "best-epoch2.pt.bak").write_text("not one of them")
    (tmp_path / "last.pt").write_text("epoch 3")
    history = [{"epoch": 1, "val_top1": 50.0}, {"epoch": 2, "val_top1": 40.0}, {"epoch": 3, "val_top1": 60.0}]
    checkpoints.keep_best_checkpoints(str(tmp_path), history, 2, str(tmp_path / "last.pt"))
    assert sorted(p.name for p in tmp_path.glob("best-epoch*")) == ["best-epoch1.pt", "best-epoch2.pt.bak",
                                                                    "best-epoch3.pt"]
    assert (tmp_path / "best-epoch3.pt").read_text() == "epoch 3"
    # An epoch that is not better than the kept ones (a tie goes to the earlier) changes nothing;
    # an unevaluated one neither.
    (tmp_path / "last.pt").write_text("epoch 4")
    history += [{"epoch": 4, "val_top1": 50.0}, {"epoch": 5}]
    checkpoints.keep_best_checkpoints(str(tmp_path), history[:4], 2, str(tmp_path / "last.pt"))
    checkpoints.keep_best_checkpoints(str(tmp_path), history, 2, str(tmp_path / "last.pt"))
    assert sorted(p.name for p in tmp_path.glob("best-epoch*.pt")) == ["best-epoch1.pt", "best-epoch3.pt"]
    assert (tmp_path / "best-epoch1.pt").read_text() == "epoch 1"


# -------------------------------------------------------------------------------- predict.py

def test_predict_agrees_with_evaluate_image_for_image(varied, data_root, tmp_path, capsys):
    val = os.path.join(data_root, "val")
    assert main([val, "--checkpoint", varied, "--workers", 0, "--output", tmp_path / "p.csv"], predict) == 0
    rows = read_csv((tmp_path / "p.csv").read_text())
    paths = sorted(os.path.join(val, c, f) for c in "abc" for f in os.listdir(os.path.join(val, c)))
    assert [row["path"] for row in rows] == paths
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "error"]
    probs = eager_logits(model_of(varied), paths).softmax(1)
    order = probs.argsort(1, descending=True)
    assert len({row["class_1"] for row in rows}) > 1  # a model that tells the images apart
    for row, p, o in zip(rows, probs, order):
        assert [row[f"class_{i}"] for i in (1, 2, 3)] == ["abc"[c] for c in o]
        assert [float(row[f"prob_{i}"]) for i in (1, 2, 3)] == pytest.approx(p[o].tolist(), abs=1e-4)
        assert row["error"] == ""
    capsys.readouterr()
    assert main(["--evaluate", "--resume", varied, "--workers", 0]) == 0
    ours = last_json(capsys.readouterr().out)
    hits = [row["class_1"] == os.path.basename(os.path.dirname(row["path"])) for row in rows]
    assert 0 < sum(hits) < len(hits)
    assert ours["top1"] == pytest.approx(100 * sum(hits) / len(hits))
    # stdout (the default) carries the same CSV and nothing else; JSON lines hold the same figures.
    assert main([val, "--checkpoint", varied, "--workers", 0, "--top-k", 2], predict) == 0
    out = capsys.readouterr()
    assert [[r["class_1"], r["class_2"]] for r in read_csv(out.out)] == [[r["class_1"], r["class_2"]] for r in rows]
    assert "predicted 9 files (0 could not be read or decoded)" in out.err
    assert main([val, "--checkpoint", varied, "--workers", 0, "--output", tmp_path / "p.jsonl"], predict) == 0
    objects = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [o["classes"] for o in objects] == [[r[f"class_{i}"] for i in (1, 2, 3)] for r in rows]
    assert [o["probs"] for o in objects] == [pytest.approx(p[o].tolist(), abs=1e-4) for p, o in zip(probs, order)]


def test_eval_flip_averages_the_softmax_of_each_image_and_its_mirror(varied, data_root, tmp_path, capsys):
    val = os.path.join(data_root, "val")
    dataset = torchvision.datasets.ImageFolder(val, eval_transform())
    images, labels = torch.stack([x for x, _ in dataset]), torch.tensor([y for _, y in dataset])
    model = model_of(varied)
    with torch.no_grad():
        probs = (model(images).softmax(1) + model(images.flip(3)).softmax(1)) / 2
    assert main(["--evaluate", "--resume", varied, "--workers", 0, "--eval-flip"]) == 0
    ours = last_json(capsys.readouterr().out)
    assert ours["top1"] == pytest.approx(100 * (probs.argmax(1) == labels).float().mean().item())
    assert ours["loss"] == pytest.approx(-probs[torch.arange(9), labels].log().mean().item(), rel=1e-5)
    assert main([val, "--checkpoint", varied, "--workers", 0, "--eval-flip", "--top-k", 1,
                 "--output", tmp_path / "p.jsonl"], predict) == 0
    objects = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [o["probs"][0] for o in objects] == pytest.approx(probs.max(1).values.tolist(), abs=1e-4)


def test_predict_names_imagenet_classes_for_1000_class_weights(tmp_path, capsys):
    folder = make_folder(str(tmp_path / "images"), classes=("x",), per_class=2)
    model = calibrate_bn_(randomize_(create_model("b0"), seed=4), size=32, seed=4)
    torch.save(model.state_dict(), tmp_path / "imagenet.pth")
    small = calibrate_bn_(randomize_(create_model("b0", num_classes=5), seed=5), size=32, seed=5)
    torch.save(small.state_dict(), tmp_path / "five.pth")
    names = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(names) == 1000 and names[0] == "tench"
    flags = [folder, "--image-size", 32, "--val-resize", 36, "--workers", 0, "--top-k", 3]
    assert main([*flags, "--weights", tmp_path / "imagenet.pth"], predict) == 0
    rows = read_csv(capsys.readouterr().out)
    paths = [row["path"] for row in rows]
    expected = eager_logits(model, paths).topk(3, 1).indices
    assert [[row[f"class_{i}"] for i in (1, 2, 3)] for row in rows] == [[names[c] for c in top] for top in expected.tolist()]
    # Other class counts without a checkpoint's names: the label indices.
    assert main([*flags, "--weights", tmp_path / "five.pth"], predict) == 0
    rows = read_csv(capsys.readouterr().out)
    expected = eager_logits(small, paths).topk(3, 1).indices
    assert [[row[f"class_{i}"] for i in (1, 2, 3)] for row in rows] == [[str(c) for c in top] for top in expected.tolist()]
    # A note while the model loads (here: the name looks like Google's TF weights) goes to stderr.
    torch.save(small.state_dict(), tmp_path / "tf_five.pth")
    assert main([*flags, "--weights", tmp_path / "tf_five.pth"], predict) == 0
    printed = capsys.readouterr()
    assert read_csv(printed.out) == rows and printed.out.startswith("path,") and "warning:" in printed.err


def test_predict_reports_an_undecodable_file_and_predicts_the_others(varied, tmp_path):
    folder = make_folder(str(tmp_path / "images"), classes=("x",), per_class=2)
    (tmp_path / "images" / "x" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    (tmp_path / "list.txt").write_text("images/x/x_1.jpeg\n\nimages/x/gone.jpeg\n")
    assert main([folder, tmp_path / "list.txt", "--checkpoint", varied, "--workers", 1, "--batch-size", 4,
                 "--output", tmp_path / "p.csv"], predict) == 0  # x_1 twice in one batch: the same figures
    rows = read_csv((tmp_path / "p.csv").read_text())
    names = [os.path.relpath(row["path"], tmp_path) for row in rows]
    assert names == ["images/x/broken.jpg", "images/x/x_0.jpeg", "images/x/x_1.jpeg", "images/x/x_1.jpeg",
                     "images/x/gone.jpeg"]
    assert rows[0]["error"].startswith("cannot decode image") and rows[0]["class_1"] == rows[0]["prob_1"] == ""
    assert rows[4]["error"].startswith("cannot read image") and "No such file" in rows[4]["error"]
    assert all(row["error"] == "" and row["class_1"] in ("a", "b", "c") for row in rows[1:4])
    assert rows[2]["class_1"] == rows[3]["class_1"] and rows[2]["prob_1"] == rows[3]["prob_1"]


def one_line(capsys, message):
    """What the command said on stderr: one `error:` line holding `message`, no traceback."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    return err


@pytest.mark.quick
def test_predict_usage_errors_are_one_line(small, tmp_path, capsys):
    for args, message in [([tmp_path / "none"], f"{tmp_path / 'none'} does not exist"),
                          ([tmp_path, "--output", tmp_path / "p.txt"], "FILE.csv or FILE.jsonl"),
                          ([tmp_path, "--weights", small / "w.pth"], "give --checkpoint CKPT or --weights FILE, not both"),
                          ([tmp_path, "--top-k", 0], "--top-k must be positive, got 0"),
                          ([small / "images", "--image-size", 40, "--val-resize", 36],
                           "--val-resize 36 is smaller than --image-size 40")]:
        assert main([*args, "--checkpoint", small / "c1.pt"], predict) == 2
        one_line(capsys, message)
    assert main([tmp_path], predict) == 2
    one_line(capsys, "needs --checkpoint CKPT (a train.py checkpoint) or --weights FILE")


def test_the_old_train_py_flags_name_the_new_commands(capsys):
    """A real process for the exit code; --average and --export in this one."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--predict", "x"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --predict is its own command now: python predict.py PATH ... --checkpoint CKPT " \
                            "(see train.py --help)\n"
    for flag, command in [("--average", "python average.py RUN ... --output FILE"),
                          ("--export", "python export.py FILE.pt2 --checkpoint CKPT")]:
        with pytest.raises(SystemExit) as info:
            main([flag, "x"])
        assert info.value.code == 2
        one_line(capsys, f"{flag} is its own command now: {command}")


def test_predict_into_a_pipe_closed_early_stops_without_a_word(small):
    """`python predict.py ... | head -1`: the reader leaves; exit 141 (128 + SIGPIPE), as Unix tools
    do, and no traceback or 'Exception ignored' from the flush at exit."""
    child = subprocess.Popen([sys.executable, os.path.join(ROOT, "predict.py"), *map(str, command_line(
        predict, small, "x")[:-2])], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    child.stdout.close()
    assert child.wait(timeout=120) == 141
    err = child.stderr.read()
    assert "Traceback" not in err and "Exception" not in err and "error" not in err, err


@pytest.mark.quick
@pytest.mark.parametrize("command", [predict, average, export])
def test_each_command_has_a_short_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"], command)
    out = capsys.readouterr().out
    assert info.value.code == 0 and out.startswith(f"usage: python {command.__name__}.py ")
    assert len(out.splitlines()) <= 40, out  # predict.py's 39: flags.py's shared model and device flags are 27


# ------------------------------------------------------- hostile input to predict, average, export

@pytest.mark.quick
@pytest.mark.parametrize("command, name", [(predict, "p.csv"), (average, "avg.pt"), (export, "m.pt2")],
                         ids=["predict", "average", "export"])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(command, name, small, tmp_path, capsys,
                                                                     monkeypatch):
    """Checked before the model is read: a missing model file would be named otherwise."""
    flag = "export.py" if command is export else "--output"
    (tmp_path / "file").write_text("a file")
    (tmp_path / name).mkdir()
    (tmp_path / f"link-{name}").symlink_to(tmp_path / "nowhere")
    for output, problem in [(tmp_path / "file" / name, f"is in {tmp_path / 'file'}, which is a file"),
                            (tmp_path / "none" / name, f"is in {tmp_path / 'none'}, which is not there"),
                            (tmp_path / name, "is a folder"), (tmp_path / f"link-{name}", "is a broken link")]:
        args = [str(a).replace("w.pth", "missing.pth").replace("c1.pt", "missing.pt")
                for a in command_line(command, small, output)]
        assert main(args, command) == 2
        one_line(capsys, f"{flag} {output} {problem}: name a file in a folder you can write")
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder, whoever runs the test
    assert main(command_line(command, small, tmp_path / "out" / name), command) == 2
    one_line(capsys, f"is in {tmp_path / 'out'}, where this process may not write")


@pytest.mark.quick
@pytest.mark.parametrize("command, name", [(predict, "p.csv"), (average, "avg.pt"), (export, "m.pt2")],
                         ids=["predict", "average", "export"])
@pytest.mark.parametrize("code", [errno.EROFS, errno.ENOSPC], ids=["read-only", "full"])
def test_a_write_that_fails_is_one_line_and_leaves_the_old_file(command, name, code, small, tmp_path, capsys,
                                                                monkeypatch):
    """Past the checks, the file system refuses the write (read-only: exit 2, full: exit 5): one
    line, the file that was there kept as it was, no temporary left."""
    exit_code, said = {errno.EROFS: (2, "cannot write {output} (Read-only file system): write it elsewhere"),
                       errno.ENOSPC: (5, "no space left in {folder} for {name}")}[code]
    output = tmp_path / name
    output.write_text("before")
    if command is export:  # torch.export is tested below; here the model itself stands in for the program
        monkeypatch.setattr(export, "write_pt2", lambda model, example, shapes, path: open(path, "wb").close() or model)

    def refuse(src, dst):
        raise OSError(code, os.strerror(code), src)
    monkeypatch.setattr(os, "replace", refuse)
    assert main(command_line(command, small, output), command) == exit_code
    one_line(capsys, said.format(output=output, folder=tmp_path, name=name))
    assert sorted(os.listdir(tmp_path)) == [name] and output.read_text() == "before"


@pytest.mark.quick
@pytest.mark.parametrize("command, where", [(predict, "class_scores"), (average, "add_state"), (export, "load_model")])
def test_ctrl_c_is_one_line_exit_130_and_writes_nothing(command, where, small, tmp_path, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(command, where, interrupt)
    output = tmp_path / {predict: "p.csv", average: "avg.pt", export: "m.pt2"}[command]
    assert main(command_line(command, small, output), command) == 130
    assert capsys.readouterr().err == f"error: interrupted: nothing written to {output}; run the same command again\n"
    assert os.listdir(tmp_path) == []
    if command is predict:  # the CSV on stdout
        assert main(command_line(command, small, output)[:-2], command) == 130
        one_line(capsys, "interrupted: the predictions on stdout stop early; run the same command again")


@pytest.mark.quick
def test_missing_or_corrupt_model_files_and_sources_are_one_line(small, tmp_path, capsys):
    none, junk, cut = tmp_path / "none.pt", tmp_path / "junk.pt", tmp_path / "cut.pt"
    junk.write_bytes(b"not a torch file at all")
    cut.write_bytes((small / "w.pth").read_bytes()[:5000])
    images, out, to = small / "images", tmp_path / "m.pt2", ["--output", tmp_path / "a.pt"]
    for command, args, message in [
            (predict, [images, "--checkpoint", none], f"checkpoint {none} does not exist"),
            (predict, [images, "--weights", junk], f"--weights file {junk} is not a file that torch.save wrote"),
            (predict, [images, "--weights", small / "w.pth", "--checkpoint", small / "c1.pt"], "not both"),
            (export, [out, "--checkpoint", cut], f"checkpoint {cut} is corrupt or truncated"),
            (export, [out, "--checkpoint", small / "w.pth"], "is not a train.py checkpoint (bare weights go to"),
            (export, [out], "needs --checkpoint CKPT (a train.py checkpoint) or --weights FILE"),
            (export, [tmp_path / "m.pt", "--weights", small / "w.pth"], "the file must be FILE.pt2"),
            (average, [small / "c1.pt", cut, *to], f"checkpoint {cut} is corrupt or truncated"),
            (average, [small / "c1.pt", small / "w.pth", *to], "is not a train.py checkpoint"),
            (average, [small / "c1.pt", small / "c1.pt", *to], "needs two or more checkpoints")]:
        assert main(args, command) == 2, args
        one_line(capsys, message)
    assert sorted(os.listdir(tmp_path)) == ["cut.pt", "junk.pt"]


@pytest.mark.quick
def test_predict_and_export_never_write_over_their_inputs_or_a_run(small, tmp_path, capsys):
    photo, metrics = tmp_path / "photo.csv", small / "run" / "metrics.jsonl"
    photo.write_bytes((small / "images" / "x" / "x_0.jpeg").read_bytes())  # an image, oddly named
    (tmp_path / "w.pt2").write_bytes((small / "w.pth").read_bytes())  # weights, oddly named
    before = {p: p.read_bytes() for p in [photo, tmp_path / "w.pt2", *(small / "run").iterdir()]}
    for command, args, message in [
            (predict, [photo, "--output", photo], f"--output {photo} is one of the inputs"),
            (predict, [small / "images", "--output", metrics], f"--output {metrics} is a file of the run"),
            (export, [tmp_path / "w.pt2"], f"export.py {tmp_path / 'w.pt2'} is one of the inputs")]:
        assert main([*args, "--weights", tmp_path / "w.pt2"], command) == 2
        assert "; write elsewhere, e.g. " in one_line(capsys, message)
    assert {p: p.read_bytes() for p in before} == before


# -------------------------------------------------------------------------------- average.py

def test_average_is_the_mean_tensor_for_tensor(run_dir, data_root, tmp_path, capsys):
    kept = sorted(run_dir.glob("best-epoch*.pt"))
    assert len(kept) == 2
    first, second = (torch.load(p, weights_only=True) for p in kept)
    assert main([run_dir, "--output", tmp_path / "avg.pt"], average) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"1/2 {kept[0]}: epoch {first['epoch']}") and lines[1].startswith(f"2/2 {kept[1]}")
    assert "49 integer buffers (num_batches_tracked) as their largest value" in lines[2]
    assert "EMA averaged" in lines[2] and "not recomputed" in lines[2]
    averaged = torch.load(tmp_path / "avg.pt", weights_only=True)
    for key in ("model", "ema"):
        a, b, mean = first[key], second[key], averaged[key]
        assert set(mean) == set(a)
        for name, tensor in mean.items():
            if tensor.is_floating_point():
                assert tensor.dtype == a[name].dtype
                torch.testing.assert_close(tensor, (a[name] + b[name]) / 2, rtol=0, atol=0)
            else:
                assert torch.equal(tensor, torch.maximum(a[name], b[name]))
    assert any(not torch.equal(first["model"][k], second["model"][k]) for k in first["model"])
    assert averaged["model"]["stem_bn.num_batches_tracked"] == second["model"]["stem_bn.num_batches_tracked"] > 1
    newest = max((first, second), key=lambda c: c["step"])
    assert averaged["args"] == newest["args"] and averaged["classes"] == newest["classes"] == ["a", "b", "c"]
    assert "optimizer" not in averaged and len(averaged["averaged_from"]) == 2

    # It evaluates (its EMA too) and fine-tunes like any checkpoint; continuing it is refused.
    assert main(["--evaluate", "--resume", tmp_path / "avg.pt", "--workers", 0]) == 0
    figures = last_json(capsys.readouterr().out)
    assert figures["images"] == 9 and "ema_top1" in figures
    assert main(["--resume", tmp_path / "avg.pt", "--output-dir", tmp_path / "go-on"]) == 2
    assert "has no optimizer state" in capsys.readouterr().err
    assert main(["--data", data_root, *TINY, "--weights", tmp_path / "avg.pt", "--epochs", 1, "--steps-per-epoch", 1,
                 "--eval-every", 0, "--output-dir", tmp_path / "fine-tune"]) == 0
    assert torch.load(tmp_path / "fine-tune" / "last.pt", weights_only=True)["args"]["weights"] == str(tmp_path / "avg.pt")


def test_average_refuses_checkpoints_of_another_model(run_dir, tmp_path, capsys):
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    renamed = dict(checkpoint, classes=["a", "b", "d"])
    torch.save(renamed, tmp_path / "renamed.pt")
    other = dict(checkpoint, args=dict(checkpoint["args"], arch="b1"))
    torch.save(other, tmp_path / "b1.pt")
    for path, word in [(tmp_path / "renamed.pt", "classes"), (tmp_path / "b1.pt", "arch")]:
        assert main([run_dir / "last.pt", path, "--output", tmp_path / "avg.pt"], average) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot average {path}") and f"another {word}" in err and err.count("\n") == 1
    assert not (tmp_path / "avg.pt").exists()


def test_average_never_writes_over_a_file_the_run_needs(run_dir, tmp_path, capsys):
    """The data-loss case: --output naming the run's own last.pt (or any input, by any spelling)
    is refused before any work, the run folder byte-identical afterwards, and the run resumes."""
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    (tmp_path / "link.pt").symlink_to(run_dir / "best.pt")
    for inputs, output in [([run_dir], run_dir / "last.pt"), ([run_dir], run_dir / "best.pt"),
                           ([run_dir / "last.pt", run_dir / "best.pt"], tmp_path / "link.pt"),
                           ([run_dir], run_dir / "metrics.jsonl")]:
        assert main([*inputs, "--output", output], average) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --output {output} is ") and err.count("\n") == 1 and "write elsewhere" in err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    # A folder and one of its own files, or a link to one (best.pt is a hard link of the best
    # epoch's checkpoint), count once: the folder's two checkpoints, not four inputs.
    kept = sorted(run_dir.glob("best-epoch*.pt"))
    assert main([run_dir, kept[0], tmp_path / "link.pt", "--output", tmp_path / "avg.pt"], average) == 0
    out = capsys.readouterr().out
    assert "averaged 2 checkpoints" in out and "2/2" in out and "/3" not in out and "/4" not in out
    assert main(["--evaluate", "--resume", run_dir / "last.pt", "--workers", 0]) == 0


def test_average_onto_a_full_disk_says_so_in_one_line_exit_5(run_dir, tmp_path, monkeypatch, capsys):
    def full(state, path):
        raise utils.DiskFull(f"no space left in {tmp_path} for avg.pt: it needs about 81 MB, 2 MB are free")
    monkeypatch.setattr(utils, "save_atomic", full)
    assert main([run_dir / "last.pt", run_dir / "best.pt", "--output", tmp_path / "avg.pt"], average) == 5
    err = capsys.readouterr().err
    assert err == (f"error: no space left in {tmp_path} for avg.pt: it needs about 81 MB, 2 MB are free. Free space "
                   f"there, then run the same command again\n")


def test_an_export_that_differs_from_eager_is_refused_in_one_line():
    x = torch.ones(2, 3)
    export.check_exported(lambda batch: batch + 1e-4, [x], [x], "m.pt2")  # within the tolerance
    with pytest.raises(utils.UsageError, match=r"the exported model \(m.pt2\) differs from eager by 0.01 .* on a "
                                               r"2x3 input, more than 0.001; not written: export the other format"):
        export.check_exported(lambda batch: batch + 0.01, [x], [x], "m.pt2")


# --------------------------------------------------------------------------------- export.py

@pytest.fixture(scope="module")
def exportable(run_dir, tmp_path_factory):
    """The run's last.pt with random weights whose BatchNorm statistics are those of random 64 px
    inputs, the export check's (the val images' statistics make random inputs' logits explode)."""
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    model = calibrate_bn_(randomize_(create_model("b0", num_classes=3, drop_path_rate=0.0), seed=1), size=64, seed=1)
    checkpoint.update(model=model.state_dict(), ema=None)
    path = tmp_path_factory.mktemp("exportable") / "exportable.pt"
    torch.save(checkpoint, path)
    return path


def test_export_pt2_equals_eager_for_two_batch_sizes(exportable, tmp_path, capsys):
    path = tmp_path / "model.pt2"
    assert main([path, "--checkpoint", exportable, "--image-size", 64], export) == 0  # 64 px: dynamic height, width
    assert "dynamic batch, height and width" in capsys.readouterr().out
    program = torch.export.load(str(path)).module()
    model = model_of(exportable)
    for shape in [(1, 3, 64, 64), (4, 3, 64, 64), (2, 3, 96, 72)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-4)
    beside = json.loads((tmp_path / "model.pt2.json").read_text())
    assert beside["classes"] == ["a", "b", "c"] and beside["arch"] == "b0"
    assert (beside["image_size"], beside["val_resize"], beside["val_interpolation"]) == (64, 96, "bicubic")
    assert beside["mean"] == list(MEAN) and beside["std"] == list(STD)
    assert beside["dynamic"] == {"batch": [1, 4096], "height": [64, 4096], "width": [64, 4096]}
    assert sorted(os.listdir(tmp_path)) == ["model.pt2", "model.pt2.json"]  # no temporary left


def test_export_onnx_without_its_packages_names_them_in_one_line(exportable, tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.onnx"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    assert main([path, "--checkpoint", exportable], export) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install onnx onnxscript" in err
    assert not path.exists()


def test_export_onnx_equals_eager(exportable, tmp_path):
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name)
    path = tmp_path / "model.onnx"
    onnxruntime = pytest.importorskip("onnxruntime")
    assert main([path, "--checkpoint", exportable, "--image-size", 64], export) == 0
    session = onnxruntime.InferenceSession(str(path))
    model = model_of(exportable)
    for shape in [(1, 3, 64, 64), (3, 3, 80, 64)]:
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=0, atol=1e-4)
    assert json.loads((tmp_path / "model.onnx.json").read_text())["format"] == "onnx"


# ------------------------------------------------------------------- ImageNet-V2, ReaL

def test_imagenet_v2_folders_evaluate_with_the_index_map(tmp_path, capsys):
    # Folders 0..10 as ImageNet-V2's; the model predicts class 7 for every image. Labelled by
    # folder number, the 3 images of folder "7" are right; by sorted name ("0", "1", "10", "2",
    # ...) label 7 is folder "6", whose 1 image would count instead.
    names = [str(i) for i in range(11)]
    for name in names:
        make_folder(str(tmp_path / "v2" / "val"), classes=(name,), per_class=3 if name == "7" else 1)
    model = create_model("b0", num_classes=11)
    with torch.no_grad():
        model.classifier.bias[7] = 100.0
    torch.save(model.state_dict(), tmp_path / "w.pth")
    (tmp_path / "numeric.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "reversed.txt").write_text("\n".join(reversed(names)) + "\n")  # label 7 is folder "3"
    flags = ["--evaluate", "--weights", tmp_path / "w.pth", "--data", tmp_path / "v2", "--image-size", 32,
             "--val-resize", 32, "--batch-size", 4, "--workers", 0]
    for class_map, hits in [("imagenet-index", 3), (tmp_path / "numeric.txt", 3), (tmp_path / "reversed.txt", 1),
                            (None, 1)]:
        assert main([*flags, *(["--class-map", class_map] if class_map else [])]) == 0
        figures = last_json(capsys.readouterr().out)
        assert figures["images"] == 13 and figures["top1"] == pytest.approx(100 * hits / 13), class_map
    make_folder(str(tmp_path / "v2" / "val"), classes=("cat",), per_class=1)
    assert main([*flags, "--class-map", "imagenet-index"]) == 2
    assert "needs folders named by their label" in capsys.readouterr().err


@pytest.fixture(scope="module")
def real_set(varied, tmp_path_factory):
    """A val set of ILSVRC2012_val_0000000{1..9}.JPEG spread over the class folders out of name
    order, and a real.json made from the model's own predictions: 2 images without labels, 4 whose
    labels include the top-1, 3 whose labels do not: real_top1 = 4 / 7 by construction."""
    root = tmp_path_factory.mktemp("real")
    folders = {"a": (3, 7, 9), "b": (1, 5, 8), "c": (2, 4, 6)}
    paths = {}
    for name, numbers in folders.items():
        os.makedirs(root / "val" / name)
        for n in numbers:
            paths[n] = root / "val" / name / f"ILSVRC2012_val_{n:08d}.JPEG"
            Image.fromarray(photo(48, 40, seed=10 + n)).save(paths[n], "JPEG")
    top1 = eager_logits(model_of(varied), [paths[n] for n in range(1, 10)]).argmax(1).tolist()
    real = [[], []] + [[p, (p + 1) % 3] for p in top1[2:6]] + [[(p + 1) % 3] for p in top1[6:8]] + [[(top1[8] + 1) % 3, (top1[8] + 2) % 3]]
    (root / "real.json").write_text(json.dumps(real))
    return root


@pytest.mark.parametrize("nproc", [None, 2])
def test_real_top1_equals_a_hand_count(varied, real_set, nproc, capsys):
    args = ["--evaluate", "--resume", varied, "--data", real_set, "--workers", 0, "--real-labels",
            real_set / "real.json"]
    if nproc is None:
        assert main(args) == 0
        figures = last_json(capsys.readouterr().out)
    else:
        result = run_train(args, nproc=nproc)
        assert result.returncode == 0, result.stderr
        figures = last_json(result.stdout)
    assert figures["real_images"] == 7 and figures["images"] == 9
    assert figures["real_top1"] == pytest.approx(100 * 4 / 7)


def test_real_labels_that_do_not_fit_are_refused(varied, real_set, tmp_path, capsys):
    for real, message in [([[0]] * 8, "labels 8 images but the val set has 9"),
                          ([[0]] * 8 + [[3]], "entry 8 (ILSVRC2012_val_00000009.JPEG) is [3]")]:
        (tmp_path / "real.json").write_text(json.dumps(real))
        assert main(["--evaluate", "--resume", varied, "--data", real_set, "--workers", 0, "--real-labels",
                     tmp_path / "real.json"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
