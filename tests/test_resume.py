"""Nothing lost: an interrupted run resumes to exactly the uninterrupted result.

Interruptions come from the testing hook ``ADVTUNE_TEST_STOP_AFTER_BATCHES`` (``N``: raise
KeyboardInterrupt after N batches were written; ``N:kill``: SIGKILL the process, so no
clean-up code runs at all) and from a run callback's ``on_batch``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from fakes import write_run_inputs
from torch import nn

from advtune.cli import STOP_HOOK_ENV, main
from advtune.io import read_manifest
from advtune.run import AttackConfig, RunCallbacks, RunSpec, run


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
    monkeypatch.setenv(STOP_HOOK_ENV, "2")
    assert main(cli_args(data, ckpt, out)) == 130
    assert "--resume" in capsys.readouterr().err
    rows = read_manifest(out / "manifest.csv")
    assert [r["index"] for r in rows] == [0, 1, 2, 3]  # two finished batches kept
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    monkeypatch.delenv(STOP_HOOK_ENV)
    assert main([*cli_args(data, ckpt, out), "--resume"]) == 0
    resumed, _ = assert_same_run(out, uninterrupted)
    assert resumed["timings"]["resumed"] is True
    assert resumed["timings"]["images_this_session"] == 2
    assert [s["images"] for s in resumed["timings"]["sessions"]] == [4, 2]


def test_sigkill_then_resume(setup, uninterrupted, tmp_path):
    data, ckpt = setup
    out = tmp_path / "out"
    env = {**os.environ, STOP_HOOK_ENV: "1:kill", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "advtune", *cli_args(data, ckpt, out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
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
