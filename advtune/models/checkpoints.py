"""Local checkpoint files: safe reading (``.pth`` and ``.safetensors``), strict loading
with a one-line error, and a cached content hash (the resume key includes it)."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from advtune.errors import UserError, suggest

__all__ = ["checkpoint_sha256", "load_checkpoint"]

CHECKPOINT_SUFFIXES = {
    ".pt",
    ".pth",
    ".pth.tar",
    ".bin",
    ".ckpt",
    ".tar",
    ".pkl",
    ".safetensors",
}
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_DIGESTS: dict[tuple[str, int, int], str] = {}


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, cached per (absolute path, size, mtime).

    A second call on an unchanged file costs one ``stat``; a file rewritten in place
    (new size or mtime) is hashed again.

    Raises:
        UserError: The file does not exist.
    """
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError as err:
        raise UserError(f"checkpoint {str(path)!r} not found ({err.strerror})") from err
    key = (str(p), st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        h = hashlib.sha256()
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _DIGESTS[key] = h.hexdigest()
    return digest


def checkpoint_path(text: str, *, what: str, choices: list[str]) -> Path:
    """``text`` as an existing checkpoint file, or a UserError that suggests ``choices``."""
    path = Path(text).expanduser()
    if path.is_file():
        return path.resolve()
    looks_like_path = (
        "/" in text
        or os.sep in text
        or any(text.lower().endswith(s) for s in CHECKPOINT_SUFFIXES)
        or path.exists()
    )
    if looks_like_path:
        kind = "is not a file" if path.exists() else "not found"
        raise UserError(f"checkpoint {text!r} {kind}")
    raise UserError(
        suggest(text, [*choices, "random"], what=what)
        + " (or give the path of a local checkpoint file)"
    )


def _read_safetensors(path: Path) -> Mapping[str, object]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise UserError(
            f"checkpoint {str(path)!r} is a .safetensors file; install the 'safetensors' "
            "package (pip install advtune[safetensors])"
        ) from err
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"{str(path)!r} is not a valid safetensors file ({type(err).__name__}: "
            f"{(str(err).splitlines() or ['empty'])[0]})"
        ) from err


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(
            f"checkpoint {str(path)!r} cannot be loaded safely (weights_only=True refused "
            f"it: {str(err).splitlines()[0]}); save a plain state_dict with "
            "torch.save(model.state_dict(), path) or safetensors"
        ) from err
    except Exception as err:  # weights_only unpickling of a broken file raises many types
        raise UserError(
            f"{str(path)!r} is not a valid PyTorch checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'empty'})"
        ) from err


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state_dict from a checkpoint file, safely.

    ``.safetensors`` files are read with ``safetensors`` (no code runs); anything else
    with ``torch.load(weights_only=True)``: tensors and plain containers only, never
    arbitrary pickled objects. Accepts a plain state_dict or one stored under
    ``"state_dict"`` or ``"model"``; strips ``module.`` (DataParallel/DDP) and
    ``_orig_mod.`` (``torch.compile``) prefixes.

    Raises:
        UserError: The file is missing, not a checkpoint, or holds no state_dict.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} not found")
    obj = _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
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


def load_strict(net: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``net.load_state_dict(state)`` with a one-line error when they do not fit.

    The error names the path and the model class, then the first shape mismatch
    (checkpoint vs model), missing and unexpected keys, with counts.
    """
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
        ("shape mismatches (checkpoint vs model)", shapes),
        ("missing keys", missing),
        ("unexpected keys", unexpected),
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
