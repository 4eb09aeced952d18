"""``OUT/report.html``: built from a run's files, escaped, self-contained, and rendered in
a real headless browser (Debian's ``chromium``; ``.ci/run`` installs it and sets
``ADVTUNE_REQUIRE_CHROMIUM=1`` so CI fails instead of skipping)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from fakes import write_checkpoint
from PIL import Image

from advtune.cli import main
from advtune.errors import UserError
from advtune.run.html import build_html
from advtune.storage import read_manifest

HOSTILE = "<script>alert(1)</script>&\"x'"
HOSTILE_FILE = "<img src=x onerror=alert(1)>&\"q'"  # a file name cannot hold "/"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A generate run (PNGs) on photos with a hostile file name, and an AutoAttack
    evaluate run; labels are the model's clean predictions (unlabeled folder)."""
    root = tmp_path_factory.mktemp("runs")
    data = root / "photos"
    data.mkdir()
    rng = np.random.default_rng(0)
    for _i, name in enumerate(["plain.png", f"{HOSTILE_FILE}.png", "third.png"]):
        small = rng.integers(0, 256, (6, 7, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 36), Image.BILINEAR).save(data / name)
    ckpt = write_checkpoint(root / "r18.pt")
    base = ["--model", "resnet18", "--weights", str(ckpt), "--data", str(data),
            "--image-size", "32", "--batch-size", "3", "--workers", "0", "-q"]  # fmt: skip
    gen, ev = root / "gen", root / "ev"
    assert main(["generate", *base, "--attack", "pgd", "--eps", "1/255", "-p", "steps=3",
                 "--out", str(gen)]) == 0  # fmt: skip
    assert main(["evaluate", *base, "--attack", "autoattack", "-p", "steps=2", "-p",
                 "queries=5", "-p", "n_targets=2", "--eps", "1/255,8/255",
                 "--out", str(ev)]) == 0  # fmt: skip
    return gen, ev


def test_every_run_writes_its_page_and_strings_are_escaped(runs):
    gen, _ev = runs
    for out in runs:
        assert (out / "report.html").stat().st_size > 1000
    page = (gen / "report.html").read_text()
    assert "<script" not in page and "<img src=x" not in page  # no script, no tag injected
    assert html_escaped(HOSTILE_FILE) in page
    # Self-contained: every image is inline data, nothing refers elsewhere.
    sources = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"(href|src)=\"(https?:|file:|//)", page)
    rows = read_manifest(gen / "manifest.csv")
    assert page.count("<div class=card>") == len(rows) == 3
    # Most interesting first: the broken images before the others.
    broken = sorted(r["path"] for r in rows if r["success"])
    order = [m for m in re.findall(r"<div><b>([^<]*)</b></div>", page)]
    assert sorted(order[: len(broken)]) == sorted(html_escaped(p) for p in broken)


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_hostile_class_names_and_paths_in_the_files_are_escaped(runs, tmp_path):
    gen, _ = runs
    out = tmp_path / "copy"
    shutil.copytree(gen, out)
    report = json.loads((out / "report.json").read_text())
    for entry in report["metrics"]["per_eps"]:
        for value in entry["per_class"].values():
            value["name"] = HOSTILE
    report["config"]["attack"]["params"] = {"<img src=x onerror=alert(1)>": 1}
    (out / "report.json").write_text(json.dumps(report))
    page = build_html(out)
    assert "<script" not in page and "<img src=x" not in page
    assert html_escaped(HOSTILE) in page


def test_robustbench_fields_of_an_autoattack_run(runs):
    _, ev = runs
    report = json.loads((ev / "report.json").read_text())
    fields = report["robustbench"]
    assert [f["eps"] for f in fields] == ["1/255", "8/255"]
    for entry, f in zip(report["metrics"]["per_eps"], fields, strict=True):
        assert f["clean_acc"] == f"{100 * entry['clean_accuracy']:.2f}"
        assert f["autoattack_acc"] == f"{100 * entry['robust_accuracy']:.2f}"
        assert f["n_examples"] == entry["num_images"] == 3
        assert (f["threat_model"], f["dataset"]) == ("Linf", "imagenet")
        # Budgets set by hand: no official run, and the version says so.
        assert f["attack_version"].startswith(
            "autoattack standard with steps=2 n_targets=2 queries=5 (advtune "
        )
    page = (ev / "report.html").read_text()
    assert "Published vs measured (RobustBench)" in page
    assert "which component broke how many" in page.replace("\n", " ")
    assert "No adversarial images saved" in page  # evaluate keeps no PNGs
    gen_report = json.loads((runs[0] / "report.json").read_text())
    assert "robustbench" not in gen_report  # PGD is no AutoAttack run


def test_report_command(runs, tmp_path, capsys):
    gen, _ = runs
    (gen / "report.html").unlink()
    assert main(["report", str(gen), "--gallery", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(gen / "report.html")
    assert (gen / "report.html").read_text().count("<div class=card>") == 1
    assert main(["report", str(tmp_path)]) == 2  # no report.json: one line, exit 2
    assert "no report.json" in capsys.readouterr().err
    with pytest.raises(UserError, match="gallery must be"):
        build_html(gen, gallery=-1)


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("ADVTUNE_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (ADVTUNE_REQUIRE_CHROMIUM) but not found")
        pytest.skip("chromium not installed (apt-get install chromium; .ci/run installs it)")
    return path


def _browser(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--disable-extensions", "--virtual-time-budget=5000"]  # fmt: skip
    return subprocess.run(
        [_chromium(), *flags, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_page_renders_in_a_real_browser_with_its_images(runs, tmp_path):
    gen, _ = runs
    page = tmp_path / "report.html"  # inline images only: it renders from anywhere
    page.write_text(build_html(gen))
    shot = tmp_path / "shot.png"
    done = _browser(f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20  # not blank
    # The gallery's images drew: the photos and amplified perturbations are colourful,
    # the rest of the page is grey, white and one blue; a missing image is an icon.
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 60).sum() > 3 * 96 * 96
    # Each <img> loaded, recorded by a probe in a copy without the page's CSP (which
    # forbids scripts): naturalWidth > 0 for every image, written into the DOM.
    probe = tmp_path / "probe.html"
    text = re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", page.read_text())
    script = (
        "<script>window.addEventListener('load',()=>{document.body.setAttribute("
        "'data-widths',[...document.images].map(i=>i.naturalWidth).join(','))})</script>"
    )
    probe.write_text(text.replace("</body>", script + "</body>"))
    dom = _browser("--dump-dom", probe.as_uri()).stdout
    widths = re.search(r'data-widths="([^"]*)"', dom)
    assert widths is not None, dom[-500:]
    values = [int(w) for w in widths.group(1).split(",")]
    assert len(values) == 9 and all(w > 0 for w in values)  # 3 cards x 3 images


def test_gallery_order_broken_at_the_smallest_eps_first():
    from advtune.run.html import _order

    def row(index, eps, success, clean_pred=1):
        return {"index": index, "eps": eps, "success": success, "label": 1,
                "clean_pred": clean_pred, "adv_path": f"{index}.png"}  # fmt: skip

    rows = [
        row(0, 1 / 255, False), row(0, 4 / 255, False),  # never broken
        row(1, 1 / 255, False), row(1, 4 / 255, True),  # broken at 4/255
        row(2, 1 / 255, True), row(2, 4 / 255, True),  # broken at 1/255
        row(3, 1 / 255, True, clean_pred=0),  # misclassified: not "broken"
    ]  # fmt: skip
    assert [(r["index"], r["eps"]) for r in _order(rows)] == [
        (2, 1 / 255), (1, 4 / 255), (0, 1 / 255), (3, 1 / 255)
    ]  # fmt: skip


# --------------------------------------------------------------------------- progress


def test_component_clock_times_each_component_and_gives_its_eta():
    from advtune.run.callbacks import ComponentClock

    ticks = iter([0.0, 2.0, 5.0, 6.0, 10.0, 11.0, 13.0])
    clock = ComponentClock(now=lambda: next(ticks))
    clock.mark()  # batch 1 starts at t=0
    clock.component("apgd-ce", 6, 10)  # 2 s
    clock.component("apgd-t", 5, 10)  # 3 s
    clock.mark()  # batch 2 starts at t=6
    clock.component("apgd-ce", 4, 10)  # 4 s
    clock.component("apgd-t", 3, 10)  # 1 s
    assert clock.seconds == {"apgd-ce": 6.0, "apgd-t": 4.0}
    assert clock.robust_accuracy("apgd-t") == 8 / 20
    # 20 images done in 6 s and 4 s: 0.3 and 0.2 s per image, 40 left.
    assert clock.eta(done=20, total=60) == pytest.approx({"apgd-ce": 12.0, "apgd-t": 8.0})
    assert clock.describe(done=20, total=60) == (
        "robust after apgd-t 40.0% · ETA apgd-ce 0:12 apgd-t 0:08"
    )


def test_autoattack_reports_each_component_to_the_hook():
    import torch
    from modelzoo import tiny_bn_net

    from advtune.attacks import get
    from advtune.attacks.autoattack import COMPONENT_PROGRESS

    net = tiny_bn_net(classes=5)
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)  # every sample starts correct: every component attacks
    calls: list[tuple[str, int, int]] = []
    token = COMPONENT_PROGRESS.set(lambda *a: calls.append(a))
    try:
        res = get("autoattack")(net, x, y, eps=8 / 255, steps=3, queries=5, n_targets=2,
                                seeds=torch.arange(6))  # fmt: skip
    finally:
        COMPONENT_PROGRESS.reset(token)
    after = res.robust_after()
    assert [c[0] for c in calls] == [k for k in after if k != "clean"][: len(calls)]
    assert calls and calls[0][0] == "apgd-ce"
    for name, robust, n in calls:
        assert n == 6 and robust / n == pytest.approx(after[name])
    assert COMPONENT_PROGRESS.get() is None  # nothing left behind


def test_the_progress_bar_shows_component_eta(runs, tmp_path, capsys):
    from fakes import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "r18.pt")
    data = runs[0].parent / "photos"
    capsys.readouterr()
    assert main(["evaluate", "--model", "resnet18", "--weights", str(ckpt), "--data", str(data),
                 "--image-size", "32", "--batch-size", "1", "--workers", "0",
                 "--attack", "autoattack", "-p", "steps=2", "-p", "queries=5",
                 "-p", "n_targets=2", "--eps", "8/255", "--out", str(tmp_path / "o")]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "robust after apgd-ce" in err and "ETA apgd-ce" in err
