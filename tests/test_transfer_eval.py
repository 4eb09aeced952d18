"""``evaluate --adv-from`` (a saved set measured on other models), its trust checks, the
ensemble CLI and its resume key, and ``scripts/transfer_matrix.py``; all offline, on tiny
JPEG folders with seeded random resnet18 checkpoints and the factories of test_ensemble."""

from __future__ import annotations

import json

import pytest
from fakes import load_script, write_checkpoint, write_imagenet_folder
from PIL import Image

from advtune.cli import main
from advtune.errors import UserError
from advtune.models import load_model
from advtune.run.transfer_eval import (
    evaluate_saved,
    load_saved_set,
    preprocess_from_record,
    transfer_matrix,
)
from advtune.storage import read_json, read_manifest

pytestmark = pytest.mark.filterwarnings("ignore:weights='random'")

SIZE = 32


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    # A plain folder (no labels): the labels are the surrogate's clean predictions, so
    # its clean accuracy is 1 and success rates are not empty (random weights would
    # classify the ImageNet folder's 3 classes wrong: no image would count).
    base = tmp_path_factory.mktemp("data")
    tree = write_imagenet_folder(base / "tree")
    flat = base / "flat"
    flat.mkdir()
    for path in sorted(tree.rglob("*.JPEG")):
        (flat / path.name).write_bytes(path.read_bytes())
    return flat


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    return write_checkpoint(base / "a.pt", seed=0), write_checkpoint(base / "b.pt", seed=1)


def _common(data, *more):
    return ["--data", str(data), "--image-size", str(SIZE), "--batch-size", "4",
            "--workers", "0", "-q", *more]  # fmt: skip


def _generate(data, ckpt, out, *more):
    argv = ["generate", "--model", "resnet18", "--weights", str(ckpt), "--attack", "pgd",
            "--eps", "1/255", "--steps", "1", "--step-size", "1/255", "--out", str(out),
            *_common(data, *more)]  # fmt: skip
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def run_a(imagenet, ckpts, tmp_path_factory):
    return _generate(imagenet, ckpts[0], tmp_path_factory.mktemp("runs") / "a")


def _adv_from(run, ckpt, *more, out=None):
    argv = ["evaluate", "--adv-from", str(run), "--model", "resnet18", "--weights", str(ckpt),
            "--batch-size", "4", *more]  # fmt: skip
    if out is not None:
        argv += ["--out", str(out)]
    return main(argv)


def test_round_trip_on_the_surrogate_reproduces_the_run(run_a, ckpts, tmp_path, capsys):
    report = read_json(run_a / "report.json")
    rows = read_manifest(run_a / "manifest.csv")
    assert all(len(r["adv_sha256"]) == 64 for r in rows)
    assert 0 < report["metrics"]["success_rate"] < 1  # a figure that can be wrong
    saved = load_saved_set(run_a)
    model = load_model("resnet18", weights=str(ckpts[0]))
    result = evaluate_saved(saved, {"resnet18": model}, batch_size=4)
    (t,) = result["targets"]
    # The run's own figures, exactly: same rule, same predictions image by image.
    assert t["success_rate"] == report["metrics"]["success_rate"]
    assert t["clean_accuracy"] == report["metrics"]["clean_accuracy"]
    assert t["robust_accuracy"] == report["metrics"]["robust_accuracy"]
    assert t["transfer_success"] == t["success_rate"] and t["targeted_hit_rate"] is None
    assert [(r["clean_pred"], r["adv_pred"], r["success"]) for r in t["rows"]] == [
        (r["clean_pred"], r["adv_pred"], r["success"]) for r in rows
    ]
    assert t["linf_mean"] == report["metrics"]["linf_mean"]
    # Through the CLI, with files.
    assert _adv_from(run_a, ckpts[0], out=tmp_path / "m") == 0
    printed = capsys.readouterr().out
    assert "resnet18" in printed and "transfer" in printed
    summary = json.loads((tmp_path / "m" / "transfer.json").read_text())
    assert summary["targets"][0]["success_rate"] == report["metrics"]["success_rate"]
    assert summary["source"]["run_success_rate"] == report["metrics"]["success_rate"]
    lines = (tmp_path / "m" / "transfer_rows.csv").read_text().splitlines()
    assert len(lines) == 1 + len(rows)


def test_targeted_round_trip_and_hit_rate(imagenet, ckpts, tmp_path):
    run = _generate(imagenet, ckpts[0], tmp_path / "t", "--targeted", "random")
    report = read_json(run / "report.json")
    model = load_model("resnet18", weights=str(ckpts[0]))
    (t,) = evaluate_saved(load_saved_set(run), {"m": model}, batch_size=4)["targets"]
    assert t["targeted_hit_rate"] == report["metrics"]["success_rate"] == t["success_rate"]


def test_transfer_to_another_model(run_a, ckpts):
    other = load_model("resnet18", weights=str(ckpts[1]))
    same = load_model("resnet18", weights=str(ckpts[0]))
    result = evaluate_saved(load_saved_set(run_a), {"b": other, "a": same}, batch_size=4)
    b, a = result["targets"]
    rows = read_manifest(run_a / "manifest.csv")
    assert [r["label"] for r in b["rows"]] == [r["label"] for r in rows]
    # A different model classifies the clean images differently: its own correct set.
    correct = sum(r["clean_pred"] == r["label"] for r in b["rows"])
    fooled = sum(r["clean_pred"] == r["label"] and r["adv_pred"] != r["label"] for r in b["rows"])
    assert b["num_correct"] == correct
    assert b["transfer_success"] == (fooled / correct if correct else None)
    assert b["linf_mean"] == a["linf_mean"]  # norms belong to the images, not the model


def _copy_run(run, dest):
    import shutil

    shutil.copytree(run, dest)
    return dest


def _err(capsys):
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_a_changed_or_missing_image_is_an_error_naming_it(run_a, ckpts, tmp_path, capsys):
    rows = read_manifest(run_a / "manifest.csv")
    edited = _copy_run(run_a, tmp_path / "edited")
    png = edited / "adv" / rows[1]["adv_path"]
    with Image.open(png) as img:
        pixels = img.convert("RGB")
    pixels.putpixel((0, 0), tuple((v + 1) % 256 for v in pixels.getpixel((0, 0))))
    pixels.save(png)
    assert _adv_from(edited, ckpts[0]) == 2
    err = _err(capsys)
    assert rows[1]["adv_path"] in err and "sha256" in err
    swapped = _copy_run(run_a, tmp_path / "swapped")
    a, b = (swapped / "adv" / rows[i]["adv_path"] for i in (0, 2))
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    assert _adv_from(swapped, ckpts[0]) == 2
    assert rows[0]["adv_path"] in _err(capsys)
    missing = _copy_run(run_a, tmp_path / "missing")
    (missing / "adv" / rows[3]["adv_path"]).unlink()
    assert _adv_from(missing, ckpts[0]) == 2
    err = _err(capsys)
    assert rows[3]["adv_path"] in err and "missing" in err


def test_bad_input_is_one_line(run_a, imagenet, ckpts, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _adv_from(empty, ckpts[0]) == 2
    assert "holds no manifest.csv" in _err(capsys)
    argv = ["evaluate", "--adv-from", str(run_a), "--model", "resnet1888", "--weights", "random"]
    assert main(argv) == 2
    assert "resnet1888" in _err(capsys)
    assert _adv_from(run_a, ckpts[0], "--attack", "pgd") == 2
    assert "drop --attack" in _err(capsys)
    argv = ["evaluate", "--adv-from", str(run_a), "--model", "resnet18", "--model", "resnet18",
            "--weights", str(ckpts[0])]  # fmt: skip
    assert main(argv) == 2
    assert "given twice" in _err(capsys)
    ev = tmp_path / "ev"
    argv = ["evaluate", "--model", "resnet18", "--weights", str(ckpts[0]), "--attack", "fgsm",
            "--eps", "1/255", "--out", str(ev), *_common(imagenet)]  # fmt: skip
    assert main(argv) == 0
    assert _adv_from(ev, ckpts[0]) == 2
    assert "saved no adversarial images" in _err(capsys)
    # Clean images elsewhere: a folder with other content fails on the recorded norms.
    other = tmp_path / "other"
    write_imagenet_folder(tmp_path / "tree", seed=5)
    other.mkdir()
    for path, name in zip(
        sorted((tmp_path / "tree").rglob("*.JPEG")),
        sorted(p.name for p in (run_a / "adv").rglob("*.png")),
        strict=True,
    ):
        (other / name.replace(".png", ".JPEG")).write_bytes(path.read_bytes())
    assert _adv_from(run_a, ckpts[0], "--data", str(other)) == 2
    assert "not the one the run attacked" in _err(capsys)


def test_preprocess_record_round_trip():
    from advtune.models import Preprocess

    for p in (Preprocess(), Preprocess(crop_size=32, resize_size=None),
              Preprocess(crop_size=32, resize_size=(40, 41))):  # fmt: skip
        assert preprocess_from_record(repr(p)) == p
    with pytest.raises(UserError, match="cannot rebuild"):
        preprocess_from_record("Compose([...])")


ENSEMBLE = ["--model", "test_ensemble:tiny_a", "--model", "test_ensemble:tiny_b"]


def test_ensemble_generate_and_its_resume_key(imagenet, tmp_path, capsys):
    out = tmp_path / "ens"
    argv = ["generate", *ENSEMBLE, "--attack", "mifgsm", "--eps", "8/255", "--steps", "2",
            "--out", str(out), *_common(imagenet)]  # fmt: skip
    assert main([*argv, "--ensemble-weights", "1,3"]) == 0
    model = read_json(out / "report.json")["config"]["model"]
    assert model["combine"] == "logits"
    assert [(m["name"], m["weight"]) for m in model["members"]] == [
        ("test_ensemble:tiny_a", 0.25),
        ("test_ensemble:tiny_b", 0.75),
    ]
    # Another ensemble never continues this one's folder.
    for change in (["--ensemble-weights", "1,1"], ["--ensemble-combine", "probs"], []):
        assert main([*argv, *change, "--resume"]) == 2
        err = _err(capsys)
        assert "settings differ" in err and "model" in err
    assert main([*argv, "--ensemble-weights", "1,3", "--resume"]) == 0
    # A single model refuses the ensemble flags.
    single = ["generate", "--model", "test_ensemble:tiny_a", "--ensemble-weights", "1",
              "--attack", "fgsm", "--eps", "8/255", "--out", str(tmp_path / "s"),
              *_common(imagenet)]  # fmt: skip
    assert main(single) == 2
    assert "two or more --model" in _err(capsys)
    # The saved set of an ensemble, measured on each member.
    saved = load_saved_set(out)
    members = {n: load_model(n) for n in ("test_ensemble:tiny_a", "test_ensemble:tiny_b")}
    result = evaluate_saved(saved, members, batch_size=4)
    assert [t["model"] for t in result["targets"]] == list(members)
    assert saved.surrogate == "ensemble(test_ensemble:tiny_a+test_ensemble:tiny_b)"


def test_transfer_matrix_script(imagenet, tmp_path, capsys):
    script = load_script("transfer_matrix")
    out = tmp_path / "matrix"
    argv = ["--surrogates", "test_ensemble:tiny_a,test_ensemble:tiny_a+test_ensemble:tiny_b",
            "--targets", "test_ensemble:tiny_a,test_ensemble:tiny_b", "--attack", "fgsm",
            "--eps", "8/255", "--data", str(imagenet), "--image-size", str(SIZE),
            "--batch-size", "4", "--workers", "0", "--out", str(out), "-q"]  # fmt: skip
    assert script.main(argv) == 0
    table = capsys.readouterr().out
    csv_lines = (out / "transfer_matrix.csv").read_text().splitlines()
    assert csv_lines[0] == "surrogate,test_ensemble:tiny_a,test_ensemble:tiny_b"
    assert len(csv_lines) == 3 and "| surrogate \\ target |" in table
    assert (out / "transfer_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each cell is the library's figure for that surrogate's run on that target.
    runs = {s: out / "runs" / s for s in ("test_ensemble:tiny_a",)}
    targets = {"t": load_model("test_ensemble:tiny_b")}
    direct = transfer_matrix(runs, targets, batch_size=4).values[0][0]
    cell = csv_lines[1].split(",")[2]
    assert (cell == "" and direct is None) or float(cell) == direct
    # Rerunning resumes the finished runs (nothing attacked again) and agrees.
    assert script.main(argv) == 0
    assert (out / "transfer_matrix.csv").read_text().splitlines() == csv_lines
    bad = [*argv]
    bad[bad.index("--targets") + 1] = "nope_net"
    assert script.main(bad) == 2
    assert "nope_net" in _err(capsys)
