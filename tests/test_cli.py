"""``advtune`` through ``main([...])`` on a tiny ImageNet-layout folder of real JPEGs.

The model is a randomly initialised resnet18 saved as a local checkpoint (so the test can
load the very same weights again to re-check the saved PNGs), run at 32×32 via the
advanced ``--image-size`` flag to keep the tests fast.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch
import torchvision
from fakes import OOMAbove, write_checkpoint, write_imagenet_folder
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from advtune import attacks
from advtune.cli import main
from advtune.data import build_dataset
from advtune.models import DEFAULT_CONVBN, Preprocess, load_model
from advtune.storage import read_manifest

SIZE = 32


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return write_imagenet_folder(tmp_path_factory.mktemp("data") / "val")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "resnet18.pt")


def base_args(data, ckpt, out, *more):
    return [
        "--model", "resnet18", "--weights", str(ckpt), "--data", str(data), "--out", str(out),
        "--image-size", str(SIZE), "--batch-size", "4", "--workers", "0", *more,
    ]  # fmt: skip


def test_generate_end_to_end_and_png_faithfulness(imagenet, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    eps = 2 / 255
    rc = main(
        ["generate", *base_args(imagenet, checkpoint, out), "--attack", "pgd", "--eps", "2/255",
         "--steps", "2", "--step-size", "1/255"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "robust acc" in captured.out and "2/255" in captured.out  # the summary table
    rows = read_manifest(out / "manifest.csv")
    assert [r["index"] for r in rows] == list(range(6))
    assert (
        (out / "manifest.csv")
        .read_text()
        .splitlines()[0]
        .startswith("path,label,clean_pred,adv_pred,success,linf,l2")
    )
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete"
    # Every effective hyperparameter, the defaults too: the report alone reproduces the run.
    defaults = {k: v for k, v in attacks.spec("pgd").defaults.items() if k != "eps"}
    assert report["config"]["attack"]["params"] == {**defaults, "steps": 2, "step_size": 1 / 255}
    assert {"restarts", "random_start", "loss"} <= set(defaults)
    assert report["versions"]["torch"] == torch.__version__
    assert report["versions"]["torchvision"] == torchvision.__version__
    assert report["device"]["type"] == "cpu"
    assert report["convbn"]["mode"] == DEFAULT_CONVBN and report["convbn"]["folded"]
    assert report["data"]["layout"] == "imagenet-folders"
    assert report["data"]["label_source"] == "dataset"
    assert report["peak_memory_bytes"] is None  # CPU
    assert report["timings"]["images_per_s"] > 0
    metrics = report["metrics"]
    assert metrics["num_images"] == 6
    assert metrics["robust_accuracy"] == sum(r["adv_pred"] == r["label"] for r in rows) / 6

    # Faithful PNGs: within eps of the 8-bit clean image, and the model's verdict on the
    # saved file is what the manifest says.
    dataset = build_dataset(imagenet, transform=Preprocess(SIZE, round(SIZE * 256 / 224)))
    model = load_model("resnet18", weights=str(checkpoint), convbn=DEFAULT_CONVBN)
    saved = []
    for row in rows:
        png = np.asarray(Image.open(out / "adv" / row["adv_path"]).convert("RGB"))
        x_adv = torch.from_numpy(png.copy()).permute(2, 0, 1).double() / 255
        # The dataset's float32 image holds 8-bit values; compare them exactly.
        clean = torch.round(dataset[row["index"]]["image"].double() * 255) / 255
        assert float((x_adv - clean).abs().max()) <= eps + 1e-12
        assert float((x_adv - clean).abs().max()) == pytest.approx(row["linf"])
        saved.append(x_adv.float())
    preds = model(torch.stack(saved)).argmax(1).tolist()
    assert preds == [r["adv_pred"] for r in rows]
    assert [r["success"] for r in rows] == [p != r["label"] for p, r in zip(preds, rows)]


def test_generate_l2_pngs_within_eps(imagenet, checkpoint, tmp_path, capsys):
    out = tmp_path / "l2"
    argv = ["generate", *base_args(imagenet, checkpoint, out), "--preset", "imagenet-l2-pgd",
            "--eps", "0.3", "--steps", "2", "--limit", "4", "-q"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    dataset = build_dataset(imagenet, transform=Preprocess(SIZE, round(SIZE * 256 / 224)))
    for row in read_manifest(out / "manifest.csv"):
        png = np.asarray(Image.open(out / "adv" / row["adv_path"]).convert("RGB"))
        x_adv = torch.from_numpy(png.copy()).permute(2, 0, 1).double()
        clean = torch.round(dataset[row["index"]]["image"].double() * 255)
        l2 = float((x_adv - clean).norm()) / 255
        assert l2 <= 0.3 * (1 + 1e-12)
        assert l2 == pytest.approx(row["l2"])


def test_evaluate_curve_plot_and_quiet(imagenet, checkpoint, tmp_path, capsys):
    out = tmp_path / "ev"
    rc = main(
        ["evaluate", *base_args(imagenet, checkpoint, out), "--attack", "fgsm",
         "--eps", "1/255,4/255", "--limit", "4", "--quiet", "--amp", "bf16", "--channels-last"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out == ""  # --quiet: no summary
    assert "img/s" not in captured.err  # and no progress bar
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["amp"] == "bf16" and report["config"]["channels_last"] is True
    assert report["model"]["name"] == "resnet18" and report["model"]["wrapper"] == "AmpModel"
    # The metadata is the model card's, read through the AMP wrapper.
    card = load_model("resnet18", weights=str(checkpoint)).card
    assert {k: report["model"][k] for k in card.to_dict()} == json.loads(json.dumps(card.to_dict()))
    assert report["config"]["model"]["weights_sha256"] == card.weights_digest
    per_eps = report["metrics"]["per_eps"]
    assert [e["eps"] for e in per_eps] == [1 / 255, 4 / 255]
    assert all(e["per_class"] for e in per_eps)
    assert report["outputs"]["plot"].endswith("robust_accuracy.png")
    assert (out / "robust_accuracy.png").stat().st_size > 1000
    assert not (out / "adv").exists()
    assert len(read_manifest(out / "manifest.csv")) == 8


def test_preset_and_unlabeled_folder(checkpoint, tmp_path, capsys):
    flat = tmp_path / "photos"
    flat.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    (flat / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o"
    rc = main(["generate", *base_args(flat, checkpoint, out), "--preset", "fgsm", "-q"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "advtune: warning: skipping broken.jpg" in err
    report = json.loads((out / "report.json").read_text())
    assert [s["path"] for s in report["data"]["skipped"]] == ["broken.jpg"]
    assert report["metrics"]["num_images"] == 3
    assert report["data"]["label_source"] == "model clean predictions"
    assert report["metrics"]["clean_accuracy"] == 1.0
    assert report["config"]["attack"]["eps"] == [4 / 255]  # from the preset
    assert sorted(p.name for p in (out / "adv").iterdir()) == ["0.png", "1.png", "2.png"]


def test_list_models_by_source(capsys):
    assert main(["list", "models", "--source", "torchvision"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows and all("torchvision" in r for r in rows)
    assert main(["list", "models", "--source", "robustbench", "--source", "torchvision"]) == 0
    both = capsys.readouterr().out.splitlines()
    assert len(both) > len(rows) and any("robustbench" in r for r in both)
    assert main(["list", "attacks", "--source", "timm"]) == 2
    assert "--source applies to 'list models'" in capsys.readouterr().err
    assert main(["list", "models", "--source", "nope"]) == 2


def test_list_version_and_help(capsys):
    assert main(["list", "attacks"]) == 0
    assert "pgd" in capsys.readouterr().out
    assert main(["list", "presets"]) == 0
    assert "imagenet-linf-pgd" in capsys.readouterr().out
    assert main(["list", "models"]) == 0
    assert "resnet50" in capsys.readouterr().out.split()
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("advtune ")
    assert main([]) == 0
    assert "generate" in capsys.readouterr().out
    assert main(["generate", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out
    pytest.importorskip("advtune.bench")
    assert main(["bench", "--help"]) == 0  # wired in through advtune.bench.register_cli
    assert "ConvBN" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["pgd", "fgsm", "cw_l2"])
def test_list_attacks_prints_each_declared_param(name, capsys):
    from advtune import attacks

    assert main(["list", "attacks"]) == 0
    out = capsys.readouterr().out
    for param in attacks.spec(name).params:
        assert f"    {param.describe()}" in out.splitlines()


def test_torchattacks_attack_runs_from_the_cli(imagenet, checkpoint, tmp_path, capsys):
    pytest.importorskip("torchattacks")
    out = tmp_path / "ta"
    rc = main(
        ["evaluate", *base_args(imagenet, checkpoint, out), "--attack", "torchattacks:PGD",
         "--eps", "2/255", "-p", "steps=2", "-p", "alpha=1/255", "--limit", "2", "-q"]
    )  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete"
    # -p values are typed by the wrapped class's spec: "1/255" is a number, not text.
    params = report["config"]["attack"]["params"]
    assert params == {**params, "steps": 2, "alpha": 1 / 255}  # and the defaults: random_start
    assert params["random_start"] is True
    rows = read_manifest(out / "manifest.csv")
    assert len(rows) == 2 and all(r["linf"] <= 2 / 255 + 1e-9 for r in rows)


def test_dataset_gets_the_cards_preprocessing_before_the_model_is_built(
    imagenet, tmp_path, monkeypatch
):
    import advtune.models
    from advtune.run.plan import DataPlan, ModelPlan, RunPlan, plan_attack
    from advtune.run.session import build_inputs

    seen = []

    def fake_load(name, **kwargs):
        seen.append((name, kwargs["seed"]))
        raise RuntimeError("stop here")

    monkeypatch.setattr(advtune.models, "load_model", fake_load)
    import advtune.data

    built = []
    original = advtune.data.build_dataset
    monkeypatch.setattr(
        advtune.data,
        "build_dataset",
        lambda *a, **k: built.append(k["transform"]) or original(*a, **k),
    )
    plan = RunPlan(
        command="generate",
        attack=plan_attack(attack="fgsm", eps=[4 / 255], seed=7),
        model=ModelPlan(names=("resnet18",), weights="random", seed=7, progress=False),
        data=DataPlan(root=str(imagenet)),
        out_dir=tmp_path / "o",
    )
    with pytest.raises(RuntimeError, match="stop here"):
        build_inputs(plan, device="cpu")
    expected = advtune.models.model_card("resnet18", weights="random", seed=7).preprocess
    assert built == [expected]  # the real transform, before any model is built
    assert seen == [("resnet18", 7)]  # --seed seeds random weights


def test_summary_compares_published_figures():
    from advtune.run import format_summary

    published = {"clean": 0.64, "robust": 0.34, "attack": "autoattack", "norm": "Linf",
                 "eps": 4 / 255, "images": 5000, "reference": "leaderboard"}  # fmt: skip
    entry = {"eps": 4 / 255, "clean_accuracy": 0.6, "robust_accuracy": 0.3,
             "success_rate": 0.5, "linf_mean": 0.01, "l2_mean": 1.0}  # fmt: skip
    report = {
        "command": "evaluate", "config": {"attack": {"attack": "pgd", "norm": "linf"}},
        "metrics": {"num_images": 100, "per_eps": [entry]}, "device": {"type": "cpu"},
        "data": {"label_source": "dataset"}, "model": {"name": "m", "published": published},
    }  # fmt: skip
    lines = [ln for ln in format_summary(report).splitlines() if "published" in ln]
    assert len(lines) == 1
    assert "clean 64.0% vs 60.0%" in lines[0] and "robust 34.0% vs 30.0%" in lines[0]
    # Random weights or a handful of images: the comparison would mean nothing (issue 19).
    report["model"]["random_weights"] = True
    lines = [ln for ln in format_summary(report).splitlines() if "published" in ln]
    assert lines == ["published figures not compared: the weights are random (untrained)"]
    report["model"]["random_weights"] = False
    report["metrics"]["num_images"] = 5
    lines = [ln for ln in format_summary(report).splitlines() if "published" in ln]
    assert len(lines) == 1 and "5 images are too few" in lines[0] and " vs " not in lines[0]
    report["metrics"]["num_images"] = 100
    report["config"]["attack"]["norm"] = "l2"  # other threat model: nothing to compare
    assert "published" not in format_summary(report)
    entry["eps"] = 2 / 255  # other eps: nothing to compare
    report["config"]["attack"]["norm"] = "linf"
    assert "published" not in format_summary(report)


def _one_line_error(capsys, rc, *names):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("advtune: error: ")
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "names"),
    [
        (["--attack", "pgdd"], ["'pgdd'", "did you mean: pgd"]),
        (["--attack", "pgd", "--eps=-1/255"], ["eps must be >= 0", "-0.0039"]),
        (["--attack", "pgd", "--eps", "2"], ["eps 2.0 is out of range"]),
        (["--attack", "pgd", "--eps", "4/0"], ["'4/0'"]),
        (["--attack", "pgd", "--steps", "0"], ["steps must be >= 1, got 0"]),
        (["--attack", "pgd", "-p", "stepz=3"], ["'stepz'", "did you mean: steps"]),
        (["--preset", "imagenet-linf-pdg"], ["'imagenet-linf-pdg'", "did you mean"]),
        (["--attack", "pgd", "--eps", "1/255,2/255"], ["generate takes one eps"]),
        (["--attack", "pgd", "--device", "tpu"], ["'tpu'"]),
        (["--attack", "pgd", "--convbn", "tunee"], ["'tunee'"]),
        (["--attack", "pgd", "--batch-size", "0"], ["batch-size", "0"]),
        (["--attack", "pgd", "--batch-size", "abc"], ["'abc'", "whole number", "'auto'"]),
        (["--attack", "pgd", "--image-size", "5000"], ["--image-size", "<= 4096", "5000"]),
        (["--attack", "pgd", "--eps", "0.5/255"], ["below 1/255", "8-bit", "--eps 1/255"]),
        (["--attack", "pgd", "-p", "eps=0.1"], ["--eps"]),
        (["--attack", "pgd", "--norm", "l3"], ["'l3'", "linf", "l2"]),  # threat_names()
        (["--attack", "fgsm", "--norm", "l2"], ["'fgsm' is linf only"]),
        (["--attack", "fgsm", "--convbn", "tune", "--recompute"], ["--recompute", "frozen"]),
    ],
)
def test_bad_inputs_before_model_load(extra, names, imagenet, tmp_path, capsys, monkeypatch):
    import advtune.models

    loads = []
    monkeypatch.setattr(advtune.models, "load_model", lambda *a, **k: loads.append(a))
    argv = ["generate", "--model", "resnet18", "--weights", "random", "--data", str(imagenet),
            "--out", str(tmp_path / "o"), *extra]  # fmt: skip
    line = _one_line_error(capsys, main(argv), *names)
    assert "\x1b" not in line
    if "eps=0.1" in extra:  # the budget has its own flag: no "did you mean: steps"
        assert "steps" not in line
    if "abc" in extra:  # a batch size is a whole number, not "0.5 or 4/255"
        assert "4/255" not in line
    assert loads == []  # refused before the slow model load


def test_bench_batch_size_must_be_positive(capsys):
    pytest.importorskip("advtune.bench")
    _one_line_error(capsys, main(["bench", "--batch-size", "0"]), "--batch-size", ">= 1")


def test_out_inside_data_is_left_out_of_the_input(imagenet, checkpoint, tmp_path, capsys):
    import shutil

    data = shutil.copytree(imagenet, tmp_path / "val")
    out = data / "advtune-out"
    argv = ["generate", *base_args(data, checkpoint, out), "--attack", "fgsm", "--limit", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "advtune: note:" in ln]
    assert len(notes) == 1 and "left out of the input" in notes[0]
    assert len(list((out / "adv").rglob("*.png"))) == 3
    # The saved PNGs are not read back as input: the resumed run sees the same images.
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    assert [r["index"] for r in read_manifest(out / "manifest.csv")] == [0, 1, 2]


def test_torn_manifest_line_is_one_warning_line_on_resume(imagenet, checkpoint, tmp_path, capsys):
    out = tmp_path / "torn"
    argv = ["evaluate", *base_args(imagenet, checkpoint, out), "--attack", "fgsm", "--limit", "3"]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = out / "manifest.csv"
    whole = manifest.read_bytes()
    manifest.write_bytes(whole[:-20])  # a kill in the middle of the last row's append
    capsys.readouterr()
    assert main([*argv, "--resume", "-q"]) == 0
    err = capsys.readouterr().err
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("advtune: warning:")]
    assert len(warnings_) == 1 and "dropped a torn last line" in warnings_[0], err
    assert "Traceback" not in err and "TornManifestWarning" not in err
    assert manifest.read_bytes() == whole  # the torn row's image was attacked again


def test_out_equal_to_data_is_refused(imagenet, tmp_path, capsys):
    import shutil

    data = shutil.copytree(imagenet, tmp_path / "val")
    argv = ["generate", "--model", "resnet18", "--weights", "random", "--attack", "fgsm",
            "--data", str(data), "--out", str(data)]  # fmt: skip
    _one_line_error(capsys, main(argv), str(data), "excluded")


def test_subset_file_resolves_from_any_directory(imagenet, tmp_path, capsys, monkeypatch):
    import advtune.models

    loads = []
    monkeypatch.setattr(advtune.models, "load_model", lambda *a, **k: loads.append(a) or 1 / 0)
    monkeypatch.chdir(tmp_path)  # not the repository root
    argv = ["evaluate", "--model", "resnet18", "--weights", "random", "--attack", "fgsm",
            "--data", str(imagenet), "--out", str(tmp_path / "o"),
            "--subset", "datasets/imagenet_val_5000_robustbench.txt"]  # fmt: skip
    # The packaged list is found and read: its 5000 paths are not in this tiny folder,
    # which is refused before the model is loaded (naming the entries, not the file).
    _one_line_error(capsys, main(argv), "5000 of 5000 subset entries")
    assert loads == []
    argv[-1] = "datasets/no_such_subset.txt"
    _one_line_error(capsys, main(argv), "no_such_subset.txt", "not found")
    assert loads == []


def test_error_lines_carry_no_terminal_codes(imagenet, tmp_path, capsys):
    argv = ["generate", "--model", "\x1b[31mresnet\x1b[0m", "--attack", "fgsm",
            "--data", str(imagenet), "--out", str(tmp_path / "o")]  # fmt: skip
    line = _one_line_error(capsys, main(argv), "resnet")
    assert "\x1b" not in line


def test_one_line_strips_terminal_codes():
    from advtune.cli import one_line

    assert one_line("\x1b[1;31mbad\x1b[0m value\n  here\r\x07") == "bad value here"


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=20))
def test_number_flags_never_crash(text):
    """Any text given to --eps, --batch-size, --steps, --image-size, --seed or -p is a
    value or a one-line usage error (exit 2), never a traceback."""
    import contextlib
    import io

    from advtune.cli import build_parser

    parser = build_parser()
    for flag in ("--eps", "--batch-size", "--steps", "--image-size", "--seed", "--step-size", "-p"):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parser.parse_args(["evaluate", "--model", "m", f"{flag}={text}"])
        except SystemExit as e:
            assert e.code == 2
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("advtune: error: "), err.getvalue()


def test_unknown_model(imagenet, tmp_path, capsys):
    argv = ["generate", "--model", "resnet1888", "--attack", "fgsm", "--data", str(imagenet),
            "--out", str(tmp_path / "o")]  # fmt: skip
    _one_line_error(capsys, main(argv), "'resnet1888'", "resnet18")


def test_missing_and_empty_data(tmp_path, capsys):
    common = ["generate", "--model", "resnet18", "--weights", "random", "--attack", "fgsm"]
    missing = tmp_path / "nowhere"
    rc = main([*common, "--data", str(missing), "--out", str(tmp_path / "o")])
    _one_line_error(capsys, rc, str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main([*common, "--data", str(empty), "--out", str(tmp_path / "o"), "--image-size", "32"])
    _one_line_error(capsys, rc, str(empty.name))


def test_unwritable_output(imagenet, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["generate", "--model", "resnet18", "--weights", "random", "--attack", "fgsm",
            "--data", str(imagenet), "--out", str(blocker / "out")]  # fmt: skip
    _one_line_error(capsys, main(argv), str(blocker / "out"), "not writable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_absent(imagenet, tmp_path, capsys):
    argv = ["generate", "--model", "resnet18", "--weights", "random", "--attack", "fgsm",
            "--data", str(imagenet), "--out", str(tmp_path / "o"), "--device", "cuda"]  # fmt: skip
    _one_line_error(capsys, main(argv), "--device cuda", "CUDA is not available")


def test_checkpoint_that_does_not_fit(imagenet, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(3, 3), "extra.bias": torch.zeros(1)}, bad)
    argv = ["generate", "--model", "resnet18", "--weights", str(bad), "--attack", "fgsm",
            "--data", str(imagenet), "--out", str(tmp_path / "o")]  # fmt: skip
    _one_line_error(capsys, main(argv), "bad.pt")


def test_existing_results_need_resume_or_overwrite(imagenet, checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    args = ["generate", *base_args(imagenet, checkpoint, out), "--attack", "fgsm", "--limit", "2",
            "-q"]  # fmt: skip
    assert main(args) == 0
    _one_line_error(capsys, main(args), "already holds results", "--resume")
    assert main([*args, "--overwrite"]) == 0
    assert len(read_manifest(out / "manifest.csv")) == 2
    # The stored run's settings are checked on resume.
    rc = main([*args, "--resume", "--eps", "8/255"])
    _one_line_error(capsys, rc, "settings differ", "attack.eps")


def test_python_m_entry_point_exists():
    # ``python -m advtune`` (and so ``torchrun -m advtune``) goes through main().
    import advtune.__main__ as entry

    assert entry.main is main
    assert sys.modules["advtune.cli"].main is main


# --------------------------------------------------------------------------- batch size, OOM


def test_batch_size_auto_on_cpu(imagenet, checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "o"
    argv = ["generate", *base_args(imagenet, checkpoint, out), "--attack", "fgsm", "-q",
            "--batch-size", "auto"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    settings = json.loads((out / "report.json").read_text())["settings"]
    # The CPU default (32), never more than the 6 images; nothing probed, nothing cached.
    assert settings["batch_size"] == 6 and settings["batch_size_requested"] == "auto"
    assert settings["oom_backoffs"] == 0 and settings["final_batch_size"] == 6
    assert not (tmp_path / "cache").exists()
    # A batch size is not a result-affecting setting: resuming with another one is fine.
    assert main([*argv[:-1], "3", "--resume"]) == 0, capsys.readouterr().err
    for bad in ("0", "big"):
        rc = main([*argv[:-1], bad])
        _one_line_error(capsys, rc, "--batch-size", "auto")


def test_oom_backoff_end_to_end(imagenet, checkpoint, tmp_path, monkeypatch, capsys):
    """Every attack call is padded to the batch size in effect, so a run that backed off
    equals, image by image, the uninterrupted run at the size each image was attacked at.
    (Not necessarily the run at the original size: resnet18 at 32 px on this CPU gives 4 of
    the 6 rows of --batch-size 2 and 4 different last bits in clean_conf.)"""
    import advtune.run.loop as ev

    def args(out, *more):
        # PGD with random starts and random targets: per-sample seeds at work.
        return ["generate", *base_args(imagenet, checkpoint, out), "--attack", "pgd",
                "--steps", "2", "--targeted", "random", "--seed", "5", "-q", *more]  # fmt: skip

    assert main(args(tmp_path / "ref4")) == 0
    assert main(args(tmp_path / "ref2", "--batch-size", "2")) == 0
    capsys.readouterr()
    real = ev.attack_batch

    # Only 2 images fit from the start: the first call of 4 fails, every later call has 2.
    fake = OOMAbove(real, limits=[2])
    monkeypatch.setattr(ev, "attack_batch", fake)
    assert main(args(tmp_path / "oom")) == 0
    err = capsys.readouterr().err
    assert err.count("advtune: warning: out of memory attacking 4 images") == 1, err
    assert fake.sizes == [4, 2, 2, 2]
    report = json.loads((tmp_path / "oom" / "report.json").read_text())
    assert report["status"] == "complete"
    assert report["settings"]["batch_size"] == 4
    assert report["settings"]["oom_backoffs"] == 1
    assert report["settings"]["final_batch_size"] == 2
    manifest = (tmp_path / "oom" / "manifest.csv").read_bytes()
    assert manifest == (tmp_path / "ref2" / "manifest.csv").read_bytes()
    rows = read_manifest(tmp_path / "oom" / "manifest.csv")
    assert [r["index"] for r in rows] == list(range(6))
    for row in rows:
        png = f"adv/{row['adv_path']}"
        assert (tmp_path / "oom" / png).read_bytes() == (tmp_path / "ref2" / png).read_bytes()

    # Memory shrinks after the first batch: images 0-3 were attacked 4 at a time, 4-5 two
    # at a time after the back-off.
    monkeypatch.setattr(ev, "attack_batch", OOMAbove(real, limits=[4, 2]))
    assert main(args(tmp_path / "mixed")) == 0
    mixed = read_manifest(tmp_path / "mixed" / "manifest.csv")
    assert mixed[:4] == read_manifest(tmp_path / "ref4" / "manifest.csv")[:4]
    assert mixed[4:] == read_manifest(tmp_path / "ref2" / "manifest.csv")[4:]


@pytest.mark.parametrize(
    "how", [["--attack", "autoattack", "--eps", "4/255"], ["--preset", "autoattack-imagenet-linf"]]
)
def test_autoattack_from_the_cli_logs_each_component(how, imagenet, checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    budget = ["-p", "steps=2", "-p", "n_targets=2", "-p", "queries=10"]
    rc = main(["evaluate", *base_args(imagenet, checkpoint, out), *how, *budget, "--limit", "4"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((out / "report.json").read_text())
    after = report["metrics"]["robust_after"]
    assert list(after) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert list(after.values()) == sorted(after.values(), reverse=True)
    assert report["config"]["attack"]["eps"] == [4 / 255]
    for name in ("APGD-CE", "APGD-T", "FAB-T", "SQUARE"):
        assert f"robust accuracy after {name}: " in captured.out
    assert {"randomized", "black_box"} <= set(report["checks"])
    rows = read_manifest(out / "manifest.csv")
    assert {r["broken_by"] for r in rows} <= {"", "clean", *after}
    # The last stage's survivors are the rows no component broke.
    assert after["square"] == sum(r["broken_by"] == "" for r in rows) / len(rows)


def test_l1_autoattack_preset_runs_the_four_l1_components(imagenet, checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    budget = ["-p", "steps=3", "-p", "n_targets=2", "-p", "queries=10"]
    args = ["evaluate", *base_args(imagenet, checkpoint, out), "--preset", "autoattack-imagenet-l1"]
    rc = main([*args, *budget, "--limit", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "mean l1" in captured.out  # the budget's own norm in the summary
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["l1_mean"] is not None
    assert report["config"]["attack"]["norm"] == "l1"
    assert report["config"]["attack"]["eps"] == [255.0]
    assert list(report["metrics"]["robust_after"]) == [
        "clean",
        "apgd-ce",
        "apgd-t",
        "fab-t",
        "square",
    ]
    assert all(r["l1"] <= 255.0 + 1e-6 for r in read_manifest(out / "manifest.csv"))


def test_broken_pipe_is_a_quiet_exit(monkeypatch, tmp_path):
    """`advtune list models | head`: the reader leaving is not an error (no traceback)."""

    class ClosedPipe:
        def __init__(self, fd: int):
            self.fd = fd

        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return self.fd

    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    try:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(fd))
        assert main(["list", "attacks"]) == 0
    finally:
        os.close(fd)


def test_recompute_runs_and_is_reported(tmp_path, capsys):
    """--recompute: a Swin model's blocks recompute in backward; the run and its report say so."""
    out = tmp_path / "o"
    argv = ["generate", "--model", "swin_t", "--weights", "random", "--image-size", "64",
            "--attack", "fgsm", "--limit", "2", "--workers", "0", "--recompute",
            "--out", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["recompute"] is True
    assert report["status"] == "complete"


def test_load_model_recompute_wraps_blocks():
    from advtune.frozen import freeze_report

    report = freeze_report(load_model("swin_t", weights="random", recompute=True).net)
    plain = freeze_report(load_model("swin_t", weights="random").net)
    assert report is not None and plain is not None
    assert len(report.recomputed) == 12  # swin_t's 2 + 2 + 6 + 2 transformer blocks
    assert plain.recomputed == []


@pytest.mark.parametrize("flag", ["--saved-batches", "--peak-batches"])
@pytest.mark.parametrize("value", ["4,2", "2,2", "0,4"])
def test_bench_batch_pairs_must_increase(flag, value, capsys):
    pytest.importorskip("advtune.bench")
    _one_line_error(capsys, main(["bench", flag, value]), flag, "increasing")
