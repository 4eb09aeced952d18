"""Hostile inputs, part two (issue 19): no silent result, no hang, no traceback.

One test (or more) per item of the issue; ``docs/faults.md`` lists them. Runs are tiny
(6 images of 32 px, FGSM, random-weights resnet18 checkpoint, no workers unless the
item is about workers).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import write_run_inputs
from stophook import STOP_HOOK_ENV
from torch import nn

from advtune.cli import main
from advtune.errors import UserError
from advtune.run import AttackConfig, RunSpec, run
from advtune.storage import read_manifest

STOPHOOK = str(Path(__file__).with_name("stophook.py"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("hostile"))


def args_for(data, ckpt, out, *more):
    return [
        "generate", "--model", "resnet18", "--weights", str(ckpt), "--data", str(data),
        "--out", str(out), "--image-size", "32", "--batch-size", "2", "--workers", "0",
        "--attack", "fgsm", "--eps", "4/255", "-q", *more,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    data, ckpt = setup
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(args_for(data, ckpt, out)) == 0
    return out


def one_error_line(capsys, rc, *parts):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert lines and lines[-1].startswith("advtune: error: ") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[-1], lines[-1]
    return lines[-1]


def copy_of(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


# --------------------------------------------------------------------------- silent results


def test_resume_redoes_rows_whose_png_is_missing_or_changed(setup, finished, tmp_path, capsys):
    data, ckpt = setup
    out = copy_of(finished, tmp_path)
    rows = read_manifest(out / "manifest.csv")
    assert all(len(r["adv_sha256"]) == 64 for r in rows)  # recorded at write time
    (out / "adv" / rows[0]["adv_path"]).unlink()
    with open(out / "adv" / rows[3]["adv_path"], "ab") as f:
        f.write(b"edited")
    assert main([*args_for(data, ckpt, out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "2 finished image(s)" in err and "attacked again" in err
    # Redone: the same manifest and PNG bytes as the finished run.
    assert (out / "manifest.csv").read_text() == (finished / "manifest.csv").read_text()
    for row in rows:
        assert (out / "adv" / row["adv_path"]).read_bytes() == (
            finished / "adv" / row["adv_path"]
        ).read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "complete" and report["timings"]["images_this_session"] == 2


def test_resume_of_an_old_manifest_checks_the_files_it_lists(setup, finished, tmp_path, capsys):
    data, ckpt = setup
    out = copy_of(finished, tmp_path)
    # A manifest written before adv_sha256 existed, and a report before defaults were
    # recorded: still resumable; a row whose PNG is gone is redone.
    lines = (out / "manifest.csv").read_text().splitlines()
    old = "\n".join(line.rsplit(",", 2)[0] for line in lines) + "\n"  # no adv_sha256, l1
    (out / "manifest.csv").write_text(old)
    report = json.loads((out / "report.json").read_text())
    report["config"]["attack"]["params"] = {}
    (out / "report.json").write_text(json.dumps(report))
    first = read_manifest(out / "manifest.csv")[0]
    assert first["adv_sha256"] == ""
    (out / "adv" / first["adv_path"]).unlink()
    assert main([*args_for(data, ckpt, out), "--resume"]) == 0
    assert "1 finished image(s)" in capsys.readouterr().err
    rows, expected = read_manifest(out / "manifest.csv"), read_manifest(finished / "manifest.csv")
    # The old rows keep their empty hash; the redone row has its own.
    assert [r["adv_sha256"] for r in rows] == [expected[0]["adv_sha256"]] + [""] * 5
    strip = lambda rs: [{**r, "adv_sha256": "", "l1": ""} for r in rs]  # noqa: E731
    assert strip(rows) == strip(expected)


def test_a_symlinked_png_is_redone_never_read(setup, finished, tmp_path, capsys):
    data, ckpt = setup
    out = copy_of(finished, tmp_path)
    first = read_manifest(out / "manifest.csv")[0]
    png = out / "adv" / first["adv_path"]
    png.unlink()
    png.symlink_to("/dev/zero")  # reading it would never end
    assert main([*args_for(data, ckpt, out), "--resume"]) == 0
    assert "1 finished image(s)" in capsys.readouterr().err
    assert (
        not png.is_symlink()
        and png.read_bytes() == (finished / "adv" / first["adv_path"]).read_bytes()
    )


def edit_manifest(out, line, column, value):
    """Set ``column`` on manifest ``line`` (1: the first row) to ``value``, as a user might."""
    lines = (out / "manifest.csv").read_text().splitlines(keepends=True)
    fields = lines[line].split(",")
    fields[lines[0].strip().split(",").index(column)] = value
    lines[line] = ",".join(fields)
    (out / "manifest.csv").write_text("".join(lines))


@pytest.mark.parametrize(
    ("line", "column", "value", "says"),
    [(2, "linf", "nan", ("line 3", "'linf'", "nan")), (1, "eps", "0.03", ("eps 0.03", "index 0"))],
)
def test_an_edited_manifest_value_is_one_error(
    setup, finished, tmp_path, capsys, line, column, value, says
):
    # linf=nan: named by line and column (never a null in metrics); an eps that is not the
    # run's: named by row (was a traceback).
    data, ckpt = setup
    out = copy_of(finished, tmp_path)
    edit_manifest(out, line, column, value)
    rc = main([*args_for(data, ckpt, out), "--resume"])
    one_error_line(capsys, rc, *says)


def test_labels_that_cannot_apply_are_an_error(tmp_path, capsys):
    rc = main(
        ["generate", "--model", "resnet18", "--weights", "random", "--attack", "fgsm",
         "--labels", "/nonexistent/LOC.csv", "--out", str(tmp_path / "o"), "-q"]
    )  # fmt: skip
    one_error_line(capsys, rc, "--labels", "bundled sample")


def test_report_records_every_effective_param(finished):
    from advtune import attacks

    params = json.loads((finished / "report.json").read_text())["config"]["attack"]["params"]
    spec = attacks.spec("fgsm")
    assert params == {k: v for k, v in spec.defaults.items() if k != spec.radius_key}


# --------------------------------------------------------------------------- hang


def test_huge_steps_are_refused_before_the_model_load(tmp_path, capsys):
    rc = main(
        ["generate", "--model", "resnet18", "--weights", "/nonexistent.pt", "--attack", "pgd",
         "--steps", "1" + "0" * 40, "--out", str(tmp_path / "o")]
    )  # fmt: skip
    one_error_line(capsys, rc, "steps must lie in [1, 1000000]")
    assert not (tmp_path / "o").exists()


def test_preset_values_are_bounded_too(tmp_path, capsys):
    preset = tmp_path / "p.toml"
    preset.write_text('attack = "pgd"\neps = "4/255"\nsteps = 100000000000000\n')
    rc = main(["generate", "--model", "resnet18", "--preset", str(preset), "--out", str(tmp_path)])
    one_error_line(capsys, rc, "steps must lie in [1, 1000000]")


# --------------------------------------------------------------------------- tracebacks


def test_a_factory_that_is_no_model_builder(tmp_path, capsys):
    rc = main(["generate", "--model", "json:loads", "--weights", "random", "--attack", "fgsm",
               "--out", str(tmp_path / "o")])  # fmt: skip
    one_error_line(capsys, rc, "json:loads", "not a model builder", "s")


def test_a_deeply_nested_preset(tmp_path, capsys):
    preset = tmp_path / "deep.toml"
    preset.write_text('attack = "fgsm"\nx = ' + "[" * 20000 + "]" * 20000 + "\n")
    rc = main(["generate", "--model", "resnet18", "--preset", str(preset)])
    one_error_line(capsys, rc, "deep.toml", "nested too deeply")


def test_a_seed_beyond_int64(capsys):
    rc = main(["generate", "--model", "resnet18", "--seed", str(2**64)])
    one_error_line(capsys, rc, "--seed", str(2**63 - 1), str(2**64))


def test_colliding_long_names_get_short_distinct_pngs(setup, tmp_path, capsys):
    data, ckpt = setup
    folder = tmp_path / "long" / "a"
    folder.mkdir(parents=True)
    source = next(data.rglob("*.JPEG"))
    for ext in (".jpg", ".png"):
        from PIL import Image

        Image.open(source).convert("RGB").save(folder / ("x" * 251 + ext))
    out = tmp_path / "o"
    args = args_for(tmp_path / "long", ckpt, out)
    assert main(args) == 0, capsys.readouterr().err
    pngs = sorted(p.name for p in (out / "adv" / "a").iterdir())
    assert len(pngs) == 2 and all(len(n) <= 255 for n in pngs)


def _bytes_folder(data, tmp_path):
    folder = tmp_path / "bytes"
    (folder / "a").mkdir(parents=True)
    source = next(data.rglob("*.JPEG")).read_bytes()
    (folder / "a" / os.fsdecode(b"bad\xff\xfe.JPEG")).write_bytes(source)
    (folder / "a" / "ok.JPEG").write_bytes(source)
    return folder


def _check_bytes_run(out):
    assert len(read_manifest(out / "manifest.csv")) == 2
    assert (out / "adv" / "a" / os.fsdecode(b"bad\xff\xfe.png")).is_file()


def test_file_names_that_are_not_utf8(setup, tmp_path, capsys):
    data, ckpt = setup
    out, folder = tmp_path / "o", _bytes_folder(data, tmp_path)
    assert main(args_for(folder, ckpt, out)) == 0, capsys.readouterr().err
    _check_bytes_run(out)
    before = (out / "manifest.csv").read_bytes()
    assert main([*args_for(folder, ckpt, out), "--resume"]) == 0  # the paths digest matches
    assert (out / "manifest.csv").read_bytes() == before


@pytest.mark.slow  # a subprocess: ~20 s on the shared 2-core machine
def test_file_names_that_are_not_utf8_under_lang_c(setup, tmp_path):
    data, ckpt = setup
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "advtune", *args_for(_bytes_folder(data, tmp_path), ckpt, out)],
        env={**os.environ, "LANG": "C", "LC_ALL": "C", "OMP_NUM_THREADS": "1"},
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    _check_bytes_run(out)


def test_a_report_nested_too_deeply(setup, finished, tmp_path, capsys):
    data, ckpt = setup
    out = copy_of(finished, tmp_path)
    (out / "report.json").write_text("[" * 200_000)
    rc = main([*args_for(data, ckpt, out), "--resume"])
    one_error_line(capsys, rc, "report.json", "nested too deeply")


def test_overwrite_replaces_a_symlinked_png_and_keeps_the_outside_file(
    setup, finished, tmp_path, capsys
):
    data, ckpt = setup
    out = copy_of(finished, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    png = out / "adv" / read_manifest(out / "manifest.csv")[0]["adv_path"]
    png.unlink()
    png.symlink_to(outside)
    assert main([*args_for(data, ckpt, out), "--overwrite"]) == 0, capsys.readouterr().err
    assert outside.read_text() == "keep me"
    assert not png.is_symlink() and png.read_bytes()[:4] == b"\x89PNG"


class _Returns(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        logits = self.lin(x.mean(dim=(2, 3)))
        if self.kind == "tuple":
            return logits, logits
        if self.kind == "numpy":
            return logits.detach().numpy()
        return logits.round().long()


class _Tiny(torch.utils.data.Dataset):
    def __init__(self):
        self.paths, self.skipped = ["a.png", "b.png"], []
        self.labeled, self.root, self.layout = True, None, "test"

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return {"image": torch.full((3, 8, 8), 0.5), "label": i, "index": i, "path": self.paths[i]}


@pytest.mark.parametrize(
    ("kind", "says"), [("tuple", "returned a tuple"), ("numpy", "returned a ndarray"),
                       ("int64", "torch.int64 logits")],
)  # fmt: skip
def test_api_models_returning_no_float_logits_tensor(kind, says, tmp_path):
    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,))
    spec = RunSpec(attack=config, out_dir=tmp_path / "o", command="evaluate", num_workers=0)
    with pytest.raises(UserError, match=says):
        run(spec, _Returns(kind), _Tiny())


def test_four_channels_for_a_three_channel_model():
    from advtune.models import random_net
    from advtune.models.classifier import ImageClassifier

    model = ImageClassifier(
        random_net("resnet18"), num_classes=1000, name="resnet18", weights="random"
    )
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*\(2, 4, 16, 16\)"):
        model(torch.zeros(2, 4, 16, 16))


# --------------------------------------------------------------------------- unclear


def test_an_unknown_flag_is_named(capsys):
    rc = main(["generate", "--frobnicate"])
    line = one_error_line(capsys, rc, "--frobnicate")
    assert "--model" not in line
    # Abbreviations argparse accepts are no unknown flags: --model is then what is missing.
    rc = main(["generate", "--wei", "random"])
    one_error_line(capsys, rc, "required: --model")


def test_an_unknown_robustbench_name_without_the_package(monkeypatch, capsys):
    from advtune.models import robustbench_source

    def missing():
        raise UserError("this RobustBench model needs the 'robustbench' package")

    monkeypatch.setattr(robustbench_source, "_robustbench", missing)
    rc = main(["generate", "--model", "robustbench:Salman2020Do_R5", "--attack", "fgsm"])
    one_error_line(capsys, rc, "unknown RobustBench", "did you mean: Salman2020Do_R50")


# --------------------------------------------------------------------------- lock


@pytest.mark.slow  # a subprocess with two DataLoader workers: ~16 s here
def test_a_hard_kill_with_workers_leaves_no_lock(setup, tmp_path):
    data, ckpt = setup
    out = tmp_path / "out"
    args = [*args_for(data, ckpt, out)]
    args[args.index("--workers") + 1] = "2"
    proc = subprocess.run(
        [sys.executable, STOPHOOK, *args],
        env={**os.environ, STOP_HOOK_ENV: "1:kill", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # At once, while the dead run's DataLoader workers may still be exiting.
    from advtune.run.outputs import OutputDir

    again = OutputDir(out)
    again.lock()
    again.unlock()


def test_a_forked_child_does_not_hold_the_lock(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, signal, time; from advtune.run.outputs import OutputDir; "
        f"OutputDir({str(out)!r}).lock()\n"
        "if os.fork() == 0:\n    time.sleep(60); os._exit(0)\n"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    assert proc.wait(timeout=120) == -signal.SIGKILL
    from advtune.run.outputs import OutputDir

    deadline = time.monotonic() + 1.0  # the child sleeps for 60 s: no waiting for it
    again = OutputDir(out)
    again.lock()
    again.unlock()
    assert time.monotonic() < deadline


# --------------------------------------------------------------------------- also seen


def test_random_weights_say_so_in_report_and_plot(setup, tmp_path, monkeypatch):
    from advtune.run import runner

    titles = []
    monkeypatch.setattr(runner, "plot_curve", lambda m, p, title="": titles.append(title) or False)
    data, _ = setup
    rc = main(
        ["evaluate", "--model", "resnet18", "--weights", "random", "--data", str(data),
         "--out", str(tmp_path / "o"), "--image-size", "32", "--workers", "0",
         "--attack", "fgsm", "--eps", "1/255,2/255", "-q"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["model"]["random_weights"] is True
    assert titles and "RANDOM WEIGHTS" in titles[0]


def test_a_failed_start_leaves_no_empty_folder_and_downloads_talk_on_stderr(
    tmp_path, monkeypatch, capsys
):
    import torchvision

    def offline(name, weights=None, progress=True):
        print('Downloading: "https://example.invalid/x.pth" to /cache/x.pth')
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    out = tmp_path / "advtune-out"
    rc = main(["generate", "--model", "resnet18", "--attack", "fgsm", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 2 and "could not download" in captured.err
    assert "Downloading" not in captured.out and "Downloading" in captured.err
    assert not out.exists()


def test_profiler_noise_is_filtered(capfd):
    from advtune.bench import _profiler_noise_filtered

    with _profiler_noise_filtered():
        os.write(2, b"USDT:2026-12-06 20:28:01 1:1 SyncActivityProfilerHandler.cpp:39] start\n")
        os.write(2, b"ERROR:2026-12-06 20:28:01 1:1 DeviceProperties.cpp:56] gpuGetDeviceCount\n")
        os.write(2, b"a real message\n")
    err = capfd.readouterr().err
    assert err == "a real message\n"


def test_list_presets_columns_line_up(monkeypatch, capsys):
    from advtune import presets

    real = presets.list_presets()
    long = dataclasses.replace(real[0], name="a-very-long-preset-name-" * 2)
    monkeypatch.setattr(presets, "list_presets", lambda: [*real, long])
    assert main(["list", "presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len({line.index(" eps=") for line in lines}) == 1


# --------------------------------------------------------------------------- issue 18.7


def test_no_test_hook_in_the_cli():
    import advtune.cli as cli

    assert not hasattr(cli, "STOP_HOOK_ENV")
    assert "ADVTUNE_TEST" not in Path(cli.__file__).read_text()


def test_model_sources_share_one_build_signature():
    from advtune import models

    assert set(models._SOURCES) == {"torchvision", "timm", "hf", "robustbench"}
    card = models.model_card("resnet18", weights="random")
    net = models._SOURCES["torchvision"].arch(card)
    assert isinstance(net, nn.Module)
    assert np.isfinite(sum(float(p.detach().sum()) for p in net.parameters()))


def test_api_seeds_beyond_int64_are_one_error(tmp_path):
    from advtune.models import model_card

    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,), seed=2**64)
    with pytest.raises(UserError, match="seed must be an integer in"):
        RunSpec(attack=config, out_dir=tmp_path / "o")
    with pytest.raises(UserError, match=r"seed must be in \[-2\*\*63"):
        model_card("resnet18", weights="random", seed=2**64)


def test_a_float_setting_beyond_any_real_value_is_refused(capsys):
    # An L2 eps of 1e308 is finite but overflowed the 8-bit level check (a traceback).
    rc = main(
        ["generate", "--model", "resnet18", "--attack", "pgd", "--norm", "l2", "--eps", "1e308"]
    )
    one_error_line(capsys, rc, "eps must be <= 1e+12", "1e+308")
