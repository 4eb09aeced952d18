"""Measure a saved adversarial set on other models, without attacking again.

``advtune evaluate --adv-from OUT --model M`` and ``scripts/transfer_matrix.py`` use it:

* :func:`load_saved_set` reads an earlier ``generate`` run's ``manifest.csv`` and
  ``report.json`` and checks every listed PNG against the sha256 the run recorded
  (``adv_sha256``): a missing, swapped or edited file is an error naming it.
* :func:`evaluate_saved` classifies, per target model, each saved 8-bit PNG and its clean
  image (decoded again from the run's data folder with the run's own preprocessing; the
  recorded L∞/L2 norms must come out exactly, which proves the clean image is the one the
  run attacked) and computes the run's metrics on those rows with
  :func:`advtune.run.metrics.compute_metrics`: the same success rule, so measuring the
  set on the surrogate itself gives back the run's own figures exactly.
* :func:`transfer_matrix` and :func:`write_matrix`: surrogate × target success as
  Markdown, CSV and a heat map.

Labels are the manifest's: for a folder without labels these are the surrogate's clean
predictions, so "correctly classified" then means "agrees with the surrogate".
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from advtune.errors import UserError
from advtune.run.outputs import ADV_DIR, MANIFEST_NAME, REPORT_NAME, inside
from advtune.run.spec import AttackConfig
from advtune.storage import (
    atomic_write_bytes,
    atomic_write_text,
    file_sha256,
    read_json,
    read_manifest,
)

__all__ = [
    "SavedSet",
    "TransferMatrix",
    "evaluate_saved",
    "format_transfer",
    "load_saved_set",
    "load_targets",
    "preprocess_from_record",
    "transfer_matrix",
    "write_matrix",
    "write_transfer",
]

_PREPROCESS = re.compile(
    r"Preprocess\(crop_size=(\d+), resize_size=(None|\d+|\((\d+), (\d+)\)), "
    r"interpolation=<InterpolationMode\.\w+: '([a-z-]+)'>\)"
)


def preprocess_from_record(text: str) -> Any:
    """The :class:`~advtune.models.Preprocess` whose ``repr`` a run recorded.

    Raises:
        UserError: ``text`` is no such ``repr`` (a custom transform): pass one yourself.
    """
    from torchvision.transforms import InterpolationMode

    from advtune.models import Preprocess

    match = _PREPROCESS.fullmatch(text or "")
    if match is None:
        raise UserError(f"cannot rebuild the run's preprocessing from {text!r}")
    crop, resize, h, w, interp = match.groups()
    size: int | tuple[int, int] | None
    size = None if resize == "None" else (int(h), int(w)) if h is not None else int(resize)
    rebuilt = Preprocess(
        crop_size=int(crop), resize_size=size, interpolation=InterpolationMode(interp)
    )
    if repr(rebuilt) != text:
        raise UserError(f"cannot rebuild the run's preprocessing from {text!r}")
    return rebuilt


@dataclass(frozen=True)
class SavedSet:
    """A verified ``generate`` output folder.

    Attributes:
        root: the folder.
        rows: its manifest rows (sorted by dataset index), each with a checked PNG.
        report: its ``report.json``.
        config: the run's attack configuration.
        data_root: where the clean images are (``--data`` or the run's recorded root).
        transform: the run's preprocessing (PIL image → ``(3, H, W)`` in [0, 1]).
    """

    root: Path
    rows: list[dict[str, Any]]
    report: dict[str, Any]
    config: AttackConfig
    data_root: Path
    transform: Any

    @property
    def surrogate(self) -> str:
        """The run's model name (an ensemble's ``ensemble(a+b)`` name)."""
        model = self.report.get("config", {}).get("model", {})
        return str(model.get("name", "?"))


def load_saved_set(
    run_dir: str | Path, *, data: str | Path | None = None, transform: Any = None
) -> SavedSet:
    """Read and verify an earlier ``generate`` run's saved images.

    Args:
        run_dir: the run's ``--out`` folder.
        data: the clean images' folder (default: the root the run recorded).
        transform: the run's preprocessing (default: rebuilt from the record).

    Raises:
        UserError: no manifest or report in ``run_dir``; a run that saved no PNGs; a
            listed PNG that is missing, outside ``adv/``, unrecorded (a manifest without
            ``adv_sha256``) or whose bytes differ from the recorded sha256; a missing
            clean-image folder.
    """
    root = Path(run_dir)
    manifest, report_path = root / MANIFEST_NAME, root / REPORT_NAME
    if not manifest.is_file():
        raise UserError(f"{str(root)!r} holds no {MANIFEST_NAME}: not an advtune generate folder")
    if not report_path.is_file():
        raise UserError(f"{str(root)!r} holds {MANIFEST_NAME} but no {REPORT_NAME}")
    try:
        report = read_json(report_path)
        config = dict(report["config"])
        attack = dict(config["attack"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{str(report_path)!r} is unreadable ({e})") from e
    try:
        rows = read_manifest(manifest, recover=False)
    except ValueError as e:
        raise UserError(str(e)) from e
    if config.get("command") != "generate" or not config.get("save_images"):
        raise UserError(f"{str(root)!r} is an evaluate run: it saved no adversarial images")
    if not rows:
        raise UserError(f"{str(manifest)!r} lists no images")
    eps = attack.get("eps")
    cfg = AttackConfig(
        attack=attack["attack"], norm=attack["norm"],
        eps=tuple(eps) if eps is not None else None, params=attack.get("params") or {},
        targeted=attack.get("targeted"), seed=int(attack.get("seed", 0)),
    )  # fmt: skip
    adv_dir = root / ADV_DIR
    for row in rows:
        rel = row["adv_path"]
        path = inside(adv_dir, rel) if rel else None
        if path is None:
            raise UserError(f"{str(manifest)!r} lists {rel!r} for {row['path']!r}, not in adv/")
        if not path.is_file():
            raise UserError(f"adversarial image {str(path)!r} listed in the manifest is missing")
        recorded = row.get("adv_sha256") or ""
        if not recorded:
            raise UserError(
                f"{str(manifest)!r} records no sha256 for {rel!r} (written before "
                "adv_sha256 existed): it cannot be verified"
            )
        if file_sha256(path) != recorded:
            raise UserError(
                f"adversarial image {str(path)!r} differs from the one the run saved "
                "(sha256 mismatch): it was replaced or edited"
            )
    data_root = Path(data) if data is not None else Path(config.get("data", {}).get("root") or "")
    if not data_root.is_dir():
        raise UserError(
            f"clean images folder {str(data_root)!r} not found; pass --data with the run's data"
        )
    if transform is None:
        transform = preprocess_from_record(str(config.get("preprocess")))
    rows = sorted(rows, key=lambda r: r["index"])
    return SavedSet(root, rows, report, cfg, data_root, transform)


def _read_png(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _clean_uint8(saved: SavedSet, rel: str) -> torch.Tensor:
    """The clean image exactly as the run's dataset gave it, as uint8 ``(3, H, W)``."""
    from advtune.data import decode_image

    path = inside(saved.data_root, rel)
    if path is None or not path.is_file():
        raise UserError(f"clean image {rel!r} not found under {str(saved.data_root)!r}")
    try:
        image = saved.transform(decode_image(path))
    except Exception as e:  # Pillow raises many types on broken files
        raise UserError(f"cannot decode clean image {str(path)!r}: {e}") from e
    if image.dtype == torch.uint8:
        return image
    # The dataset's own 8-bit rounding (advtune.data.dataset): what the run attacked.
    return image.float().clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _norms(adv: torch.Tensor, clean: torch.Tensor) -> tuple[float, float]:
    # As advtune.run.batch computes them: float64 differences of 8-bit levels.
    delta = (adv.double() - clean.double()).flatten() / 255
    return float(delta.abs().amax()), float(delta.norm())


def _load_pairs(saved: SavedSet) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean, adv)`` uint8 stacks ``(N, 3, H, W)``; each clean image checked against
    its row's recorded norms."""
    cleans, advs = [], []
    for row in saved.rows:
        path = inside(saved.root / ADV_DIR, row["adv_path"])
        if path is None:  # load_saved_set refused these; a hand-made SavedSet may not
            raise UserError(f"{row['adv_path']!r} is not inside {str(saved.root / ADV_DIR)!r}")
        adv = _read_png(path)
        clean = _clean_uint8(saved, row["path"])
        if clean.shape != adv.shape:
            raise UserError(
                f"clean image {row['path']!r} comes out {tuple(clean.shape)}, its adversarial "
                f"PNG is {tuple(adv.shape)}: is --data the run's data?"
            )
        if _norms(adv, clean) != (row["linf"], row["l2"]):
            raise UserError(
                f"clean image {row['path']!r} is not the one the run attacked (the recorded "
                "norms differ): is --data the run's data?"
            )
        cleans.append(clean)
        advs.append(adv)
    return torch.stack(cleans), torch.stack(advs)


def _predict(
    model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device
) -> tuple[list[int], list[float]]:
    """Predictions and confidences of uint8 ``images``, batch by batch, each batch padded
    to ``batch_size`` with copies of its last image (as the run's batches were, so the
    float results match its own). Non-finite logits give prediction -1, confidence NaN."""
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    preds: list[int] = []
    confs: list[float] = []
    for start in range(0, images.shape[0], batch_size):
        part = images[start : start + batch_size]
        n = part.shape[0]
        if n < batch_size:
            part = torch.cat([part, part[-1:].expand(batch_size - n, *part.shape[1:])])
        x = part.to(device=device, dtype=dtype) / 255
        with torch.no_grad():
            logits = model(x).float()[:n]
        finite = torch.isfinite(logits).all(dim=1)
        conf, pred = logits.softmax(dim=1).max(dim=1)
        preds += torch.where(finite, pred, torch.full_like(pred, -1)).tolist()
        confs += torch.where(finite, conf, torch.full_like(conf, float("nan"))).tolist()
    return preds, confs


def evaluate_saved(
    saved: SavedSet,
    targets: Mapping[str, nn.Module],
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Measure a verified saved set on each target model.

    Args:
        saved: from :func:`load_saved_set`.
        targets: name → classifier on [0, 1] images (logits ``(N, K)``), in report order.
        batch_size: images per forward pass (the run's own batch size reproduces its
            floats exactly).
        device: where the targets run (default: where their parameters are).

    Returns:
        ``{"source": {...}, "targets": [{"model", "num_images", "clean_accuracy",
        "robust_accuracy", "transfer_success" (fooled among the images the target
        classifies correctly clean), "targeted_hit_rate" (targeted runs: target hits over
        all images; ``None`` otherwise), "success_rate" (the run's own rule: one of the
        two), "num_correct", "linf_mean", "linf_max", "l2_mean", "l2_median", "rows"}]}``;
        ``rows`` are manifest-style rows per image for that target.

    Raises:
        UserError: a clean image that is missing or differs from the attacked one; a
            label outside a target's classes; a batch size below 1.
    """
    from advtune.run.metrics import compute_metrics, success_counts

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch size must be an integer >= 1, got {batch_size!r}")
    clean, adv = _load_pairs(saved)
    targeted = saved.config.targeted is not None
    out_targets = []
    for name, model in targets.items():
        param = next(iter(model.parameters()), None)
        dev = torch.device(device) if device is not None else (
            param.device if param is not None else torch.device("cpu")
        )  # fmt: skip
        clean_pred, clean_conf = _predict(model, clean, batch_size, dev)
        adv_pred, adv_conf = _predict(model, adv, batch_size, dev)
        rows = []
        for i, r in enumerate(saved.rows):
            if targeted:
                success = adv_pred[i] == r["target"] and math.isfinite(clean_conf[i])
            else:
                success = adv_pred[i] != r["label"]
            rows.append(
                {
                    **{k: r[k] for k in ("path", "label", "index", "eps", "target", "linf", "l2")},
                    "clean_pred": clean_pred[i], "adv_pred": adv_pred[i], "success": success,
                    "attack_success": success, "clean_conf": clean_conf[i],
                    "adv_conf": adv_conf[i], "adv_path": r["adv_path"], "broken_by": "",
                }
            )  # fmt: skip
        num_classes = getattr(model, "num_classes", None)
        top = max(r["label"] for r in rows)
        if isinstance(num_classes, int) and top >= num_classes:
            raise UserError(
                f"label {top} is out of range for target {name} ({num_classes} classes)"
            )
        metrics = compute_metrics(rows, saved.config)
        untargeted = [{**r, "success": r["adv_pred"] != r["label"]} for r in rows]
        fooled, correct = success_counts(untargeted, targeted=False)
        hits = sum(bool(r["success"]) for r in rows) if targeted else None
        out_targets.append(
            {
                "model": name,
                "num_images": len(rows),
                "num_correct": correct,
                "clean_accuracy": metrics["clean_accuracy"],
                "robust_accuracy": metrics["robust_accuracy"],
                "transfer_success": fooled / correct if correct else None,
                "targeted_hit_rate": hits / len(rows) if hits is not None else None,
                "success_rate": metrics["success_rate"],
                "linf_mean": metrics["linf_mean"],
                "linf_max": max(r["linf"] for r in rows),
                "l2_mean": metrics["l2_mean"],
                "l2_median": metrics["l2_median"],
                "rows": rows,
            }
        )
    run_metrics = saved.report.get("metrics") or {}
    return {
        "source": {
            "run": str(saved.root),
            "surrogate": saved.surrogate,
            "attack": saved.config.attack,
            "norm": saved.config.norm,
            "eps": list(saved.config.eps) if saved.config.eps else None,
            "targeted": saved.config.targeted,
            "num_images": len(saved.rows),
            "run_success_rate": run_metrics.get("success_rate"),
        },
        "targets": out_targets,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_transfer(result: Mapping[str, Any]) -> str:
    """A plain-text table of :func:`evaluate_saved`'s result (the CLI prints it)."""
    src = result["source"]
    eps = ",".join(f"{e:.6g}" for e in src["eps"]) if src["eps"] else "-"
    lines = [
        f"advtune evaluate --adv-from {src['run']}: {src['num_images']} images, "
        f"{src['attack']} {src['norm']} eps={eps} on {src['surrogate']}"
        + (f" (targeted: {src['targeted']})" if src["targeted"] else ""),
        f"{'target':<32} {'clean acc':>10} {'robust acc':>10} {'transfer':>10} "
        f"{'target hit':>10} {'linf mean':>10} {'l2 mean':>10}",
    ]
    for t in result["targets"]:
        lines.append(
            f"{t['model']:<32} {_pct(t['clean_accuracy']):>10} {_pct(t['robust_accuracy']):>10} "
            f"{_pct(t['transfer_success']):>10} {_pct(t['targeted_hit_rate']):>10} "
            f"{t['linf_mean']:>10.5f} {t['l2_mean']:>10.4f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- matrix


@dataclass(frozen=True)
class TransferMatrix:
    """Surrogate × target success rates (the run's success rule).

    Attributes:
        surrogates, targets: row and column labels.
        values: ``values[i][j]``: success of surrogate ``i``'s set on target ``j``
            (``None`` when no image counts).
        results: the :func:`evaluate_saved` result of each surrogate.
    """

    surrogates: tuple[str, ...]
    targets: tuple[str, ...]
    values: tuple[tuple[float | None, ...], ...]
    results: tuple[dict[str, Any], ...]

    def to_markdown(self) -> str:
        head = "| surrogate \\ target | " + " | ".join(self.targets) + " |"
        rule = "|---|" + "---:|" * len(self.targets)
        body = [
            f"| {s} | " + " | ".join(_pct(v) for v in row) + " |"
            for s, row in zip(self.surrogates, self.values, strict=True)
        ]
        return "\n".join([head, rule, *body]) + "\n"

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["surrogate", *self.targets])
        for s, row in zip(self.surrogates, self.values, strict=True):
            writer.writerow([s, *("" if v is None else repr(v) for v in row)])
        return buffer.getvalue()


def transfer_matrix(
    runs: Mapping[str, str | Path],
    targets: Mapping[str, nn.Module],
    *,
    data: str | Path | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
) -> TransferMatrix:
    """Evaluate each surrogate's saved set (``runs``: label → generate folder) on every
    target and collect the success rates (:func:`evaluate_saved`'s ``success_rate``).

    Raises:
        UserError: no runs or no targets; anything :func:`load_saved_set` or
            :func:`evaluate_saved` raises.
    """
    if not runs or not targets:
        raise UserError("a transfer matrix needs at least one surrogate run and one target")
    results = []
    for run_dir in runs.values():
        saved = load_saved_set(run_dir, data=data)
        results.append(evaluate_saved(saved, targets, batch_size=batch_size, device=device))
    values = tuple(tuple(t["success_rate"] for t in r["targets"]) for r in results)
    return TransferMatrix(tuple(runs), tuple(targets), values, tuple(results))


def write_matrix(
    matrix: TransferMatrix, out_dir: str | Path, *, title: str = ""
) -> dict[str, Path]:
    """Write ``transfer_matrix.md``, ``.csv`` and ``.png`` (a heat map) into ``out_dir``.

    Returns:
        ``{"markdown", "csv", "plot"}`` paths.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out / "transfer_matrix.md",
        "csv": out / "transfer_matrix.csv",
        "plot": out / "transfer_matrix.png",
    }
    atomic_write_text(paths["markdown"], (f"{title}\n\n" if title else "") + matrix.to_markdown())
    atomic_write_text(paths["csv"], matrix.to_csv())
    grid = np.array(
        [[np.nan if v is None else 100 * v for v in row] for row in matrix.values], dtype=float
    )
    fig, ax = plt.subplots(
        figsize=(1.2 + 1.1 * len(matrix.targets), 1.0 + 0.6 * len(matrix.surrogates))
    )
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(matrix.targets)), matrix.targets, rotation=30, ha="right")
    ax.set_yticks(range(len(matrix.surrogates)), matrix.surrogates)
    ax.set_xlabel("target")
    ax.set_ylabel("surrogate")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            text = "-" if np.isnan(v) else f"{v:.1f}"
            ax.text(j, i, text, ha="center", va="center", color="w" if v < 60 else "k")
    fig.colorbar(image, ax=ax, label="success (%)")
    if title:
        ax.set_title(title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(paths["plot"], buffer.getvalue())
    return paths


def load_targets(
    names: Sequence[str],
    *,
    weights: str = "DEFAULT",
    convbn: str = "frozen",
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, nn.Module]:
    """Load the target models by name (:func:`advtune.models.load_model`), in order.

    Raises:
        UserError: no names, a name given twice, an unknown model (one line, with close
            names), anything else ``load_model`` raises.
    """
    from advtune.models import load_model

    if not names:
        raise UserError("give at least one target --model")
    out: dict[str, nn.Module] = {}
    for name in names:
        if name in out:
            raise UserError(f"target model {name!r} is given twice")
        out[name] = load_model(
            name, weights=weights, convbn=convbn, device=device, seed=seed, progress=progress
        )
    return out


def write_transfer(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``transfer.json`` (the summary per target) and ``transfer_rows.csv`` (per
    image and target: clean and adversarial prediction, success) into ``out_dir``.

    Returns:
        ``{"json", "csv"}`` paths.
    """
    from advtune.storage import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "source": dict(result["source"]),
        "targets": [{k: v for k, v in t.items() if k != "rows"} for t in result["targets"]],
    }
    paths = {"json": out / "transfer.json", "csv": out / "transfer_rows.csv"}
    write_json(paths["json"], summary)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["model", "path", "index", "label", "target", "clean_pred", "adv_pred", "success"]
    )
    for t in result["targets"]:
        for r in t["rows"]:
            target = "" if r["target"] is None else r["target"]
            writer.writerow(
                [t["model"], r["path"], r["index"], r["label"], target, r["clean_pred"],
                 r["adv_pred"], int(bool(r["success"]))]
            )  # fmt: skip
    atomic_write_text(paths["csv"], buffer.getvalue())
    return paths
