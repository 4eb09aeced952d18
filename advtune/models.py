"""Load frozen ImageNet classifiers that take images in [0, 1].

:func:`load_model` builds a torchvision classification model (or a user's own, from a
``"package.module:function"`` factory), loads its weights (torchvision's download cache,
a local checkpoint, or none), converts its Conv→BN blocks with :func:`advtune.tune`, and
wraps it in an :class:`ImageClassifier` that normalises inside ``forward``. Attacks then
work in pixel space: the threat model (eps) is defined on [0, 1] images, which is what
gets saved to disk.

See ``docs/data_and_models.md`` for the user-facing rules (weights, checkpoints,
factories, Inception's ``transform_input``).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from advtune.convbn import _REPORT_ATTR, MODES, ConvBNReport, convbn_report, tune
from advtune.errors import UserError, suggest

__all__ = [
    "DEFAULT_CONVBN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REFERENCE_MODELS",
    "ImageClassifier",
    "Preprocess",
    "list_models",
    "load_checkpoint",
    "load_model",
]

# Attacks need input gradients only: the frozen mode saves least for backward (see
# docs/performance.md) and gives the same input gradients as Eval mode.
DEFAULT_CONVBN = "frozen"
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# The reference set of torchvision models: those whose ConvBN-mode costs
# docs/performance.md records (issue 5's table: ResNet-50 and the nine others, from a
# small ResNet to a BN-free ConvNeXt). The scripts' default model grids use it, so
# their tables and the performance docs cover the same architectures. Not every one
# takes 224 px: inception_v3's weights crop 299 px (each model's ``preprocess`` says).
REFERENCE_MODELS: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "resnet152",
    "wide_resnet50_2",
    "mobilenet_v2",
    "efficientnet_b0",
    "vgg16_bn",
    "densenet121",
    "inception_v3",
    "convnext_tiny",
)

# Models whose pretrained torchvision weights expect ``transform_input=True``: the net
# itself turns ImageNet-normalised input into the [-1, 1] range Google's weights were
# trained on. The wrapper's normalisation is therefore still right (see _torchvision_net).
_TRANSFORM_INPUT_MODELS = {"inception_v3": "AuxLogits.", "googlenet": "aux1."}
_CHECKPOINT_SUFFIXES = {".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".tar", ".pkl"}
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers


# --------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocess:
    """PIL image → float tensor ``(3, crop_size, crop_size)`` in [0, 1] (no normalisation).

    The resize + center crop of torchvision's ``ImageClassification`` transform, without
    its normalisation (which lives in :class:`ImageClassifier`). A plain picklable class,
    so DataLoader workers can use it with any start method.

    Attributes:
        crop_size: Side of the square center crop.
        resize_size: The shorter image side is resized to this first.
        interpolation: Resampling filter of the resize (antialiased).
    """

    crop_size: int = 224
    resize_size: int = 256
    interpolation: InterpolationMode = InterpolationMode.BILINEAR

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"Preprocess expects a PIL image, got {type(image).__name__}")
        image = image.convert("RGB") if image.mode != "RGB" else image
        image = TF.resize(image, [self.resize_size], self.interpolation, antialias=True)
        image = TF.center_crop(image, [self.crop_size])
        return TF.pil_to_tensor(image).float().div_(255)


def _preprocess_from_weights(weights: Any) -> tuple[Preprocess, tuple, tuple]:
    """Preprocess and mean/std of a torchvision weights enum member (its transforms)."""
    transform = weights.transforms()

    def first(value: Any, default: int) -> int:
        if value is None:
            return default
        return int(value[0]) if isinstance(value, (list, tuple)) else int(value)

    crop = first(getattr(transform, "crop_size", None), 224)
    resize = first(getattr(transform, "resize_size", None), round(crop * 256 / 224))
    interpolation = getattr(transform, "interpolation", InterpolationMode.BILINEAR)
    mean = tuple(float(v) for v in getattr(transform, "mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in getattr(transform, "std", IMAGENET_STD))
    return Preprocess(crop, resize, interpolation), mean, std


# --------------------------------------------------------------------------- the wrapper


class ImageClassifier(nn.Module):
    """A classifier on [0, 1] images: ``forward(x) = net((x - mean) / std)``.

    Args:
        net: The network; takes normalised ``(N, 3, H, W)`` input, returns logits ``(N, K)``.
        mean, std: Per-channel normalisation (3 floats each). ``(0, 0, 0)`` / ``(1, 1, 1)``
            for a net that takes [0, 1] input itself.
        preprocess: PIL image → ``(3, H, W)`` float tensor in [0, 1].
        categories: Class names (``K`` of them) or ``None``.
        num_classes: ``K``.
        name: Model name as the user gave it.
        weights: Where the weights came from (e.g. ``"ResNet50_Weights.IMAGENET1K_V2"``,
            ``"random"``, ``"checkpoint /path/to/file.pth"``).
        convbn: The ConvBN mode ``net`` was converted with.

    Shapes:
        ``x``: ``(N, 3, H, W)`` in [0, 1] → logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        preprocess: Callable[[Image.Image], torch.Tensor] | None = None,
        categories: Sequence[str] | None = None,
        num_classes: int,
        name: str,
        weights: str,
        convbn: str = "eval",
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {std}")
        self.net = net
        self._mean = tuple(float(v) for v in mean)
        self._std = tuple(float(v) for v in std)
        # Non-persistent: the state_dict stays the net's own, so checkpoints of the
        # wrapper and of the bare net differ only by the "net." prefix.
        self.register_buffer("mean", torch.tensor(self._mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self._std).view(1, 3, 1, 1), persistent=False)
        self.preprocess = preprocess if preprocess is not None else Preprocess()
        self.categories = list(categories) if categories is not None else None
        self.num_classes = int(num_classes)
        self.name = name
        self.weights = weights
        self.convbn = convbn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        # Rebuild the constants in the new dtype from the exact values, so that
        # model.double() normalises with float64 constants, not widened float32 ones.
        for name, values in (("mean", self._mean), ("std", self._std)):
            old = getattr(self, name)
            new = torch.tensor(values, dtype=old.dtype, device=old.device).view(1, 3, 1, 1)
            setattr(self, name, new)
        return self

    @property
    def convbn_report(self) -> ConvBNReport:
        """What :func:`advtune.tune` folded in the inner net."""
        return convbn_report(self.net)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights!r}, convbn={self.convbn!r}"


# --------------------------------------------------------------------------- public API


def list_models() -> list[str]:
    """Names of torchvision's ImageNet classification models, sorted."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_model(
    name: str,
    *,
    weights: str | os.PathLike = "DEFAULT",
    convbn: str = DEFAULT_CONVBN,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> ImageClassifier:
    """Build a frozen classifier that takes [0, 1] images.

    Args:
        name: A torchvision classification model (:func:`list_models`), or
            ``"package.module:function"``: a factory called with no arguments that returns
            an ``nn.Module`` (see ``docs/data_and_models.md`` for its conventions).
        weights: ``"DEFAULT"``; a torchvision weights name (``"IMAGENET1K_V2"`` or
            ``"ResNet50_Weights.IMAGENET1K_V2"``), fetched through torchvision's cache;
            a local checkpoint path (``torch.load(weights_only=True)``); or ``"random"``
            (untrained: a warning says results mean nothing).
        convbn: ConvBN mode applied to the inner net (``advtune.MODES``).
        device: Where to put the model (``None``: stay on the CPU).
        progress: Show torchvision's download progress bar.

    Returns:
        An :class:`ImageClassifier` in eval mode with every parameter frozen
        (``requires_grad=False``).

    Raises:
        UserError: Unknown model, weights or mode; download failure (offline); a checkpoint
            that is missing, unreadable or does not fit the model; CUDA asked for but absent.
    """
    if convbn not in MODES:
        raise UserError(suggest(str(convbn), MODES, what="ConvBN mode"))
    if convbn == "frozen" and importlib.util.find_spec("advtune.frozen") is None:
        # Checked before building: the frozen mode ships in its own module.
        raise UserError("convbn mode 'frozen' is not available in this install; use 'tune'")
    if device is not None:
        device = _check_device(device)
    if ":" in name and not _is_windows_path(name):
        net, preprocess, mean, std, categories, described = _factory_net(name, weights)
    else:
        net, preprocess, mean, std, categories, described = _torchvision_net(
            name, weights, progress=progress
        )
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    if categories is not None:
        num_classes = len(categories)
    else:
        num_classes = _infer_classes(net, preprocess)
        categories = _imagenet_categories() if num_classes == 1000 else None
    net = tune(net, convbn, inplace=True)
    for p in net.parameters():  # deploy/frozen create new parameters
        p.requires_grad_(False)
    model = ImageClassifier(
        net,
        mean=mean,
        std=std,
        preprocess=preprocess,
        categories=categories,
        num_classes=num_classes,
        name=name,
        weights=described,
        convbn=convbn,
    )
    report = getattr(net, _REPORT_ATTR, None)
    if report is not None:
        # advtune.convbn_report(model) then describes the conversion (paths relative to
        # model.net), and advtune.tune(model) refuses to convert twice.
        model.__dict__[_REPORT_ATTR] = report
    model.eval()
    if device is not None:
        model.to(device)
    return model


# --------------------------------------------------------------------------- torchvision


_NetInfo = tuple[nn.Module, Preprocess, tuple, tuple, "list[str] | None", str]


def _torchvision_net(name: str, weights: str | os.PathLike, *, progress: bool) -> _NetInfo:
    available = list_models()
    if name not in available:
        raise UserError(suggest(name, available, what="model"))
    enum = torchvision.models.get_model_weights(name)
    default = enum.DEFAULT
    preprocess, mean, std = _preprocess_from_weights(default)
    special = name in _TRANSFORM_INPUT_MODELS
    wstr = os.fspath(weights)

    if wstr.lower() == "random":
        warnings.warn(
            f"weights='random': {name} is untrained, so its predictions and any attack "
            "success rate mean nothing (use this only to test the pipeline)",
            UserWarning,
            stacklevel=3,
        )
        # init_weights=True explicitly: the builders warn when it is left to default.
        kwargs = {"init_weights": True} if special else {}
        net = torchvision.models.get_model(name, weights=None, **kwargs)
        return net, preprocess, mean, std, _imagenet_categories(), "random"

    member = _weights_member(name, enum, wstr)
    if member is not None:
        preprocess, mean, std = _preprocess_from_weights(member)
        net = _download_build(name, member, progress=progress)
        return net, preprocess, mean, std, list(member.meta["categories"]), str(member)

    path = _checkpoint_path(wstr, what=f"weights for {name}", choices=_weight_names(enum))
    state = load_checkpoint(path)
    kwargs = {}
    if special:
        # Checkpoints of these nets are taken to be torchvision's pretrained weights
        # (offline copies), which need transform_input=True; aux heads are built only
        # if the file has them (to load strictly), then dropped: eval never uses them.
        aux_prefix = _TRANSFORM_INPUT_MODELS[name]
        has_aux = any(k.startswith(aux_prefix) for k in state)
        kwargs = {"transform_input": True, "init_weights": False, "aux_logits": has_aux}
    net = torchvision.models.get_model(name, weights=None, **kwargs)
    _load_strict(net, state, path)
    if special:
        _drop_aux(net)
    # Built with the builder's default 1000 outputs and loaded strictly: ImageNet classes.
    return net, preprocess, mean, std, _imagenet_categories(), f"checkpoint {path}"


def _weight_names(enum: Any) -> list[str]:
    return list(dict.fromkeys(["DEFAULT", *enum.__members__]))  # DEFAULT is also a member


def _weights_member(name: str, enum: Any, text: str) -> Any | None:
    """The enum member ``text`` names, ``None`` if it does not look like a weights name."""
    if text.upper() == "DEFAULT":
        return enum.DEFAULT
    if text in enum.__members__:
        return enum[text]
    head, dot, tail = text.partition(".")
    if dot and re.fullmatch(r"\w+_Weights", head):
        if head != enum.__name__:
            raise UserError(
                f"weights {text!r} belong to another model; {name} takes: "
                + ", ".join(f"{enum.__name__}.{m}" for m in enum.__members__)
            )
        if tail in enum.__members__:
            return enum[tail]
        raise UserError(suggest(tail, enum.__members__, what=f"{enum.__name__} weights"))
    return None


def _download_build(name: str, member: Any, *, progress: bool) -> nn.Module:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)
    try:
        return torchvision.models.get_model(name, weights=member, progress=progress)
    except OSError as err:  # URLError, HTTPError, socket and SSL errors are all OSErrors
        raise UserError(
            f"could not download {member} for {name} ({type(err).__name__}: {err}). "
            f"Offline? Copy {member.url} to {cached}, or pass a local checkpoint path as "
            f"the weights (--weights /path/to/file.pth), or weights 'random' (untrained)"
        ) from err
    except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
        # A hash mismatch or a truncated file in the cache, not a model bug: say which file.
        raise UserError(
            f"could not load {member} for {name} from {cached} "
            f"({type(err).__name__}: {err}); delete that file and try again"
        ) from err


def _drop_aux(net: nn.Module) -> None:
    net.aux_logits = False
    for attr in ("AuxLogits", "aux1", "aux2"):
        if hasattr(net, attr):
            setattr(net, attr, None)


def _imagenet_categories() -> list[str]:
    # torchvision ships the names in its weights metadata: no download needed.
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def _infer_classes(net: nn.Module, preprocess: Preprocess) -> int:
    """Number of outputs, from one forward on a blank image (for factory nets)."""
    declared = getattr(net, "num_classes", None)
    if isinstance(declared, int) and declared > 0:
        return declared
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(1, 3, preprocess.crop_size, preprocess.crop_size, dtype=dtype)
    with torch.no_grad():
        out = net(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise UserError(
            f"the model must return logits of shape (N, num_classes), got "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
        )
    return int(out.shape[1])


# --------------------------------------------------------------------------- factories


def _factory_net(spec: str, weights: str | os.PathLike) -> _NetInfo:
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name.isidentifier():
        raise UserError(
            f"model {spec!r}: a factory is written 'package.module:function', e.g. "
            "'mymodels:build_net'"
        )
    module = _import(module_name, spec)
    factory = getattr(module, func_name, None)
    if not callable(factory):
        choices = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UserError(suggest(func_name, choices, what=f"function in {module_name}"))
    net = factory()
    if not isinstance(net, nn.Module):
        raise UserError(
            f"model factory {spec!r} must return an nn.Module, got {type(net).__name__}"
        )
    size = getattr(net, "advtune_input_size", 224)
    if not isinstance(size, int) or size < 1:
        raise UserError(f"{spec}: advtune_input_size must be a positive int, got {size!r}")
    preprocess = Preprocess(size, round(size * 256 / 224))
    if getattr(net, "advtune_normalized_input", True):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    categories = getattr(net, "categories", None)
    categories = list(categories) if categories is not None else None

    wstr = os.fspath(weights)
    if wstr.upper() == "DEFAULT":
        described = f"factory {spec}"
    elif wstr.lower() == "random":
        warnings.warn(
            f"weights='random': {spec} is re-initialised, so its predictions and any "
            "attack success rate mean nothing (use this only to test the pipeline)",
            UserWarning,
            stacklevel=3,
        )
        for m in net.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        described = "random"
    else:
        path = _checkpoint_path(wstr, what=f"weights for {spec}", choices=["DEFAULT", "random"])
        _load_strict(net, load_checkpoint(path), path)
        described = f"checkpoint {path}"
    return net, preprocess, mean, std, categories, described


def _import(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        top = module_name.split(".")[0]
        cwd = os.getcwd()
        # The `advtune` console script does not put the working directory on sys.path
        # (python -m does); a factory in ./mymodels.py should still be found.
        if err.name == top and cwd not in sys.path:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(module_name)
            except ModuleNotFoundError:
                sys.path.remove(cwd)
        raise UserError(
            f"model {spec!r}: cannot import module {module_name!r} ({err}); it must be "
            "importable (installed, on PYTHONPATH, or in the current directory)"
        ) from err


# --------------------------------------------------------------------------- checkpoints


def _is_windows_path(text: str) -> bool:
    return bool(re.match(r"^[A-Za-z]:[\\/]", text))


def _checkpoint_path(text: str, *, what: str, choices: list[str]) -> Path:
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    looks_like_path = (
        "/" in text
        or os.sep in text
        or any(text.lower().endswith(s) for s in _CHECKPOINT_SUFFIXES)
        or path.exists()
    )
    if looks_like_path:
        kind = "is not a file" if path.exists() else "not found"
        raise UserError(f"checkpoint {text!r} {kind}")
    raise UserError(
        suggest(text, [*choices, "random"], what=what)
        + " (or give the path of a local checkpoint file)"
    )


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a checkpoint file, safely.

    Uses ``torch.load(weights_only=True)``: tensors and plain containers only, never
    arbitrary pickled objects. Accepts a plain state_dict or one stored under
    ``"state_dict"`` or ``"model"``; strips ``module.`` (DataParallel/DDP) and
    ``_orig_mod.`` (``torch.compile``) prefixes.

    Raises:
        UserError: The file is missing, not a checkpoint, or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True refused "
            f"it: {str(err).splitlines()[0]}); save a plain state_dict with "
            "torch.save(model.state_dict(), path)"
        ) from err
    except Exception as err:  # weights_only unpickling of a broken file raises many types
        raise UserError(
            f"{str(path)!r} is not a valid PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'empty'})"
        ) from err
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"checkpoint {str(path)!r} holds no state_dict ({type(obj).__name__})")
    state = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(
                f"checkpoint {str(path)!r} is not a state_dict: entry {key!r} is a "
                f"{type(value).__name__}, not a tensor"
            )
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    return state


def _load_strict(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``net.load_state_dict(state)`` with a readable error when they do not fit."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    for label, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches (checkpoint vs model)", shapes),
    ):
        if keys:
            shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise UserError(
            f"checkpoint {str(path)!r} does not fit the model ({type(net).__name__}): "
            + "; ".join(problems)
        )
    net.load_state_dict(state, strict=True)


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UserError(f"invalid device {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r} requested but CUDA is not available")
    return dev
