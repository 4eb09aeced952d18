"""Nothing lost: an interrupted run resumes to exactly the uninterrupted result.

Interruptions come from the test stop hook (``tests/stophook.py``: ``N`` raises
KeyboardInterrupt after N batches were written; ``N:kill`` SIGKILLs the process, so no
clean-up code runs at all) and from a run callback's ``on_batch``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes import write_run_inputs
from stophook import STOP_HOOK_ENV, installed
from torch import nn

from advtune.cli import main
from advtune.run import AttackConfig, RunCallbacks, RunSpec, run
from advtune.storage import read_manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("resume"))


def cli_args(data, ckpt, out):
    # PGD with a random start and random targets: both depend on per-sample seeds.
    return [
        "generate", "--model", "resnet18", "--weights", str(ckpt), "--data", str(data),
        "--out", str(out), "--image-size", "32", "--batch-size", "2", "--workers", "0",
        "--attack", "pgd", "--eps", "4/255", "--steps", "2", "--targeted", "random",
        "--seed", "3", "-q",
    ]  # fmt: skip


STOPHOOK = str(Path(__file__).with_name("stophook.py"))


def advtune_process(args, *, env=(), **kwargs):
    """``python -m advtune ARGS`` in a subprocess (one thread), stderr captured; with
    :data:`STOP_HOOK_ENV` in ``env``, through the test stop hook."""
    launcher = [STOPHOOK] if STOP_HOOK_ENV in dict(env) else ["-m", "advtune"]
    return subprocess.run(
        [sys.executable, *launcher, *args],
        env={**os.environ, "OMP_NUM_THREADS": "1", **dict(env)},
        capture_output=True, text=True, timeout=300, **kwargs,
    )  # fmt: skip


def assert_same_run(a, b):
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    ra = json.loads((a / "report.json").read_text())
    rb = json.loads((b / "report.json").read_text())
    assert ra["status"] == rb["status"] == "complete"
    assert ra["metrics"] == rb["metrics"]
    assert ra["config"] == {**rb["config"]}
    pngs = sorted(p.relative_to(a) for p in (a / "adv").rglob("*.png"))
    assert pngs == sorted(p.relative_to(b) for p in (b / "adv").rglob("*.png"))
    for p in pngs:
        assert (a / p).read_bytes() == (b / p).read_bytes()
    return ra, rb


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    data, ckpt = setup
    out = tmp_path_factory.mktemp("full") / "out"
    assert main(cli_args(data, ckpt, out)) == 0
    assert len(read_manifest(out / "manifest.csv")) == 6
    return out


def test_ctrl_c_then_resume(setup, uninterrupted, tmp_path, monkeypatch, capsys):
    data, ckpt = setup
    out = tmp_path / "out"
    with installed("2"):
        assert main(cli_args(data, ckpt, out)) == 130
    assert "--resume" in capsys.readouterr().err
    rows = read_manifest(out / "manifest.csv")
    assert [r["index"] for r in rows] == [0, 1, 2, 3]  # two finished batches kept
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert main([*cli_args(data, ckpt, out), "--resume"]) == 0
    resumed, _ = assert_same_run(out, uninterrupted)
    assert resumed["timings"]["resumed"] is True
    assert resumed["timings"]["images_this_session"] == 2
    assert [s["images"] for s in resumed["timings"]["sessions"]] == [4, 2]


def test_sigkill_then_resume(setup, uninterrupted, tmp_path):
    data, ckpt = setup
    out = tmp_path / "out"
    proc = advtune_process(cli_args(data, ckpt, out), env={STOP_HOOK_ENV: "1:kill"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Killed without any clean-up: one batch is on disk, and no temporary files.
    assert [r["index"] for r in read_manifest(out / "manifest.csv")] == [0, 1]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert json.loads((out / "report.json").read_text())["status"] == "running"
    assert main([*cli_args(data, ckpt, out), "--resume"]) == 0
    assert_same_run(out, uninterrupted)
    # Resuming a finished run attacks nothing and changes nothing.
    before = (out / "manifest.csv").read_text()
    assert main([*cli_args(data, ckpt, out), "--resume"]) == 0
    assert (out / "manifest.csv").read_text() == before


def test_resume_refuses_changed_settings(setup, uninterrupted, tmp_path, capsys):
    data, ckpt = setup
    out = tmp_path / "out"
    args = cli_args(data, ckpt, out)
    assert main([*args, "--limit", "2"]) == 0
    for change, key in (
        (["--seed", "4"], "attack.seed"),
        (["--steps", "3"], "attack.params.steps"),
        (["--limit", "3"], "data.num_images"),
        (["--image-size", "40"], "preprocess"),
        (["--convbn", "eval"], "model.convbn"),
    ):
        rc = main([*args, "--limit", "2", *change, "--resume"])
        err = capsys.readouterr().err
        assert rc == 2 and "settings differ" in err and key in err, err
        assert len(err.strip().splitlines()) == 1
    # Settings that do not change results may change.
    assert main([*args, "--limit", "2", "--batch-size", "1", "--resume"]) == 0


class _Images(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, 3, 4, 4), generator=g).float() / 255
        self.labels = torch.randint(0, 3, (n,), generator=g).tolist()
        self.paths = [f"img{i}.png" for i in range(n)]
        self.labeled, self.skipped, self.root, self.layout = True, [], None, "fake"

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i], "index": i, "path": self.paths[i]}


class _StopAfter(RunCallbacks):
    def __init__(self, batches):
        self.batches = batches

    def on_batch(self, batches):
        if batches == self.batches:
            raise KeyboardInterrupt


def test_library_resume_with_several_eps(tmp_path):
    g = torch.Generator().manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 3)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(3, 48, generator=g))
    config = AttackConfig(
        attack="pgd", norm="linf", eps=(1 / 255, 8 / 255), params={"steps": 2}, seed=9
    )

    def spec(name, **more):
        return RunSpec(
            attack=config, out_dir=tmp_path / name, command="evaluate", batch_size=3,
            num_workers=0, **more,
        )  # fmt: skip

    ds = _Images(8)
    full = run(spec("full"), net, ds)
    with pytest.raises(KeyboardInterrupt):
        run(spec("part"), net, ds, callbacks=[_StopAfter(2)])
    assert len(read_manifest(tmp_path / "part" / "manifest.csv")) == 12  # 6 images × 2 eps
    resumed = run(spec("part", resume=True), net, ds)
    assert resumed["metrics"] == full["metrics"]
    assert (tmp_path / "part" / "manifest.csv").read_text() == (
        tmp_path / "full" / "manifest.csv"
    ).read_text()


# --------------------------------------------------------------------------- one run per folder


def test_a_second_run_on_the_same_folder_is_refused(setup, tmp_path, capsys):
    from advtune.run.outputs import OutputDir

    data, ckpt = setup
    out = tmp_path / "out"
    holder = OutputDir(out)
    holder.lock()  # another run, in the middle of its work
    try:
        rc = main([*cli_args(data, ckpt, out), "--limit", "2"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1
        assert err.startswith("advtune: error:") and "in use by another advtune run" in err
        assert not (out / "manifest.csv").exists()
    finally:
        holder.unlock()
    assert main([*cli_args(data, ckpt, out), "--limit", "2"]) == 0


def test_a_killed_run_leaves_no_stuck_lock(tmp_path):
    out = tmp_path / "out"
    code = (
        "import os, signal; from advtune.run.outputs import OutputDir; "
        f"OutputDir({str(out)!r}).lock(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    from advtune.run.outputs import OutputDir

    again = OutputDir(out)
    again.lock()  # the OS dropped the dead process's lock
    again.unlock()


def test_sigterm_marks_the_report_and_resumes(setup, uninterrupted, tmp_path):
    data, ckpt = setup
    out = tmp_path / "out"
    proc = advtune_process(cli_args(data, ckpt, out), env={STOP_HOOK_ENV: "1:term"})
    assert proc.returncode == 143, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "Traceback" not in proc.stderr
    assert json.loads((out / "report.json").read_text())["status"] == "interrupted"
    assert [r["index"] for r in read_manifest(out / "manifest.csv")][:2] == [0, 1]
    assert main([*cli_args(data, ckpt, out), "--resume"]) == 0
    assert_same_run(out, uninterrupted)


def test_ctrl_c_during_startup_is_one_line(setup, tmp_path):
    import time

    data, ckpt = setup
    proc = subprocess.Popen(
        [sys.executable, "-m", "advtune", *cli_args(data, ckpt, tmp_path / "out")],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE, text=True,
        # A child inherits an ignored SIGINT, and Python then keeps ignoring it until
        # advtune routes it: a Ctrl-C before that was lost (exit 0, seen under load after
        # other tests). The default disposition is what a user's shell gives.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    time.sleep(1.0)  # importing torch and loading the model take longer than this
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------------- what resume trusts


def test_resume_refuses_another_checkpoint_at_the_same_path(setup, tmp_path, capsys):
    from fakes import write_checkpoint

    data, _ = setup
    ckpt = write_checkpoint(tmp_path / "model.pt", "resnet18", seed=1)
    out = tmp_path / "out"
    args = [*cli_args(data, ckpt, out), "--limit", "2"]
    assert main(args) == 0
    write_checkpoint(ckpt, "resnet18", seed=2)  # other weights, same file name
    rc = main([*args, "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "settings differ" in err and "model.weights_sha256" in err, err


def test_overwrite_and_resume_stay_inside_the_output_folder(setup, tmp_path, capsys):
    from advtune.storage import format_manifest

    data, ckpt = setup
    out = tmp_path / "deep" / "out"
    args = [*cli_args(data, ckpt, out), "--limit", "2"]
    assert main(args) == 0
    victims = [tmp_path / "victim.txt", tmp_path / "abs-victim.txt"]
    for v in victims:
        v.write_text("not advtune's")
    (tmp_path / "deep" / "elsewhere").mkdir()
    (tmp_path / "deep" / "elsewhere" / "x.png").write_text("not advtune's")
    (out / "adv" / "link").symlink_to(tmp_path / "deep" / "elsewhere")
    rows = read_manifest(out / "manifest.csv")
    rows[0]["adv_path"] = "../../../victim.txt"
    rows[1]["adv_path"] = str(victims[1])  # absolute
    rows.append({**rows[1], "index": 5, "adv_path": "link/x.png"})  # a symlink out
    (out / "manifest.csv").write_text(format_manifest(rows))
    capsys.readouterr()
    rc = main([*args, "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "outside" in err and len(err.strip().splitlines()) == 1, err
    assert main([*args, "--overwrite"]) == 0
    assert all(v.read_text() == "not advtune's" for v in victims)
    assert (tmp_path / "deep" / "elsewhere" / "x.png").exists()


# --------------------------------------------------------------------------- write failures


def test_disk_full_is_one_line_and_the_folder_stays_consistent(
    setup, uninterrupted, tmp_path, monkeypatch, capsys
):
    import errno

    import advtune.run.outputs as outputs

    data, ckpt = setup
    out = tmp_path / "out"
    real = outputs.save_png
    saved = []

    def full_disk(path, image):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        saved.append(path)
        return real(path, image)

    monkeypatch.setattr(outputs, "save_png", full_disk)
    rc = main(cli_args(data, ckpt, out))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "--resume" in err
    # The first batch (2 images) is complete on disk: rows and their PNGs.
    rows = read_manifest(out / "manifest.csv")
    assert [r["index"] for r in rows] == [0, 1]
    assert all((out / "adv" / r["adv_path"]).exists() for r in rows)
    assert json.loads((out / "report.json").read_text())["status"] == "failed"
    monkeypatch.undo()
    assert main([*cli_args(data, ckpt, out), "--resume"]) == 0
    assert_same_run(out, uninterrupted)


def test_report_json_being_a_folder_is_one_line(setup, tmp_path, capsys):
    data, ckpt = setup
    out = tmp_path / "out"
    (out / "report.json").mkdir(parents=True)
    rc = main([*cli_args(data, ckpt, out), "--limit", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "is a folder" in err, err


def test_file_size_limit_is_one_line(setup, tmp_path):
    import resource

    data, ckpt = setup
    out = tmp_path / "out"

    def limit():  # 2 KB per file: the first PNG does not fit
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    proc = advtune_process([*cli_args(data, ckpt, out), "--limit", "2"], preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0], proc.stderr
    assert read_manifest(out / "manifest.csv") == []  # no row without its PNG
