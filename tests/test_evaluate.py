"""The run pipeline's pieces: seeds, faithful quantisation, batches, metrics, outputs."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import OOMAbove, TensorImages, linear_classifier
from torch import nn

from advtune.errors import UserError
from advtune.run import (
    AttackConfig,
    RunSpec,
    attack_batch,
    attack_loader,
    compute_metrics,
    format_eps,
    format_summary,
    plot_curve,
    quantize_adv,
    sample_seeds,
)
from advtune.run import run as run_spec
from advtune.run.outputs import OutputDir, adv_relpaths, config_differences
from advtune.storage import (
    ManifestWriter,
    atomic_write_text,
    format_manifest,
    merge_manifests,
    parse_manifest,
    read_manifest,
    save_png,
)

SIZE = 8
CLASSES = 5


def tiny_model(seed: int = 0) -> nn.Module:
    return linear_classifier(seed, size=SIZE, classes=CLASSES)


def run(model, ds, config, *, out_dir, callbacks=(), **spec):
    """:func:`advtune.run.run` of ``RunSpec(attack=config, out_dir=out_dir, **spec)``."""
    return run_spec(RunSpec(attack=config, out_dir=out_dir, **spec), model, ds, callbacks=callbacks)


def batch_of(ds: TensorImages, idx: list[int]) -> dict:
    return {
        "image": ds.images[idx],
        "label": torch.tensor([ds[i]["label"] for i in idx]),
        "index": torch.tensor(idx),
        "path": [ds.paths[i] for i in idx],
    }


# --------------------------------------------------------------------------- seeds


def test_sample_seeds_depend_only_on_run_seed_and_index():
    a = sample_seeds(7, [0, 1, 2, 3])
    assert a.dtype == torch.int64 and (a >= 0).all()
    assert torch.equal(a, sample_seeds(7, torch.tensor([0, 1, 2, 3])))
    # Order/batch composition does not matter.
    assert torch.equal(sample_seeds(7, [3, 1]), a[[3, 1]])
    assert len(set(a.tolist())) == 4
    assert not torch.equal(a, sample_seeds(8, [0, 1, 2, 3]))


# --------------------------------------------------------------------------- quantisation


def _clean_and_adv(n=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 6, 6), generator=g).to(dtype) / 255
    return x, g


@pytest.mark.parametrize("eps", [4 / 255, 2.5 / 255, 1 / 255])
def test_quantize_linf_stays_within_eps(eps):
    x, g = _clean_and_adv()
    x_adv = (x + (torch.rand(x.shape, generator=g, dtype=x.dtype) * 2 - 1) * eps).clamp(0, 1)
    q = quantize_adv(x_adv, x, norm="linf", eps=eps)
    assert q.dtype == torch.uint8
    delta = (q.double() - x.double() * 255).abs() / 255
    assert float(delta.max()) <= eps + 1e-12
    # Nothing moves further than rounding would: within half a level of x_adv.
    assert float((q.double() - x_adv * 255).abs().max()) <= 1.0 + 1e-9
    # The budget is used: some pixels sit at the largest whole level inside eps.
    assert float(delta.max()) == pytest.approx(math.floor(eps * 255 + 1e-6) / 255)


def test_quantize_l2_projects_when_rounding_overshoots():
    eps = 0.05
    x, g = _clean_and_adv(n=32)
    direction = torch.randn(x.shape, generator=g, dtype=x.dtype)
    direction /= direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # On the sphere: rounding overshoots the budget for many samples.
    x_adv = x + eps * direction
    inside = (x_adv >= 0) & (x_adv <= 1)
    x_adv = torch.where(inside, x_adv, x)  # keep the perturbation norm at most eps
    rounded = torch.round(x_adv * 255)
    overshoot = (rounded - x * 255).flatten(1).norm(dim=1) / 255 > eps
    assert overshoot.any(), "test input should exercise the projection"
    q = quantize_adv(x_adv, x, norm="l2", eps=eps)
    l2 = (q.double() - x * 255).flatten(1).norm(dim=1) / 255
    assert float(l2.max()) <= eps * (1 + 1e-12)
    # Each pixel is the rounding or the truncation of the float perturbation.
    assert float((q.double() - x_adv * 255).abs().max()) < 1.0
    # Where rounding fitted, the result is plain rounding.
    fits = ~overshoot
    assert torch.equal(q[fits].double(), rounded[fits])


def test_quantize_without_budget_rounds():
    x, g = _clean_and_adv(n=4)
    x_adv = torch.rand(x.shape, generator=g, dtype=x.dtype)
    q = quantize_adv(x_adv, x, norm="l2", eps=None)
    assert torch.equal(q, torch.round(x_adv * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="threat model 'l0'"):
        quantize_adv(x_adv, x, norm="l0", eps=0.1)


# --------------------------------------------------------------------------- one batch


def test_attack_batch_rows_describe_saved_images():
    ds = TensorImages(6)
    model = tiny_model()
    config = AttackConfig(attack="pgd", norm="linf", eps=(2 / 255, 8 / 255), params={"steps": 3})
    out = attack_batch(
        model, ds.images, torch.tensor(ds.labels), list(range(6)), ds.paths, config,
        adv_paths=adv_relpaths(ds.paths),
    )  # fmt: skip
    assert len(out.rows) == 12 and len(out.images) == 2
    assert [r["eps"] for r in out.rows[:2]] == [2 / 255, 8 / 255]
    for e, eps in enumerate(config.eps):
        rows = out.rows[e::2]
        saved = out.images[e].double() / 255
        logits = model(saved.float())
        assert [r["adv_pred"] for r in rows] == logits.argmax(1).tolist()
        for i, r in enumerate(rows):
            assert r["success"] == (r["adv_pred"] != r["label"])
            assert r["linf"] <= eps + 1e-9
            clean = torch.round(ds.images[i].double() * 255) / 255
            assert r["linf"] == pytest.approx(float((saved[i] - clean).abs().max()), abs=1e-12)
            assert r["adv_path"] == ds.paths[i].replace(".jpg", ".png")
    assert out.model_calls > 2


def test_attack_batch_unlabeled_and_targets():
    ds = TensorImages(5, labeled=False)
    model = tiny_model()
    labels = torch.full((5,), -1)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,), targeted="random", seed=3)
    out = attack_batch(model, ds.images, labels, list(range(5)), ds.paths, config)
    clean = model(ds.images).argmax(1).tolist()
    assert [r["label"] for r in out.rows] == clean  # labels are the clean predictions
    assert all(r["target"] is not None and r["target"] != r["label"] for r in out.rows)
    assert all(r["success"] == (r["adv_pred"] == r["target"]) for r in out.rows)
    # A sample's target depends on its index and the seed, not on its batch.
    alone = attack_batch(model, ds.images[3:4], labels[3:4], [3], ds.paths[3:4], config)
    assert alone.rows[0]["target"] == out.rows[3]["target"]
    ll = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,), targeted="least-likely")
    out = attack_batch(model, ds.images, labels, list(range(5)), ds.paths, ll)
    assert [r["target"] for r in out.rows] == model(ds.images).argmin(1).tolist()


def test_attack_batch_label_out_of_range():
    ds = TensorImages(2)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(1 / 255,))
    with pytest.raises(UserError, match="label 7 is out of range"):
        attack_batch(tiny_model(), ds.images[:2], torch.tensor([0, 7]), [0, 1], ds.paths, config)


def test_config_norm_reaches_the_attack():
    ds = TensorImages(2)
    labels = torch.tensor(ds.labels[:2])
    seen = {}

    def fake(model, x, y, *, target=None, generator=None, seeds=None, **kwargs):
        seen.update(kwargs)
        from advtune.attacks import fgsm

        return fgsm(model, x, y, eps=kwargs["eps"])

    l2 = AttackConfig(attack="pgd", norm="l2", eps=(0.5,), params={"steps": 1})
    attack_batch(tiny_model(), ds.images[:2], labels, [0, 1], ds.paths, l2, attack_fn=fake)
    assert seen["norm"] == "l2" and seen["steps"] == 1
    bad = AttackConfig(attack="pgd", norm="l2", eps=(0.5,), params={"norm": "linf"})
    with pytest.raises(ValueError, match="disagrees"):
        attack_batch(tiny_model(), ds.images[:2], labels, [0, 1], ds.paths, bad, attack_fn=fake)
    with pytest.raises(ValueError, match="'fgsm' is linf"):
        cfg = AttackConfig(attack="fgsm", norm="l2", eps=(0.5,))
        attack_batch(tiny_model(), ds.images[:2], labels, [0, 1], ds.paths, cfg)


def test_attack_rejecting_settings_is_a_user_error():
    ds = TensorImages(2)
    config = AttackConfig(attack="pgd", norm="linf", eps=(1 / 255,), params={"loss": "nope"})
    with pytest.raises(UserError, match="rejected its settings"):
        attack_batch(tiny_model(), ds.images[:2], torch.tensor([0, 1]), [0, 1], ds.paths, config)


# --------------------------------------------------------------------------- the loop


def _rows(ds, model, config, batch_size, sampler=None, pad_to=None):
    from advtune.data import make_loader

    rows = []
    loader = make_loader(ds, batch_size=batch_size, num_workers=0, sampler=sampler)
    attack_loader(model, loader, config, sink=lambda b: rows.extend(b.rows), pad_to=pad_to)
    return rows


def test_attack_loader_is_independent_of_batch_size_and_order():
    ds = TensorImages(7)
    model = tiny_model()
    # Random start + random targets: per-sample seeds make this batch-independent.
    config = AttackConfig(
        attack="pgd", norm="linf", eps=(8 / 255,), params={"steps": 2}, targeted="random", seed=1
    )
    by2 = _rows(ds, model, config, 2)
    by3 = _rows(ds, model, config, 3)
    assert by2 == by3
    assert [r["index"] for r in by2] == list(range(7))
    # A subset, in another order (what a resumed run or a torchrun rank attacks), with
    # every call padded to 3 images: the rows of the padded run of all images.
    padded = _rows(ds, model, config, 3, pad_to=3)
    partial = _rows(ds, model, config, 3, sampler=[6, 1, 3, 2, 5], pad_to=3)
    assert [r["index"] for r in partial] == [6, 1, 3, 2, 5]
    assert sorted(partial, key=lambda r: r["index"]) == [
        r for r in padded if r["index"] in (1, 2, 3, 5, 6)
    ]


# --------------------------------------------------------------------------- metrics


def _row(index, label, clean, adv, *, eps=0.1, success=None, target=None, linf=0.1, l2=1.0):
    return {
        "path": f"p{index}.jpg", "label": label, "clean_pred": clean, "adv_pred": adv,
        "success": (adv != label) if success is None else success, "linf": linf, "l2": l2,
        "index": index, "eps": eps, "target": target, "clean_conf": 0.5, "adv_conf": 0.25,
        "attack_success": (adv != label) if success is None else success, "adv_path": "",
        "broken_by": "", "adv_sha256": "", "l1": 0.5,
    }  # fmt: skip


def test_compute_metrics_by_hand():
    rows = [
        _row(0, 0, 0, 1, linf=0.1, l2=1.0),  # correct, flipped
        _row(1, 0, 0, 0, linf=0.2, l2=2.0),  # correct, robust
        _row(2, 1, 1, 2, linf=0.3, l2=3.0),  # correct, flipped
        _row(3, 1, 0, 0, linf=0.4, l2=5.0),  # wrong from the start
    ]
    config = AttackConfig(attack="pgd", norm="linf", eps=(0.1,))
    m = compute_metrics(list(reversed(rows)), config, categories=["cat", "dog", "emu"])
    assert m["num_images"] == 4
    assert m["clean_accuracy"] == 3 / 4
    assert m["robust_accuracy"] == 1 / 4
    assert m["success_rate"] == 2 / 3  # over the 3 correctly classified
    assert m["success_rate_all"] == 3 / 4
    assert m["linf_mean"] == pytest.approx(0.25)
    assert m["l2_median"] == statistics.median([1.0, 2.0, 3.0, 5.0])
    assert m["per_class"]["0"] == {
        "name": "cat", "num_images": 2, "clean_accuracy": 1.0, "robust_accuracy": 0.5,
        "success_rate": 0.5,
    }  # fmt: skip
    assert m["per_class"]["1"]["success_rate"] == 1.0
    assert m["per_eps"][0]["eps"] == 0.1 and m["quantization_flips"] == 0


def test_compute_metrics_curve_and_targeted():
    rows = [_row(0, 0, 0, 0, eps=e) for e in (0.1, 0.2)]
    rows += [_row(1, 1, 1, 2, eps=0.1, target=2, success=True)]
    rows += [_row(1, 1, 1, 1, eps=0.2, target=2, success=False)]
    config = AttackConfig(attack="pgd", norm="linf", eps=(0.1, 0.2), targeted="random")
    m = compute_metrics(rows, config)
    assert [e["eps"] for e in m["per_eps"]] == [0.1, 0.2]
    assert [e["success_rate"] for e in m["per_eps"]] == [0.5, 0.0]  # hit rate over all
    assert "robust_accuracy" not in m  # several eps: only per_eps
    with pytest.raises(ValueError, match="eps"):
        compute_metrics([_row(0, 0, 0, 0, eps=0.3)], config)


# --------------------------------------------------------------------------- files


def test_manifest_round_trip_and_merge(tmp_path):
    rows = [_row(i, i % 2, 0, 1, linf=1 / 255 * (i + 1), l2=math.pi * i) for i in range(4)]
    rows[1]["target"] = 3
    writer = ManifestWriter(tmp_path / "m.csv")
    writer.extend(rows[2:])
    writer.extend(rows[:2])
    assert read_manifest(tmp_path / "m.csv") == rows  # sorted by index, floats exact
    with pytest.raises(ValueError, match="duplicate"):
        writer.extend(rows[:1])
    assert writer.done_paths() == {r["path"] for r in rows}
    a, b = tmp_path / "r0.csv", tmp_path / "r1.csv"
    atomic_write_text(a, format_manifest([rows[0], rows[2]]))
    atomic_write_text(b, format_manifest([rows[1], rows[3], rows[2]]))  # one duplicate
    assert merge_manifests([a, b], tmp_path / "all.csv") == rows
    assert read_manifest(tmp_path / "all.csv") == rows
    conflict = dict(rows[2], adv_pred=4)
    atomic_write_text(b, format_manifest([conflict]))
    with pytest.raises(ValueError, match="conflicting"):
        merge_manifests([a, b], tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="missing columns"):
        parse_manifest("path,label\nx,1\n")


def test_atomic_write_keeps_old_content_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write_text(path, "old")

    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]  # no temporary file left behind


def test_save_png_is_lossless(tmp_path):
    from PIL import Image

    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    save_png(tmp_path / "a" / "b.png", image)
    back = torch.from_numpy(np.array(Image.open(tmp_path / "a" / "b.png")))
    assert torch.equal(back.permute(2, 0, 1), image)
    with pytest.raises(ValueError, match="uint8"):
        save_png(tmp_path / "c.png", image.float())


def test_adv_relpaths_avoid_collisions():
    paths = adv_relpaths(["a/x.jpg", "a/x.png", "b/y.JPEG"])
    assert paths == {"a/x.jpg": "a/x.jpg.png", "a/x.png": "a/x.png.png", "b/y.JPEG": "b/y.png"}


def test_output_dir_refuses_and_resumes(tmp_path):
    config = {"attack": {"eps": [0.1]}, "model": {"name": "m"}}
    out = OutputDir(tmp_path / "out")
    out.start(config, resume=False, overwrite=False)
    out.write_report({"config": config})
    out.writer.extend([_row(0, 0, 0, 1)])
    again = OutputDir(tmp_path / "out")
    with pytest.raises(UserError, match="already holds results; pass --resume"):
        again.start(config, resume=False, overwrite=False)
    changed = {"attack": {"eps": [0.2]}, "model": {"name": "m"}}
    with pytest.raises(UserError, match=r"attack\.eps: \[0\.1\] -> \[0\.2\]"):
        again.start(changed, resume=True, overwrite=False)
    again.start(config, resume=True, overwrite=False)
    assert len(again.writer) == 1
    fresh = OutputDir(tmp_path / "out")
    fresh.start(changed, resume=False, overwrite=True)
    assert not (tmp_path / "out" / "manifest.csv").exists()
    assert config_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "d": 2}) == [
        "a.b", "c", "d",
    ]  # fmt: skip


def test_output_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="is not writable"):
        OutputDir(blocker / "out")


def test_run_writes_outputs_and_curve(tmp_path):
    ds = TensorImages(5)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(1 / 255, 4 / 255, 16 / 255))
    report = run(
        tiny_model(), ds, config, out_dir=tmp_path / "o", command="evaluate",
        save_images=False, batch_size=2, num_workers=0,
    )  # fmt: skip
    assert report["status"] == "complete"
    curve = [e["robust_accuracy"] for e in report["metrics"]["per_eps"]]
    assert len(curve) == 3 and curve[0] >= curve[-1]
    assert (tmp_path / "o" / "robust_accuracy.png").stat().st_size > 1000
    assert len(read_manifest(tmp_path / "o" / "manifest.csv")) == 15
    summary = format_summary(report)
    assert "16/255" in summary and "robust acc" in summary
    with pytest.raises(UserError, match="generate takes one eps"):
        RunSpec(attack=config, out_dir=tmp_path / "p", save_images=True)


def test_plot_without_matplotlib_warns(tmp_path, monkeypatch):
    metrics = {"clean_accuracy": 1.0, "per_eps": [{"eps": 0.1, "robust_accuracy": 0.5}]}
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes the import fail
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_curve(metrics, tmp_path / "p.png") is False
    assert not (tmp_path / "p.png").exists()


def test_format_eps():
    assert format_eps(4 / 255) == "4/255"
    assert format_eps(0.5) == "0.5"
    assert format_eps(None) == "-"


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_get_the_umask_mode(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        save_png(tmp_path / "d" / "b.png", torch.zeros(3, 2, 2, dtype=torch.uint8))
        ManifestWriter(tmp_path / "m.csv").extend([])
        with open(tmp_path / "plain.txt", "w") as f:  # what open() gives, for comparison
            f.write("x")
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    for name in ("a.txt", "d/b.png", "m.csv", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name


# --------------------------------------------------------------------------- out of memory


def test_oom_backoff_in_a_run_loses_nothing(tmp_path, monkeypatch):
    import advtune.run.loop as ev

    ds = TensorImages(7)
    config = AttackConfig(
        attack="pgd", norm="linf", eps=(8 / 255,), params={"steps": 2}, targeted="random", seed=1
    )

    def go(name, batch_size):
        return run(
            tiny_model(), ds, config, out_dir=tmp_path / name, batch_size=batch_size,
            num_workers=0,
        )  # fmt: skip

    reference = {b: go(f"ref{b}", b) for b in (4, 2, 1)}
    # Batches of 4: the first call fits; then the limit drops to 2 (a batch is split and
    # its padded tail runs at 2), then to 1.
    fake = OOMAbove(ev.attack_batch, limits=[4, 2, 1])
    monkeypatch.setattr(ev, "attack_batch", fake)
    with pytest.warns(RuntimeWarning, match="out of memory") as caught:
        report = go("oom", 4)
    assert len([w for w in caught if "out of memory" in str(w.message)]) == 1  # warned once
    # [0-3] ok; [4-6]+pad: OOM -> [4,5] ok; [6]+pad: OOM -> [6] ok.
    assert fake.sizes == [4, 4, 2, 2, 1]
    assert report["status"] == "complete"
    assert report["settings"]["oom_backoffs"] == 2
    assert report["settings"]["batch_size"] == 4 and report["settings"]["final_batch_size"] == 1
    assert report["timings"]["sessions"][0]["oom_backoffs"] == 2
    rows = read_manifest(tmp_path / "oom" / "manifest.csv")
    assert [r["index"] for r in rows] == list(range(7))  # nothing lost, nothing twice
    pngs = sorted(p.name for p in (tmp_path / "oom" / "adv").rglob("*.png"))
    assert len(pngs) == 7
    # What is guaranteed: each image's row is the row of a run whose attack calls had the
    # same size as its own call (every call is padded to the size in effect).
    by_size = {b: read_manifest(tmp_path / f"ref{b}" / "manifest.csv") for b in reference}
    assert rows[:4] == by_size[4][:4]
    assert rows[4:6] == by_size[2][4:6]
    assert rows[6:] == by_size[1][6:]
    # Not byte for byte the uninterrupted run here: a call of one image takes another CPU
    # kernel path (gemv), whose softmax confidences differ in the last bits.
    assert by_size[1] != by_size[4]

    # A memory limit from the start: the first call of more than 2 images fails and every
    # later call has 2 (the last one padded). That is the run at batch size 2, byte for
    # byte, PNGs included -- and, as this model computes the same floats for calls of 2
    # and 4 images on the CPU (asserted first), the uninterrupted run at 4 too.
    monkeypatch.setattr(ev, "attack_batch", OOMAbove(fake.real, limits=[2]))
    with pytest.warns(RuntimeWarning, match="out of memory attacking 4 images"):
        report = go("oom2", 4)
    assert report["settings"]["oom_backoffs"] == 1
    assert report["settings"]["final_batch_size"] == 2
    assert by_size[2] == by_size[4]
    manifest = (tmp_path / "oom2" / "manifest.csv").read_bytes()
    assert manifest == (tmp_path / "ref2" / "manifest.csv").read_bytes()
    assert manifest == (tmp_path / "ref4" / "manifest.csv").read_bytes()
    for row in rows:
        png = Path("adv") / row["adv_path"]
        assert (tmp_path / "oom2" / png).read_bytes() == (tmp_path / "ref4" / png).read_bytes()


def test_oom_at_batch_size_one_still_fails(tmp_path, monkeypatch):
    import advtune.run.loop as ev

    monkeypatch.setattr(ev, "attack_batch", OOMAbove(ev.attack_batch, limits=[0]))
    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,))
    with pytest.raises(torch.OutOfMemoryError):
        run(tiny_model(), TensorImages(3), config, out_dir=tmp_path / "o", batch_size=2,
            num_workers=0)  # fmt: skip
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["status"] == "failed"


def test_auto_batch_size_probes_the_attack_itself(monkeypatch):
    """The probe step runs attack_batch with the attack cut to one iteration; the cache key
    names the configuration. (The probing itself is tested in test_runtime.py.)"""
    import advtune.run.probe as probe
    from advtune import runtime

    seen = {}

    def fake_auto(model, **kwargs):
        seen.update(kwargs)
        return 5

    monkeypatch.setattr(runtime, "auto_batch_size", fake_auto)
    calls = []

    def spy_attack(model, x, y, *, target=None, generator=None, seeds=None, **kwargs):
        from advtune.attacks import pgd

        calls.append((x.shape[0], target is not None, kwargs))
        return pgd(model, x, y, target=target, seeds=seeds, **kwargs)

    import advtune.attacks as attacks

    real_get = attacks.get
    monkeypatch.setattr(
        attacks, "get", lambda name: spy_attack if name == "pgd" else real_get(name)
    )
    config = AttackConfig(
        attack="pgd", norm="linf", eps=(1 / 255, 8 / 255), params={"steps": 50, "restarts": 3},
        targeted="random",
    )  # fmt: skip
    size = probe.auto_batch_size(
        tiny_model(), config, input_shape=(3, SIZE, SIZE), key={"model": "tiny"}, limit=40
    )
    assert size == 5
    assert seen["limit"] == 40 and seen["input_shape"] == (3, SIZE, SIZE)
    assert seen["key"]["model"] == "tiny" and seen["key"]["attack"] == "pgd"
    assert seen["key"]["eps_count"] == 2
    assert seen["key"]["device"] == "cpu" and seen["key"]["torch"] == torch.__version__
    seen["step"](tiny_model(), torch.rand(6, 3, SIZE, SIZE))
    # Every eps (their results stay on the device until the batch is done), one step each,
    # on the whole batch, targeted as configured.
    assert [(n, targeted, kw["eps"]) for n, targeted, kw in calls] == [
        (6, True, 1 / 255), (6, True, 8 / 255),
    ]  # fmt: skip
    assert all(kw["steps"] == 1 and kw["restarts"] == 1 for _, _, kw in calls)


def test_auto_batch_size_on_cpu_is_the_default_clamped():
    from advtune.run import auto_batch_size

    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,))
    kw = {"input_shape": (3, SIZE, SIZE), "key": {"model": "tiny"}}
    assert auto_batch_size(tiny_model(), config, limit=1000, **kw) == 32
    assert auto_batch_size(tiny_model(), config, limit=7, **kw) == 7


# --------------------------------------------------------------------------- trustworthy runs


class _Broken(nn.Module):
    """``model``'s logits, with NaN for the images whose index is in ``nan_images`` (the
    images are told apart by their first pixel), and +inf on adversarial inputs if asked."""

    def __init__(self, model, images, nan_images, *, inf_on_adv=False):
        super().__init__()
        self.model, self.inf_on_adv = model, inf_on_adv
        self.name, self.num_classes = "broken", CLASSES
        self.keys = {float(images[i].flatten()[0]) for i in nan_images}
        self.clean = {tuple(x.flatten()[:4].tolist()) for x in images}

    def forward(self, x):
        out = self.model(x)
        x = x.detach()
        for i in range(x.shape[0]):
            if float(x[i].flatten()[0]) in self.keys:
                out[i] = float("nan")
            elif self.inf_on_adv and tuple(x[i].flatten()[:4].tolist()) not in self.clean:
                out[i, 0] = float("inf")
        return out


def test_nonfinite_logits_are_never_robust_and_are_counted(tmp_path):
    ds = TensorImages(6)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(1 / 255,))
    model = _Broken(tiny_model(), ds.images, nan_images=[1, 4])
    with pytest.warns(RuntimeWarning, match="2 images of 6 had non-finite logits"):
        report = run(model, ds, config, out_dir=tmp_path / "o", batch_size=6, num_workers=0)
    rows = read_manifest(tmp_path / "o" / "manifest.csv")
    broken = [r for r in rows if r["index"] in (1, 4)]
    assert all(math.isnan(r["clean_conf"]) and r["clean_pred"] == -1 for r in broken)
    metrics = report["metrics"]
    assert metrics["num_nonfinite"] == 2
    # At 1/255 this model keeps almost every image: the two NaN ones are never robust.
    healthy = [r for r in rows if r["index"] not in (1, 4)]
    expected = sum(r["adv_pred"] == r["label"] for r in healthy) / 6
    assert metrics["robust_accuracy"] == expected
    assert metrics["clean_accuracy"] == sum(r["clean_pred"] == r["label"] for r in healthy) / 6
    assert "2 images with non-finite logits" in format_summary(report)


def test_nonfinite_adversarial_logits_are_never_robust(tmp_path):
    ds = TensorImages(4)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(8 / 255,))
    model = _Broken(tiny_model(), ds.images, nan_images=[], inf_on_adv=True)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        report = run(model, ds, config, out_dir=tmp_path / "o", batch_size=4, num_workers=0)
    assert report["metrics"]["robust_accuracy"] == 0.0
    # Misclassified images need no perturbation (the attack returns them unchanged, with
    # finite logits); every image the attack moved has infinite logits and is flagged.
    rows = read_manifest(tmp_path / "o" / "manifest.csv")
    moved = [r for r in rows if r["linf"] > 0]
    assert moved and all(r["adv_pred"] == -1 and math.isnan(r["adv_conf"]) for r in moved)
    assert report["metrics"]["num_nonfinite"] == len(moved)


def test_all_nan_model_is_an_error(tmp_path):
    ds = TensorImages(3)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(1 / 255,))
    model = _Broken(tiny_model(), ds.images, nan_images=[0, 1, 2])
    with pytest.raises(UserError, match=r"non-finite .* on all 3 images"):
        run(model, ds, config, out_dir=tmp_path / "o", batch_size=3, num_workers=0)
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["status"] == "failed" and report["metrics"]["num_nonfinite"] == 3


def test_a_model_value_error_is_not_blamed_on_the_attack():
    class Picky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = tiny_model()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 1:  # the clean pass works, the attack's forward does not
                raise ValueError("the model's own complaint")
            return self.inner(x)

    ds = TensorImages(2)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(1 / 255,))
    with pytest.raises(ValueError, match="the model's own complaint") as caught:
        attack_batch(Picky(), ds.images, torch.tensor([0, 1]), [0, 1], ds.paths, config)
    assert not isinstance(caught.value, UserError)


def test_least_likely_target_is_the_attacks_definition():
    from advtune.attacks import least_likely_target

    ds = TensorImages(5)
    model = tiny_model()
    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,), targeted="least-likely")
    labels = torch.tensor(ds.labels)
    out = attack_batch(model, ds.images, labels, list(range(5)), ds.paths, config)
    expected = least_likely_target(model, ds.images)
    clash = expected == labels
    # Where the label itself is least likely, the next least likely class.
    second = model(ds.images).argsort(dim=1)[:, 1]
    expected = torch.where(clash, second, expected)
    assert [r["target"] for r in out.rows] == expected.tolist()
    assert all(r["target"] != r["label"] for r in out.rows)


def test_a_run_never_pads_beyond_the_dataset(tmp_path, monkeypatch):
    import advtune.run.loop as loop

    sizes = []
    real = loop.attack_batch

    def spy(model, images, *args, **kwargs):
        sizes.append(images.shape[0])
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(loop, "attack_batch", spy)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(4 / 255,))
    report = run(tiny_model(), TensorImages(5), config, out_dir=tmp_path / "o", batch_size=32,
                 num_workers=0)  # fmt: skip
    assert sizes == [5]
    assert report["settings"]["batch_size"] == 32 and report["settings"]["final_batch_size"] == 5


def test_plot_eps_ticks_are_evenly_spaced(tmp_path):
    from matplotlib.figure import Figure

    from advtune.run.report import eps_axis

    ax = Figure().add_subplot()
    place = eps_axis(ax, [4 / 255, 0.0, 1 / 255, 2 / 255, 1 / 255])
    assert place == {0.0: 0, 1 / 255: 1, 2 / 255: 2, 4 / 255: 3}
    assert list(ax.get_xticks()) == [0, 1, 2, 3]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1/255", "2/255", "4/255"]


def test_summary_grammar():
    from advtune.run.report import plural

    assert plural(1, "image") == "1 image" and plural(0, "image") == "0 images"


def test_signals_wait_for_the_current_write():
    import signal

    from advtune.run import signals

    previous = signals.install()
    try:
        done = []
        with pytest.raises(signals.Interrupted) as caught, signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("write finished")  # not cut short by the signal
        assert done == ["write finished"]
        assert caught.value.signum == signal.SIGTERM
        assert signals.exit_code(caught.value) == 143
        assert signals.exit_code(KeyboardInterrupt()) == 130
    finally:
        signals.restore(previous)
    assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]


# --------------------------------------------------------------------------- ensembles

_AA_BUDGET = {"steps": 2, "n_targets": 2, "queries": 10}


def test_ensemble_rows_record_broken_by_and_robust_after_matches_the_attack(tmp_path):
    from advtune import attacks

    ds = TensorImages(6)
    model = tiny_model()
    config = AttackConfig(
        attack="autoattack", norm="linf", eps=(1 / 255, 8 / 255), params=dict(_AA_BUDGET)
    )
    report = run(
        model, ds, config, out_dir=tmp_path / "o", batch_size=4, num_workers=0, command="evaluate"
    )
    rows = read_manifest(tmp_path / "o" / "manifest.csv")
    labels = torch.tensor(ds.labels)
    seeds = sample_seeds(config.seed, range(6))
    for entry, eps in zip(report["metrics"]["per_eps"], config.eps, strict=True):
        direct = attacks.get("autoattack")(
            model, ds.images, labels, seeds=seeds, eps=eps, norm="linf", **_AA_BUDGET
        )
        assert entry["robust_after"] == direct.robust_after()
        expected = [
            direct.components[i] if i >= 0 else ("clean" if i == -2 else "")
            for i in direct.broken_by.tolist()
        ]
        assert [r["broken_by"] for r in rows if r["eps"] == eps] == expected
    checks = report["checks"]
    assert {"randomized", "gradients", "monotone_eps"} <= set(checks)
    assert checks["randomized"]["batches"] == 2 * len(config.eps)  # 2 batches per eps
    summary = format_summary(report)
    assert "robust accuracy after APGD-CE (eps 1/255)" in summary


def test_other_attacks_leave_broken_by_empty_and_old_manifests_read():
    ds = TensorImages(3)
    config = AttackConfig(attack="fgsm", norm="linf", eps=(2 / 255,))
    out = attack_batch(
        tiny_model(), ds.images, torch.tensor(ds.labels), [0, 1, 2], ds.paths, config
    )
    assert [r["broken_by"] for r in out.rows] == ["", "", ""]
    assert "robust_after" not in compute_metrics(out.rows, config)
    # A manifest written before the broken_by column (and adv_sha256 and l1 after it): its
    # rows read back with "", and the L1 figures are unknown rather than partial.
    text = format_manifest(out.rows).splitlines()
    old = "\n".join(line.rsplit(",", 3)[0] for line in text) + "\n"
    assert not old.splitlines()[0].endswith("broken_by")
    back = parse_manifest(old)
    assert [r["broken_by"] for r in back] == ["", "", ""]
    now, then = compute_metrics(out.rows, config), compute_metrics(back, config)
    assert now["l1_mean"] > 0 and then["l1_mean"] is None and then["l1_median"] is None
    unknown = {"l1_mean": None, "l1_median": None}
    assert then == {**now, **unknown, "per_eps": [{**e, **unknown} for e in now["per_eps"]]}


def test_robust_after_and_check_warnings_by_hand():
    from advtune.attacks._masking import check_monotone
    from advtune.run.metrics import robust_after
    from advtune.run.report import aggregate_checks, check_warnings

    rows = [dict(_row(i, 0, 0, 1), broken_by=b) for i, b in enumerate(["clean", "a", "b", ""])]
    assert robust_after(rows, ["a", "b", "c"]) == {"clean": 0.75, "a": 0.5, "b": 0.25, "c": 0.25}
    bad = {"check": "gradients", "ok": False, "zero": 3}
    agg = aggregate_checks(
        [
            {"eps": 0.1, "gradients": {"check": "gradients", "ok": True}},
            {"eps": 0.2, "gradients": bad},
        ]
    )
    assert agg["gradients"] == {"batches": 2, "failed": 1, "first_failure": {"eps": 0.2, **bad}}
    with pytest.warns(UserWarning):
        monotone = check_monotone([(1 / 255, 0.2), (2 / 255, 0.5)], what="eps")
    lines = check_warnings({**agg, "monotone_eps": monotone, "skipped": ["square"]})
    assert len(lines) == 3
    assert any("'gradients' failed on 1 of 2" in line for line in lines)
    assert any("grows with eps" in line and "1/255 -> 2/255" in line for line in lines)
    assert check_warnings({"gradients": {"batches": 2, "failed": 0, "first_failure": None}}) == []


class _Noisy(nn.Module):
    """A randomised model: logits change between identical calls."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.name, self.num_classes = inner.name, inner.num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + 0.1 * torch.randn_like(out)


def test_masking_warnings_are_aggregated_and_raised_once(tmp_path):
    from advtune.attacks._masking import GradientMaskingWarning

    ds = TensorImages(6)
    config = AttackConfig(attack="autoattack", norm="linf", eps=(4 / 255,), params=dict(_AA_BUDGET))
    with pytest.warns(GradientMaskingWarning) as record:
        report = run(
            _Noisy(tiny_model()), ds, config, out_dir=tmp_path / "o", batch_size=2,
            num_workers=0, command="evaluate",
        )  # fmt: skip
    masking = [str(w.message) for w in record if issubclass(w.category, GradientMaskingWarning)]
    assert len(masking) == 1 and "'randomized' failed on 3 of 3" in masking[0]
    assert report["checks"]["randomized"]["failed"] == 3
    assert report["checks"]["randomized"]["first_failure"]["ok"] is False


def test_resumed_ensemble_run_reports_what_an_uninterrupted_one_does(tmp_path):
    from advtune.run import RunCallbacks

    class StopAfterFirstBatch(RunCallbacks):
        def on_batch(self, batches):
            raise KeyboardInterrupt

    ds = TensorImages(6)
    model = tiny_model()
    config = AttackConfig(
        attack="autoattack", norm="linf", eps=(2 / 255, 8 / 255), params=dict(_AA_BUDGET)
    )
    spec = {"batch_size": 2, "num_workers": 0, "command": "evaluate"}
    full = run(model, ds, config, out_dir=tmp_path / "full", **spec)
    with pytest.raises(KeyboardInterrupt):
        run(model, ds, config, out_dir=tmp_path / "part", callbacks=[StopAfterFirstBatch()], **spec)
    resumed = run(model, ds, config, out_dir=tmp_path / "part", resume=True, **spec)
    assert resumed["metrics"] == full["metrics"]
    assert [e["robust_after"] for e in resumed["metrics"]["per_eps"]] == [
        e["robust_after"] for e in full["metrics"]["per_eps"]
    ]
    # Checks add up over the two sessions: every batch × eps counted once.
    assert resumed["checks"] == full["checks"]
    assert full["checks"]["randomized"]["batches"] == 3 * 2
