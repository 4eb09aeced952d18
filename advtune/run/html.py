"""``OUT/report.html``: one self-contained page about a finished run.

Built from the run's files only: ``report.json``, ``manifest.csv``, the plot and the
adversarial PNGs under ``OUT/adv`` (plus, for the gallery's clean column, the source
images under the data root that ``report.json`` records, cropped with the recorded
preprocessing). No model is loaded and nothing is recomputed. Every image is inlined as
a base64 PNG, so the page can be mailed or archived alone; there is no script and no
network access. Every string from the files (paths, class names, settings) is escaped:
they are hostile input.

Sections: run settings and model card, clean and robust accuracy per eps (and per
ensemble component: which one broke how many), published vs measured figures
(RobustBench), the robust-accuracy-vs-eps plot, the per-class table, model calls,
warnings (gradient-masking checks, non-finite logits) and a gallery of the first
``gallery`` adversarial examples (clean, adversarial, perturbation amplified, true and
predicted class, norms), the most interesting first: broken at the smallest eps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from advtune.errors import UserError
from advtune.run.report import check_warnings, format_eps

__all__ = ["HTML_NAME", "build_html", "write_html"]

HTML_NAME = "report.html"
_THUMB = 128  # gallery image side in CSS pixels (small crops are upscaled, nearest)

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2433;background:#fff;max-width:1200px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ccd}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccd;padding:3px 8px;text-align:right}
th{background:#eef1f7}td.l,th.l{text-align:left}.sub{color:#556}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:6px 10px;margin:4px 0}
.ok{color:#2a7a2a}.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ccd;padding:6px;font-size:12px;width:404px}
.card img{width:128px;height:128px;image-rendering:pixelated;background:#eee}
.card .row{display:flex;gap:4px}.card .cap{display:flex;gap:4px;color:#556}
.card .cap span{width:128px;text-align:center}.broken{color:#b02020;font-weight:600}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:4px 0}dt{color:#556}dd{margin:0}
"""


def _e(value: Any) -> str:
    """Escaped text of anything (``None`` → ``-``)."""
    return html.escape("-" if value is None else str(value), quote=True)


def _pct(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * float(value):.1f}%"


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{float(value):.4g}"


def _png_data(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(src: str | None, alt: str) -> str:
    if src is None:
        return f'<img alt="{_e(alt)}">'
    return f'<img src="{src}" alt="{_e(alt)}">'


def _inside(root: Path, relative: Any) -> Path | None:
    from advtune.run.outputs import inside

    return inside(root, relative) if isinstance(relative, str) else None


def _dl(pairs: Sequence[tuple[str, Any]]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in pairs if v not in (None, ""))
    return f"<dl>{items}</dl>"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 0) -> str:
    """An escaped table; the first ``left`` columns are left-aligned."""

    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls(i)}>{_e(c)}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


# --------------------------------------------------------------------------- sections


def _settings(report: Mapping[str, Any]) -> str:
    config = report.get("config") or {}
    attack = config.get("attack") or {}
    eps = attack.get("eps")
    eps_list = eps if isinstance(eps, list) else [eps]
    data = report.get("data") or {}
    timings = report.get("timings") or {}
    device = report.get("device") or {}
    run = [
        ("command", report.get("command")),
        ("status", report.get("status")),
        ("attack", attack.get("attack")),
        ("norm", attack.get("norm")),
        ("eps", ", ".join(format_eps(e) for e in eps_list if isinstance(e, (int, float)))),
        ("params", json.dumps(attack.get("params") or {}, sort_keys=True)),
        ("targeted", attack.get("targeted")),
        ("seed", attack.get("seed")),
        ("data", data.get("root")),
        ("layout", data.get("layout")),
        ("images", data.get("num_images")),
        ("labels", data.get("label_source")),
        ("skipped files", len(data.get("skipped") or []) or None),
        ("device", f"{device.get('type', '')} {device.get('name', '')}".strip()),
        ("wall time", f"{float(timings.get('wall_s') or 0):.1f} s"),
        ("images/s", _num(timings.get("images_per_s"))),
        ("model calls", _model_calls(report)),
        ("versions", ", ".join(f"{k} {v}" for k, v in (report.get("versions") or {}).items() if v)),
    ]
    model = report.get("model") or {}
    card = [
        (key, model.get(key))
        for key in (
            "name",
            "source",
            "arch",
            "weights",
            "preprocess",
            "convbn",
            "wrapper",
            "num_classes",
            "dataset",
            "threat_model",
            "checkpoint",
            "seed",
        )
    ]
    card.insert(5, ("mean / std", f"{model.get('mean')} / {model.get('std')}"))
    return f"<h2>Run settings</h2>{_dl(run)}<h2>Model card</h2>{_dl(card)}"


def _model_calls(report: Mapping[str, Any]) -> str | None:
    sessions = (report.get("timings") or {}).get("sessions") or []
    calls = sum(int(s.get("model_calls") or 0) for s in sessions)
    images = sum(int(s.get("images") or 0) for s in sessions)
    if not sessions:
        return None
    per = f" ({calls / images:.1f} per image)" if images else ""
    return f"{calls} batched forward/backward passes{per}"


def _broken_counts(rows: Sequence[Mapping[str, Any]]) -> dict[Any, dict[str, int]]:
    """``{eps: {component: images it broke}}`` from the manifest's ``broken_by``."""
    out: dict[Any, dict[str, int]] = {}
    for row in rows:
        name = row.get("broken_by") or ""
        if name and name != "clean":
            per = out.setdefault(row.get("eps"), {})
            per[name] = per.get(name, 0) + 1
    return out


def _accuracy(report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    metrics = report.get("metrics") or {}
    per_eps = metrics.get("per_eps") or []
    if not per_eps:
        return "<h2>Accuracy</h2><p>No results yet.</p>"
    table = _table(
        ["eps", "images", "clean acc", "robust acc", "success", "mean L∞", "mean L2", "mean L1"],
        [
            [
                format_eps(e.get("eps")),
                e.get("num_images"),
                _pct(e.get("clean_accuracy")),
                _pct(e.get("robust_accuracy")),
                _pct(e.get("success_rate")),
                _num(e.get("linf_mean")),
                _num(e.get("l2_mean")),
                _num(e.get("l1_mean")),
            ]
            for e in per_eps
        ],
    )
    parts = [f"<h2>Clean and robust accuracy</h2>{table}"]
    broken = _broken_counts(rows)
    for entry in per_eps:
        after = entry.get("robust_after")
        if not after:
            continue
        counts = broken.get(entry.get("eps"), {})
        comp_rows: list[list[Any]] = [["clean (initial accuracy)", "", _pct(after.get("clean"))]]
        comp_rows += [
            [name, counts.get(name, 0), _pct(value)]
            for name, value in after.items()
            if name != "clean"
        ]
        parts.append(
            f"<p class=sub>Ensemble at eps {_e(format_eps(entry.get('eps')))}: which "
            "component broke how many images, and the robust accuracy after it</p>"
            + _table(["component", "images broken", "robust acc after"], comp_rows, left=1)
        )
    return "".join(parts)


def _published(report: Mapping[str, Any]) -> str:
    rb = report.get("robustbench") or []
    published = (report.get("model") or {}).get("published")
    if not rb and not published:
        return ""
    rows = []
    if published:
        rows.append(
            [
                "published",
                f"{published.get('attack')} {published.get('norm')}",
                format_eps(published.get("eps")),
                published.get("images"),
                _pct(published.get("clean")),
                _pct(published.get("robust")),
            ]
        )
    for entry in rb:
        rows.append(
            [
                "measured",
                f"{entry.get('attack_version')} {entry.get('threat_model')}",
                entry.get("eps"),
                entry.get("n_examples"),
                f"{entry.get('clean_acc')}%",
                f"{entry.get('autoattack_acc')}%",
            ]
        )
    note = (
        f"<p class=sub>{_e(published.get('reference'))}</p>"
        if published and published.get("reference")
        else ""
    )
    return (
        "<h2>Published vs measured (RobustBench)</h2>"
        + _table(["", "attack", "eps", "images", "clean acc", "robust acc"], rows, left=2)
        + note
    )


def _plot(out: Path, report: Mapping[str, Any]) -> str:
    path = _inside(out, "robust_accuracy.png")
    if path is None or not path.is_file():
        return ""
    try:
        with Image.open(path) as image:
            src = _png_data(image.convert("RGB"))
    except (OSError, ValueError):
        return ""
    return f"<h2>Robust accuracy vs eps</h2>{_img(src, 'robust accuracy vs eps')}"


def _per_class(report: Mapping[str, Any]) -> str:
    per_eps = (report.get("metrics") or {}).get("per_eps") or []
    if not per_eps or not per_eps[0].get("per_class"):
        return ""
    classes = list(per_eps[0]["per_class"])
    rows = []
    for key in classes:
        first = per_eps[0]["per_class"][key]
        row = [key, first.get("name"), first.get("num_images"), _pct(first.get("clean_accuracy"))]
        row += [
            _pct((e.get("per_class") or {}).get(key, {}).get("robust_accuracy")) for e in per_eps
        ]
        rows.append(row)
    header = ["class", "name", "images", "clean acc"]
    header += [f"robust @ {format_eps(e.get('eps'))}" for e in per_eps]
    return "<h2>Per class</h2>" + _table(header, rows, left=2)


def _warnings(report: Mapping[str, Any]) -> str:
    lines = check_warnings(report.get("checks"))
    nonfinite = (report.get("metrics") or {}).get("num_nonfinite") or 0
    if nonfinite:
        lines.insert(
            0,
            f"{nonfinite} image(s) with non-finite logits (NaN/inf): counted as neither "
            "correct nor robust",
        )
    if (report.get("model") or {}).get("weights") == "random":
        lines.append("random weights: the model is untrained, its accuracies mean nothing")
    checks = [k for k in (report.get("checks") or {}) if k != "skipped"]
    if not lines:
        done = ", ".join(checks) if checks else "none recorded"
        return f"<h2>Warnings</h2><p class=ok>None (checks run: {_e(done)}).</p>"
    return "<h2>Warnings</h2>" + "".join(f"<div class=warn>{_e(line)}</div>" for line in lines)


# --------------------------------------------------------------------------- gallery


_PREPROCESS = re.compile(
    r"crop_size=(\d+), resize_size=(None|\d+|\((\d+), (\d+)\)), interpolation=.*'(\w+)'"
)


def _preprocess(config: Mapping[str, Any]) -> Any:
    """The recorded preprocessing (``repr`` of a :class:`Preprocess`), or ``None``."""
    from torchvision.transforms import InterpolationMode

    from advtune.models.cards import Preprocess

    match = _PREPROCESS.search(str(config.get("preprocess", "")))
    if match is None:
        return None
    crop, resize, h, w, mode = match.groups()
    size: int | tuple[int, int] | None
    size = None if resize == "None" else (int(h), int(w)) if h else int(resize)
    try:
        return Preprocess(int(crop), size, InterpolationMode(mode))
    except ValueError:
        return None


def _array(path: Path | None) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _thumb(array: np.ndarray) -> str:
    image = Image.fromarray(np.clip(np.rint(array * 255), 0, 255).astype(np.uint8))
    if max(image.size) < _THUMB:  # upscale small crops so pixels stay visible
        scale = max(1, _THUMB // max(image.size))
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    elif max(image.size) > 2 * _THUMB:
        image.thumbnail((2 * _THUMB, 2 * _THUMB))
    return _png_data(image)


def _order(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One row per image that has a PNG: broken ones first, by the smallest eps that
    broke them, then the rest; ties by dataset index."""
    by_image: dict[Any, list[Mapping[str, Any]]] = {}
    for row in rows:
        by_image.setdefault(row.get("index"), []).append(row)
    chosen = []
    for group in by_image.values():
        with_png = [r for r in group if r.get("adv_path")]
        if not with_png:
            continue
        broken = [r for r in with_png if r.get("success") and r.get("clean_pred") == r.get("label")]
        pick = min(broken or with_png, key=lambda r: r.get("eps") or 0.0)
        chosen.append((not broken, pick.get("eps") or 0.0, _sortable(pick.get("index")), pick))
    chosen.sort(key=lambda t: t[:3])
    return [t[3] for t in chosen]


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))


def _gallery(
    out: Path, report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], n: int
) -> str:
    picked = _order(rows)[:n]
    if not picked:
        return (
            "<h2>Gallery</h2><p>No adversarial images saved in this folder "
            "(<code>advtune evaluate</code> keeps none; <code>advtune generate</code> does).</p>"
        )
    names = _class_names(report)
    config = report.get("config") or {}
    preprocess = _preprocess(config)
    root_text = (report.get("data") or {}).get("root") or (config.get("data") or {}).get("root")
    root = Path(root_text) if isinstance(root_text, str) and root_text else None
    adv_dir = out / "adv"
    cards = []
    missing_clean = 0
    for row in picked:
        adv = _array(_inside(adv_dir, row.get("adv_path")))
        clean = None
        if root is not None and preprocess is not None:
            source = _inside(root, row.get("path"))
            if source is not None and source.is_file():
                try:
                    with Image.open(source) as image:
                        clean = preprocess(image).permute(1, 2, 0).double().numpy()
                except (OSError, ValueError, Image.DecompressionBombError):
                    clean = None
        if clean is not None and adv is not None and clean.shape != adv.shape:
            clean = None
        missing_clean += clean is None
        delta_src = None
        if clean is not None and adv is not None:
            delta = adv - clean
            peak = float(np.abs(delta).max())
            delta_src = _thumb(0.5 + 0.5 * delta / peak) if peak > 0 else _thumb(delta + 0.5)
        label, pred = row.get("label"), row.get("adv_pred")
        broken = bool(row.get("success")) and row.get("clean_pred") == label
        status = (
            f"<span class=broken>broken at eps {_e(format_eps(row.get('eps')))}</span>"
            if broken
            else f"not broken at eps {_e(format_eps(row.get('eps')))}"
        )
        by = row.get("broken_by")
        cards.append(
            "<div class=card>"
            f"<div class=row>{_img(_thumb(clean) if clean is not None else None, 'clean')}"
            f"{_img(_thumb(adv) if adv is not None else None, 'adversarial')}"
            f"{_img(delta_src, 'perturbation')}</div>"
            "<div class=cap><span>clean</span><span>adversarial</span>"
            "<span>perturbation (amplified)</span></div>"
            f"<div><b>{_e(row.get('path'))}</b></div>"
            f"<div>true: {_e(_name(names, label))} · clean pred: "
            f"{_e(_name(names, row.get('clean_pred')))} · adv pred: {_e(_name(names, pred))}</div>"
            f"<div>{status}{' by ' + _e(by) if by and by != 'clean' else ''} · "
            f"L∞ {_e(_num(row.get('linf')))} ({_e(_num(255 * float(row.get('linf') or 0)))}/255)"
            f" · L2 {_e(_num(row.get('l2')))}</div></div>"
        )
    note = (
        f"<p class=sub>{missing_clean} clean image(s) not found under the data root "
        f"{_e(root_text)}: no clean image or perturbation for them.</p>"
        if missing_clean
        else ""
    )
    return (
        f"<h2>Gallery</h2><p class=sub>First {len(picked)} of {len(_order(rows))} images "
        "with an adversarial PNG, broken at the smallest eps first; the perturbation is "
        "scaled to fill the grey range.</p>"
        f"{note}<div class=gallery>{''.join(cards)}</div>"
    )


def _class_names(report: Mapping[str, Any]) -> dict[int, str]:
    """Class names known to the report (the per-class table's, else ImageNet's)."""
    names: dict[int, str] = {}
    for entry in (report.get("metrics") or {}).get("per_eps") or []:
        for key, value in (entry.get("per_class") or {}).items():
            try:
                names[int(key)] = str(value.get("name"))
            except (TypeError, ValueError):
                continue
    if (report.get("model") or {}).get("num_classes") == 1000 and (
        (report.get("model") or {}).get("dataset") == "imagenet"
    ):
        from advtune.data import imagenet_categories

        for i, name in enumerate(imagenet_categories()):
            names.setdefault(i, name)
    return names


def _name(names: Mapping[int, str], cls: Any) -> str:
    if not isinstance(cls, int):
        return "-"
    name = names.get(cls)
    return f"{cls} {name}" if name and name != "None" else str(cls)


# --------------------------------------------------------------------------- page


def build_html(out_dir: str | Path, *, gallery: int = 24) -> str:
    """The page of the run in ``out_dir`` (reads its files; writes nothing).

    Args:
        out_dir: A run's output folder (``report.json`` required).
        gallery: How many adversarial examples the gallery shows (``>= 0``).

    Raises:
        UserError: No readable ``report.json`` or manifest; a negative ``gallery``.
    """
    if not isinstance(gallery, int) or isinstance(gallery, bool) or gallery < 0:
        raise UserError(f"gallery must be an int >= 0, got {gallery!r}")
    out = Path(out_dir)
    path = out / "report.json"
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{str(out)!r} has no report.json: not an advtune output folder") from None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {str(path)!r}: {err}") from err
    if not isinstance(report, dict):
        raise UserError(f"{str(path)!r} is not a report (not a JSON object)")
    from advtune.storage import read_manifest

    try:
        rows = read_manifest(out / "manifest.csv")
    except ValueError as err:
        raise UserError(str(err)) from err
    model = (report.get("model") or {}).get("name")
    attack = ((report.get("config") or {}).get("attack") or {}).get("attack")
    title = f"advtune {report.get('command', '')}: {model} · {attack}"
    body = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=sub>{_e(out.resolve())} · {_e(report.get('format'))}</p>",
        _warnings(report),
        _accuracy(report, rows),
        _published(report),
        _plot(out, report),
        _gallery(out, report, rows, gallery),
        _per_class(report),
        _settings(report),
    ]
    return (
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        # Nothing may load from anywhere but the page itself (hostile strings aside).
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "img-src data:; style-src 'unsafe-inline'\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        + "".join(body)
        + "</body></html>\n"
    )


def write_html(out_dir: str | Path, *, gallery: int = 24) -> Path:
    """Write ``OUT/report.html`` (atomically) and return its path."""
    from advtune.storage import atomic_write_text

    page = build_html(out_dir, gallery=gallery)
    target = Path(out_dir) / HTML_NAME
    atomic_write_text(target, page)
    return target
