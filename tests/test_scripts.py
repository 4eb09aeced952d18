"""The scripts end to end on tiny inputs: a generated ImageNet folder, random weights.

Random weights make every figure meaningless; these tests check the plumbing (cells,
resume, table, CSV, plots), not robustness.
"""

from __future__ import annotations

import csv
import json
import sys

import pytest
from fakes import SCRIPTS, load_script, write_checkpoint, write_imagenet_folder

from advtune.models import REFERENCE_MODELS, list_models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts") / "val"
    return write_imagenet_folder(root, classes=2, per_class=2, size=(40, 36))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Seeded random weights saved as files, so every load gives the same model."""
    folder = tmp_path_factory.mktemp("ckpt")
    files = []
    for name in ("resnet18", "mobilenet_v3_small"):
        path = write_checkpoint(folder / f"{name}.pt", name, seed=0)
        files.append(f"{name}={path}")
    return ",".join(files)


def grid_args(data, weights, out, *more):
    return [
        "--data", str(data), "--models", "resnet18,mobilenet_v3_small", "--weights", weights,
        "--image-size", "32", "--attacks", "fgsm,pgd10,pgd20-l2,cw-l2",
        "--linf-eps", "2/255,8/255", "--l2-eps", "0.25,0.5",
        "--set", "pgd10.steps=2", "--set", "pgd20-l2.steps=2", "--set", "cw-l2.steps=2",
        "--set", "cw-l2.binary_search_steps=1", "--batch-size", "4", "--workers", "0",
        "--out", str(out), "-q", *more,
    ]  # fmt: skip


def test_imagenet_robustness_grid_table_csv_plots_and_resume(imagenet, checkpoints, tmp_path):
    script = load_script("imagenet_robustness")
    out = tmp_path / "grid"
    assert script.main(grid_args(imagenet, checkpoints, out)) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    # 2 models × (fgsm, pgd10: 2 eps; pgd20-l2: 2 eps; cw-l2: no eps).
    assert len(rows) == 2 * (2 + 2 + 2 + 1)
    assert {r["status"] for r in rows} == {"complete"} and {r["num_images"] for r in rows} == {"4"}
    for r in rows:  # each figure is the cell's own report's
        report = json.loads((out / "cells" / r["model"] / r["attack"] / "report.json").read_text())
        entry = next(
            e for e in report["metrics"]["per_eps"] if str(e["eps"] or "") == r["eps"]
        )  # fmt: skip
        assert float(r["robust_accuracy"]) == entry["robust_accuracy"]
    table = (out / "results.md").read_text()
    assert (
        "## pgd10 (linf, 4 images)" in table
        and "| model | clean | eps 2/255 | eps 8/255 |" in table
    )
    assert "| model | clean | robust | success rate | median L2 |" in table  # cw-l2
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["fgsm.png", "pgd10.png", "pgd20-l2.png"]  # CW has no eps axis
    assert all((out / "plots" / p).read_bytes().startswith(b"\x89PNG") for p in plots)

    # Finished cells are skipped: nothing is attacked (or even loaded) again.
    cell = out / "cells" / "resnet18" / "pgd10" / "report.json"
    before = cell.read_bytes()
    assert script.main(grid_args(imagenet, checkpoints, out)) == 0
    assert cell.read_bytes() == before
    # An unfinished cell is resumed: drop its last rows and its "complete" status.
    manifest = out / "cells" / "resnet18" / "fgsm" / "manifest.csv"
    full = manifest.read_text()
    manifest.write_text("".join(full.splitlines(keepends=True)[:5]))  # header + 2 images
    report_path = manifest.with_name("report.json")
    report = json.loads(report_path.read_text())
    report["status"] = "interrupted"
    report_path.write_text(json.dumps(report))
    assert script.main(grid_args(imagenet, checkpoints, out, "--models", "resnet18")) == 0
    assert manifest.read_text() == full
    resumed = json.loads(report_path.read_text())
    assert resumed["status"] == "complete" and resumed["timings"]["images_this_session"] == 2


def test_imagenet_robustness_user_errors(imagenet, tmp_path, capsys):
    script = load_script("imagenet_robustness")
    rc = script.main(grid_args(imagenet, "random", tmp_path / "x", "--attacks", "pgd7"))
    assert rc == 2 and "unknown grid attack(s) ['pgd7']" in capsys.readouterr().err
    rc = script.main(grid_args(imagenet, "random", tmp_path / "x", "--set", "pgd10.stepz=3"))
    assert rc == 2 and "no setting 'stepz'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:  # argparse: usage line and exit 2
        script.main(grid_args(imagenet, "random", tmp_path / "x", "--image-size", "5000"))
    assert caught.value.code == 2 and "must be in [1, 4096], got 5000" in capsys.readouterr().err


def test_convbn_modes_table_csv_plot(tmp_path):
    script = load_script("convbn_modes")
    out = tmp_path / "modes"
    argv = ["--models", "resnet18", "--modes", "eval,tune,frozen", "--size", "32", "--steps",
            "1", "--batch-size", "2", "--device", "cpu", "--out", str(out), "-q"]  # fmt: skip
    assert script.main(argv) == 0
    rows = list(csv.DictReader((out / "convbn_modes.csv").open()))
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("resnet18", "eval"), ("resnet18", "tune"), ("resnet18", "frozen")
    ]  # fmt: skip
    saved = {r["mode"]: float(r["saved_mib_per_image"]) for r in rows}
    # Measured, not asserted to a number: folding BN saves memory, frozen saves the most.
    assert saved["frozen"] < saved["tune"] < saved["eval"]
    assert float(rows[0]["saved_vs_eval"]) == 1.0
    table = (out / "convbn_modes.md").read_text()
    assert "| resnet18 | frozen |" in table
    assert (out / "convbn_modes.png").read_bytes().startswith(b"\x89PNG")
    # A rerun with the same settings reuses the measurement.
    stored = (out / "json" / "resnet18.json").read_bytes()
    assert script.main(argv) == 0
    assert (out / "json" / "resnet18.json").read_bytes() == stored


@pytest.mark.parametrize("name", ["imagenet_robustness", "convbn_modes"])
def test_scripts_default_to_the_reference_models(name):
    parser = load_script(name).build_parser()
    data = ["--data", "x"] if name == "imagenet_robustness" else []
    assert parser.parse_args(data).models == list(REFERENCE_MODELS)
    # Each default is a torchvision model (a typo would only fail after hours of a grid).
    assert set(REFERENCE_MODELS) <= set(list_models())
    assert len(set(REFERENCE_MODELS)) == len(REFERENCE_MODELS)


def test_imagenet_robustness_uses_each_models_own_input_size(imagenet, tmp_path):
    # inception_v3 (a default model) takes 299 px crops: the grid must use the model's
    # own preprocessing, not a fixed 224, when --image-size is not given.
    script = load_script("imagenet_robustness")
    out = tmp_path / "grid"
    argv = ["--data", str(imagenet), "--models", "inception_v3", "--weights", "random",
            "--attacks", "fgsm", "--linf-eps", "4/255", "--limit", "1", "--batch-size", "1",
            "--workers", "0", "--device", "cpu", "--out", str(out)]  # fmt: skip
    with pytest.warns(UserWarning, match="untrained"):
        assert script.main(argv) == 0
    report = json.loads((out / "cells" / "inception_v3" / "fgsm" / "report.json").read_text())
    assert report["status"] == "complete"
    assert "crop_size=299, resize_size=342" in report["config"]["preprocess"]


def test_imagenet_robustness_quiet_silences_warnings(imagenet, tmp_path, recwarn, capsys):
    script = load_script("imagenet_robustness")
    argv = ["--data", str(imagenet), "--models", "resnet18", "--weights", "random",
            "--attacks", "fgsm", "--linf-eps", "4/255", "--limit", "1", "--batch-size", "1",
            "--workers", "0", "--device", "cpu", "--image-size", "32",
            "--out", str(tmp_path / "grid"), "-q"]  # fmt: skip
    assert script.main(argv) == 0
    assert [str(w.message) for w in recwarn] == []  # random weights warn without -q
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_convbn_modes_runs_inception_at_the_default_size(tmp_path):
    # One --size for every model: inception_v3 must build and fold at the default 224 px.
    script = load_script("convbn_modes")
    out = tmp_path / "modes"
    argv = ["--models", "inception_v3", "--steps", "0", "--device", "cpu", "--out", str(out),
            "-q"]  # fmt: skip
    assert script.main(argv) == 0
    rows = list(csv.DictReader((out / "convbn_modes.csv").open()))
    assert {r["size"] for r in rows} == {"224"} and not any(r["error"] for r in rows)
    saved = {r["mode"]: float(r["saved_mib_per_image"]) for r in rows}
    assert saved["frozen"] < saved["tune"] < saved["eval"]


@pytest.mark.slow
def test_imagenet_robustness_under_torchrun_equals_single_process(imagenet, checkpoints, tmp_path):
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--models", "resnet18", "--attacks", "fgsm,pgd10"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert (
        load_script("imagenet_robustness").main([*grid_args(imagenet, checkpoints, single), *args])
        == 0
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(port),
         str(SCRIPTS / "imagenet_robustness.py"), *grid_args(imagenet, checkpoints, multi), *args],
        env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for cell in ("fgsm", "pgd10"):
        a, b = (d / "cells" / "resnet18" / cell / "manifest.csv" for d in (single, multi))
        assert a.read_text() == b.read_text()
    strip = lambda p: [r[:11] for r in csv.reader(p.open())]  # noqa: E731 (no timings)
    assert strip(single / "results.csv") == strip(multi / "results.csv")


def test_walk_run_merges_consecutive_calls_into_stays():
    walk = load_script("walk_run")
    calls = [("a", "f"), ("a", "g"), ("a", "f"), ("b", "h"), ("a", "k")]
    assert walk.stays(calls) == [("a", ["f", "g"]), ("b", ["h"]), ("a", ["k"])]
    assert walk._module(walk.__file__) is None  # scripts/ is not the package
    import advtune.run.plan

    assert walk._module(advtune.run.plan.__file__) == "advtune.run.plan"
    assert walk._module(advtune.run.__file__) == "advtune.run"
