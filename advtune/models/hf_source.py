"""Hugging Face ``transformers`` image classifiers (``"hf:<repo id>"``, ``"hf:/local/folder"``).

``transformers`` is an optional extra (``pip install advtune[hf]``). The card is made
from two small JSON files, before any weights load: ``config.json`` (architecture,
``id2label``) and ``preprocessor_config.json`` (the image processor's resize, crop,
rescale and normalisation). A repo id fetches them through the Hub cache as
``transformers`` does; a folder written by ``save_pretrained`` (model and image
processor) needs no network.

The processor becomes a :class:`Preprocess` (resize, center crop, [0, 1]) plus the
card's ``mean``/``std``, applied inside :class:`~advtune.models.ImageClassifier`:

* ``ViTImageProcessor`` (ViT, Swin, ...): resize to exactly ``size`` (height, width).
* ``DeiTImageProcessor``: resize to exactly ``size``, center crop ``crop_size``.
* ``ConvNextImageProcessor`` (ConvNeXt, ResNet): below 384 px, resize the shorter side
  to ``int(shortest_edge / crop_pct)`` and center crop ``shortest_edge``; from 384 px
  on, resize to ``shortest_edge`` square (no crop).
* ``BitImageProcessor`` / ``CLIPImageProcessor``: resize the shorter side to
  ``shortest_edge``, center crop ``crop_size``.

(and their ``...Fast`` twins). ``rescale_factor`` must be 1/255; a processor advtune
cannot express is refused by name.

Class names come from ``config.id2label``. A 1000-class model counts as an ImageNet
model only if its labels are our 1000 classes in our order (class ``i`` must name our
class ``i``: its WordNet id, torchvision's name, or a comma-separated WordNet lemma
list containing it, as ``"tench, Tinca tinca"``); :func:`require_imagenet` refuses any
other for an ImageNet run, naming the first mismatch.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.transforms import InterpolationMode

from advtune.errors import UserError, first_line
from advtune.models.cards import ModelCard, Preprocess
from advtune.models.checkpoints import checkpoint_path, load_checkpoint, load_strict

__all__ = [
    "HFLogits",
    "build",
    "build_arch",
    "cached_repos",
    "card",
    "imagenet_mismatch",
    "preprocess_from_processor",
    "require_imagenet",
]

# PIL's resampling filter numbers, as image processor configs store them.
_RESAMPLE = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}
_EXACT_RESIZE = ("ViTImageProcessor", "DeiTImageProcessor")
_SHORT_SIDE = ("ConvNextImageProcessor", "BitImageProcessor", "CLIPImageProcessor")
_PROCESSORS = _EXACT_RESIZE + _SHORT_SIDE


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise UserError(
            "hf: models need the 'transformers' package: pip install advtune[hf]"
        ) from err
    return transformers


def _is_folder(inner: str) -> bool:
    return inner.startswith(("/", ".", "~")) or Path(inner).expanduser().is_dir()


def _read_json(inner: str, filename: str) -> dict[str, Any]:
    """``filename`` of a local folder, or of a Hub repo through the Hub cache."""
    if _is_folder(inner):
        path = Path(inner).expanduser() / filename
        if not path.is_file():
            raise UserError(
                f"hf:{inner}: no {filename} there (a folder written by "
                "save_pretrained of the model and of its image processor)"
            )
    else:
        _transformers()
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(inner, filename))
        except Exception as err:  # offline, unknown repo, gated repo: many types
            first = first_line(err)
            raise UserError(
                f"could not fetch {filename} of hf:{inner} ({type(err).__name__}: {first}). "
                "Offline? Use a local folder saved with save_pretrained: --model hf:/path"
            ) from err
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"hf:{inner}: cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise UserError(f"hf:{inner}: {path} is not a JSON object")
    return data


def _side(size: Any, key: str, name: str) -> int:
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and isinstance(size.get(key), int):
        return int(size[key])
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        h, w = size["height"], size["width"]
        if h != w:
            raise UserError(f"{name}: {h}x{w} input; only square inputs are supported")
        return int(h)
    raise UserError(f"{name}: image processor size {size!r} is not supported")


def preprocess_from_processor(
    proc: dict[str, Any], name: str
) -> tuple[Preprocess, tuple[float, float, float], tuple[float, float, float]]:
    """``(preprocess, mean, std)`` of an image processor config (``preprocessor_config.json``).

    Raises:
        UserError: A processor type or setting advtune cannot express.
    """
    kind = str(proc.get("image_processor_type") or proc.get("feature_extractor_type") or "")
    base = kind.removesuffix("Fast").replace("FeatureExtractor", "ImageProcessor")
    if base not in _PROCESSORS:
        raise UserError(
            f"{name}: image processor {kind or '(none)'!r} is not supported; supported: "
            + ", ".join(_PROCESSORS)
        )
    rescale = proc.get("do_rescale", True)
    factor = float(proc.get("rescale_factor", 1 / 255))
    if rescale and not math.isclose(factor, 1 / 255, rel_tol=1e-6):
        raise UserError(f"{name}: rescale_factor {factor} is not 1/255")
    if not rescale:
        raise UserError(f"{name}: do_rescale false (input in 0..255) is not supported")
    resample = proc.get("resample", 2)
    if resample not in _RESAMPLE:
        raise UserError(f"{name}: resample {resample!r} is not a PIL filter number")
    interpolation = _RESAMPLE[resample]
    do_resize = proc.get("do_resize", True)
    do_crop = proc.get("do_center_crop", base in ("DeiTImageProcessor", "BitImageProcessor"))
    size = proc.get("size", 224)
    if base == "ConvNextImageProcessor":
        short = _side(size, "shortest_edge", name)
        if short < 384:
            crop_pct = float(proc.get("crop_pct") or 224 / 256)
            pre = Preprocess(short, int(short / crop_pct), interpolation)
        else:  # ConvNeXt warps large inputs to a square, without a crop
            pre = Preprocess(short, (short, short), interpolation)
    elif base in _EXACT_RESIZE:
        side = _side(size, "shortest_edge", name)
        resize: int | tuple[int, int] | None = (side, side) if do_resize else None
        crop = _side(proc.get("crop_size", side), "height", name) if do_crop else side
        pre = Preprocess(crop, resize, interpolation)
    else:
        short = _side(size, "shortest_edge", name)
        if not do_crop:
            raise UserError(f"{name}: a shorter-side resize without a crop is not square")
        crop = _side(proc.get("crop_size", short), "height", name)
        pre = Preprocess(crop, short if do_resize else None, interpolation)
    if proc.get("do_normalize", True):
        mean = tuple(float(v) for v in proc.get("image_mean", (0.5, 0.5, 0.5)))
        std = tuple(float(v) for v in proc.get("image_std", (0.5, 0.5, 0.5)))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) != 3 or len(std) != 3:
        raise UserError(f"{name}: image_mean/image_std need 3 values, got {mean} and {std}")
    return pre, mean, std  # type: ignore[return-value]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("_", " ")).strip().lower()


def _same_class(label: str, wnid: str, ours: str) -> bool:
    """Whether a model's label names our class (``wnid``, torchvision name ``ours``)."""
    lab, mine = _norm(label), _norm(ours)
    parts = [_norm(p) for p in label.split(",")]
    return (
        lab in (mine, wnid.lower())
        or mine in parts
        # torchvision disambiguates two WordNet names: "crane bird" (lemma "crane"),
        # "maillot tank suit" (lemmas "maillot, tank suit").
        or _norm(label.replace(",", " ")) == mine
        or mine.startswith(parts[0] + " ")
    )


def imagenet_mismatch(labels: tuple[str, ...] | list[str]) -> str | None:
    """Why ``labels`` (class ``i``'s name at ``i``) are not our ImageNet classes, or ``None``."""
    from advtune.data.shipped import imagenet_wnids
    from advtune.models.torchvision_source import imagenet_categories

    if len(labels) != 1000:
        return f"it has {len(labels)} classes, not ImageNet's 1000"
    for i, (label, wnid, ours) in enumerate(
        zip(labels, imagenet_wnids(), imagenet_categories(), strict=True)
    ):
        if not _same_class(label, wnid, ours):
            return f"its class {i} is {label!r}, ours is {ours!r} ({wnid})"
    return None


def require_imagenet(card: ModelCard) -> None:
    """Refuse a ``hf:`` card for an ImageNet run unless its classes are ours, in our order.

    Raises:
        UserError: One line naming the first mismatching class.
    """
    if card.source != "hf" or card.categories is None:
        return
    why = imagenet_mismatch(card.categories)
    if why is not None:
        raise UserError(f"{card.name} cannot be evaluated on ImageNet: {why}")


def card(inner: str, weights: str, *, seed: int) -> ModelCard:
    """The card of ``hf:<inner>`` from its config and image processor JSON (no weights).

    ``weights``: ``DEFAULT`` (the repo's or folder's weights), ``random`` or a local
    checkpoint of the HF model's ``state_dict``.
    """
    if not inner:
        raise UserError("hf: needs a repo id or a folder, e.g. hf:google/vit-base-patch16-224")
    name = f"hf:{inner}"
    config = _read_json(inner, "config.json")
    proc = _read_json(inner, "preprocessor_config.json")
    preprocess, mean, std = preprocess_from_processor(proc, name)
    raw = config.get("id2label")
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{name}: config.json has no id2label")
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except ValueError as err:
        raise UserError(f"{name}: id2label keys must be integers: {err}") from err
    if sorted(id2label) != list(range(len(id2label))):
        raise UserError(f"{name}: id2label must number its classes 0..{len(id2label) - 1}")
    labels = tuple(id2label[i] for i in range(len(id2label)))
    imagenet = imagenet_mismatch(labels) is None
    if imagenet:
        from advtune.models.torchvision_source import imagenet_categories

        # Our names, so reports read the same whatever source the model came from.
        labels = tuple(imagenet_categories())
    arch = (config.get("architectures") or [None])[0] or str(config.get("model_type", "?"))
    where = str(Path(inner).expanduser().resolve()) if _is_folder(inner) else inner
    base = ModelCard(
        name=name,
        source="hf",
        arch=str(arch),
        weights=f"hf {where}",
        preprocess=preprocess,
        mean=mean,
        std=std,
        categories=labels,
        num_classes=len(labels),
        dataset="imagenet" if imagenet else "unknown",
    )
    wl = weights.lower()
    if wl == "default":
        return base
    if wl == "random":
        return base.replace(weights="random", seed=seed)
    path = checkpoint_path(weights, what=f"weights for {name}", choices=["DEFAULT", "random"])
    return base.replace(weights=f"checkpoint {path}", checkpoint=path)


def cached_repos() -> list[str]:
    """Repo ids of image classifiers in the local Hub cache (no network), sorted."""
    _transformers()
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir()
    except Exception:  # no cache folder yet: nothing cached
        return []
    found = set()
    for repo in cache.repos:
        if repo.repo_type != "model":
            continue
        for revision in repo.revisions:
            files = {f.file_name: f.file_path for f in revision.files}
            if "config.json" not in files or "preprocessor_config.json" not in files:
                continue
            try:
                archs = json.loads(Path(files["config.json"]).read_text()).get("architectures")
            except (OSError, ValueError):
                continue
            if any(str(a).endswith("ForImageClassification") for a in archs or ()):
                found.add(repo.repo_id)
    return sorted(found)


class HFLogits(nn.Module):
    """A ``transformers`` classifier as ``(N, 3, H, W)`` pixel values → ``(N, K)`` logits.

    Attributes:
        model: The ``PreTrainedModel`` (its ``state_dict`` keys get a ``model.`` prefix).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Any) -> Any:
        return self.model(pixel_values=x).logits


def _source(card: ModelCard) -> str:
    return card.name.removeprefix("hf:")


def _finish(model: nn.Module) -> nn.Module:
    transformers = _transformers()
    if int(transformers.__version__.split(".")[0]) >= 5:
        # From transformers 5 the ViT/DeiT/Swin layers return one tensor, which the
        # frozen mode's recompute needs (advtune.models.hf_blocks).
        from advtune.models import hf_blocks

        hf_blocks.adapt(model)
    return HFLogits(model.float().eval())


def build_arch(card: ModelCard) -> nn.Module:
    """The untrained network of a ``hf:`` card (initialisers draw from the global RNG)."""
    transformers = _transformers()
    inner = _source(card)
    try:
        config = transformers.AutoConfig.from_pretrained(os.path.expanduser(inner))
        model = transformers.AutoModelForImageClassification.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = first_line(err)
        raise UserError(f"{card.name}: cannot build the architecture ({first})") from err
    return _finish(model)


def build(card: ModelCard, *, progress: bool) -> nn.Module:
    """The network with the repo's or folder's weights, or the card's checkpoint."""
    if card.checkpoint is not None:
        net = build_arch(card)
        inner: nn.Module = net.model  # type: ignore[assignment]
        load_strict(inner, load_checkpoint(card.checkpoint), card.checkpoint)
        return net
    transformers = _transformers()
    source = os.path.expanduser(_source(card))
    bars = transformers.utils.logging
    was_on = bars.is_progress_bar_enabled()
    if not progress:  # transformers' own switch is global: restored below
        bars.disable_progress_bar()
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(source)
    except (OSError, ValueError, RuntimeError) as err:  # offline hub, bad files
        first = first_line(err)
        raise UserError(
            f"could not load {card.name} ({type(err).__name__}: {first}). Offline? Use a "
            "local folder saved with save_pretrained (--model hf:/path/to/folder)"
        ) from err
    finally:
        if was_on and not progress:
            bars.enable_progress_bar()
    return _finish(model)
