"""Run-time options for any ConvBN mode: AMP, channels_last, torch.compile, batch sizes.

* :func:`prepare` applies ``channels_last``, ``amp`` (autocast with float32 logits) and
  ``compile`` to a model that :func:`advtune.tune` already converted. Folding happens
  before, in float32 (see :mod:`advtune.convbn`), so the compiled graph runs the folded
  weights.
* :func:`autocast` is the context manager behind ``amp``.
* :func:`parse_device` reads every ``--device`` / ``device=`` text (CLI, benchmark,
  model loading, torchrun ranks): the one place device names are checked.
* :func:`auto_batch_size` finds the largest batch whose real forward+backward fits in GPU
  memory (probe, back off on OOM, cache per configuration in this process and in a JSON
  file, :func:`default_batch_size_cache`).
* :func:`run_with_oom_backoff` runs a batch in chunks and halves the chunk when it runs
  out of memory, so a run carries on and loses nothing; with ``pad=True`` every chunk has
  exactly the chunk size, so results depend only on that size (kernels can give other
  last bits for another batch shape, on CPUs too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from advtune.errors import UserError

__all__ = [
    "AMP_DTYPES",
    "CPU_BATCH_SIZE",
    "AmpModel",
    "BackoffResult",
    "amp_dtype",
    "auto_batch_size",
    "autocast",
    "clear_batch_size_cache",
    "concat_results",
    "default_batch_size_cache",
    "find_max_batch",
    "is_oom_error",
    "parse_device",
    "prepare",
    "register_chunk_result",
    "run_with_oom_backoff",
    "trim_results",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``amp`` option value -> autocast dtype.
AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype for an ``amp`` option (``None``, ``"bf16"`` or ``"fp16"``)."""
    if amp is None:
        return None
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    return AMP_DTYPES[amp]


@contextlib.contextmanager
def autocast(device: torch.device | str, amp: str | None) -> Iterator[None]:
    """``torch.autocast`` for ``amp`` on ``device``; a no-op when ``amp`` is ``None``.

    Args:
        device: The device (or its type, ``"cuda"``, ``"cpu"``) the model runs on.
        amp: ``None``, ``"bf16"`` or ``"fp16"``.
    """
    dtype = amp_dtype(amp)
    if dtype is None:
        yield
        return
    device_type = torch.device(device).type
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


class AmpModel(nn.Module):
    """Runs ``module`` under autocast and returns float32 logits.

    Losses computed from the logits are then float32 too, outside autocast: the attack's
    gradient direction is not degraded by a low-precision softmax.

    Args:
        module: The classifier, ``(N, C, H, W)`` -> logits ``(N, K)``.
        amp: ``"bf16"`` or ``"fp16"``.
        channels_last: Also convert 4-D inputs to ``torch.channels_last`` (the layout
            the tensor cores prefer). The input gradient keeps the caller's values.
    """

    def __init__(self, module: nn.Module, *, amp: str | None, channels_last: bool = False):
        super().__init__()
        amp_dtype(amp)  # validate
        self.module = module
        self.amp = amp
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(x.device, self.amp):
            out = self.module(x)
        return out.float() if out.is_floating_point() and out.dtype != torch.float64 else out

    @property
    def card(self) -> Any:
        """The wrapped classifier's :class:`~advtune.models.ModelCard` (``None`` if none)."""
        return getattr(self.module, "card", None)

    def extra_repr(self) -> str:
        return f"amp={self.amp!r}, channels_last={self.channels_last}"


def prepare(
    model: nn.Module,
    *,
    device: torch.device | str | None = None,
    channels_last: bool = False,
    amp: str | None = None,
    compile: bool = False,
    compile_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Apply the run-time options to a (tuned) model.

    Call after :func:`advtune.tune`: folding is done once, in float32, and the options
    act on the folded model. Works for every ConvBN mode.

    Args:
        model: The classifier (already converted by :func:`advtune.tune` if wanted).
        device: Move the model there first (``None``: leave it).
        channels_last: Store 4-D weights channels_last and feed inputs that way.
        amp: ``None``, ``"bf16"`` or ``"fp16"``: run under autocast, logits float32.
        compile: Wrap with ``torch.compile`` (``compile_options`` are passed on).

    Returns:
        ``model`` itself when no option wraps it, else an :class:`AmpModel` and/or the
        ``torch.compile`` wrapper around it (``state_dict`` keys then gain the wrapper's
        prefix: load checkpoints before calling ``prepare``).
    """
    amp_dtype(amp)  # validate before touching the model
    if device is not None:
        model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if amp is not None or channels_last:
        model = AmpModel(model, amp=amp, channels_last=channels_last)
    if compile:
        model = torch.compile(model, **dict(compile_options or {}))  # type: ignore[assignment]
    return model


# --------------------------------------------------------------------------- OOM handling


# --------------------------------------------------------------------------- devices


def parse_device(device: str, *, local_rank: int | None = None) -> str:
    """The device to run on for ``--device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Args:
        device: the ``--device`` text.
        local_rank: under torchrun, this process's ``LOCAL_RANK``: ``cuda`` then means
            ``cuda:LOCAL_RANK`` and ``cuda:N`` is refused (every rank would share a GPU).

    Raises:
        UserError: CUDA asked for but absent, a missing ``cuda:N``, an unknown name.
    """
    text = device.strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return "cpu"
    is_indexed = text.startswith("cuda:") and text[5:].isdigit()
    if text != "cuda" and not is_indexed:
        choices = "auto, cpu or cuda" if local_rank is not None else "auto, cpu, cuda or cuda:N"
        raise UserError(f"unknown device {device!r}; use {choices}")
    if local_rank is not None and is_indexed:
        raise UserError(
            f"--device {device} would put every rank on one GPU; under torchrun use "
            "--device cuda (rank r uses cuda:LOCAL_RANK) and choose GPUs with "
            "CUDA_VISIBLE_DEVICES"
        )
    if not torch.cuda.is_available():
        raise UserError(
            f"--device {text} asked for, but CUDA is not available "
            f"(torch {torch.__version__}); use --device cpu"
        )
    count = torch.cuda.device_count()
    if local_rank is not None:
        if local_rank >= count:
            raise UserError(
                f"LOCAL_RANK {local_rank} has no GPU: only {count} CUDA device(s) visible "
                "on this node; start at most that many processes per node"
            )
        return f"cuda:{local_rank}"
    if is_indexed and int(text[5:]) >= count:
        raise UserError(f"--device {text}: only {count} CUDA device(s) visible")
    return text


#: Messages of RuntimeErrors that mean the GPU ran out of memory outside PyTorch's
#: caching allocator: a cuBLAS / cuDNN handle or workspace that could not be allocated
#: (raised instead of ``OutOfMemoryError`` when the first matmul or convolution of a
#: thread runs with the memory already full).
_OOM_MESSAGES = ("out of memory", "cublas_status_alloc_failed", "cudnn_status_alloc_failed")


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` means "out of memory" (CUDA, or an allocator's RuntimeError)."""
    oom_types = tuple(
        t
        for t in (getattr(torch, "OutOfMemoryError", None), torch.cuda.OutOfMemoryError)
        if isinstance(t, type)
    )
    if isinstance(exc, oom_types):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _OOM_MESSAGES)


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_BATCH_CACHE: dict[Hashable, int] = {}


def clear_batch_size_cache() -> None:
    """Forget every batch size :func:`auto_batch_size` / :func:`find_max_batch` cached in
    this process (cache files are left alone)."""
    _BATCH_CACHE.clear()
    _AUTO_CACHE.clear()


def find_max_batch(
    probe: Callable[[int], object],
    *,
    start: int = 8,
    limit: int = 16384,
    key: Hashable | None = None,
    tolerance: float = 0.05,
) -> int:
    """The largest batch size for which ``probe(batch)`` runs without running out of memory.

    Doubles from ``start`` until ``probe`` raises an OOM error (or ``limit`` is reached),
    then bisects between the last success and the first failure until they are within
    ``tolerance`` (relative). Only OOM errors are caught; anything else propagates.

    Args:
        probe: Runs one batch of the real workload (e.g. forward+backward of the
            attack's loss) at the given batch size.
        start: First batch size tried (halved on OOM down to 1).
        limit: Never probe above this.
        key: Cache key (the configuration: model, mode, attack, input size, dtype,
            device...). A cached key returns without probing.
        tolerance: Stop bisecting when ``(fail - ok) / ok <= tolerance``.

    Returns:
        The batch size (≥ 1).

    Raises:
        RuntimeError: Even a batch of 1 runs out of memory.
    """
    if start < 1 or limit < 1:
        raise ValueError(f"start and limit must be >= 1, got start={start}, limit={limit}")
    if key is not None and key in _BATCH_CACHE:
        return _BATCH_CACHE[key]

    def fits(batch: int) -> bool:
        oom = False
        try:
            probe(batch)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            oom = True  # leave the except block first: the traceback pins the tensors
        _release_memory()
        log.debug("batch %d %s", batch, "runs out of memory" if oom else "fits")
        return not oom

    ok, fail = 0, None
    batch = min(start, limit)
    while ok == 0:  # find one size that fits, halving
        if fits(batch):
            ok = batch
        elif batch == 1:
            raise RuntimeError("out of memory even at batch size 1")
        else:
            fail, batch = batch, batch // 2
    while fail is None and ok < limit:  # grow
        batch = min(ok * 2, limit)
        if fits(batch):
            ok = batch
        else:
            fail = batch
    while fail is not None and fail - ok > max(1, int(ok * tolerance)):  # bisect
        mid = (ok + fail) // 2
        if fits(mid):
            ok = mid
        else:
            fail = mid
    if key is not None:
        _BATCH_CACHE[key] = ok
    return ok


#: What ``auto_batch_size`` answers on a CPU, where it does not probe.
CPU_BATCH_SIZE = 32

#: Bumped when the cache file's layout changes (older files are then ignored).
_CACHE_FORMAT = "advtune-batch-size/1"

_AUTO_CACHE: dict[str, dict[str, Any]] = {}


def default_batch_size_cache() -> Path:
    """The batch-size cache file: ``$XDG_CACHE_HOME/advtune/batch_size.json``, by
    default ``~/.cache/advtune/batch_size.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "advtune" / "batch_size.json"


def _key_text(key: Any) -> str:
    # One canonical string per configuration: the same in every process (unlike hash()).
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=repr)


def _read_cache_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable batch-size cache %s (%s)", path, e)
        return {}
    if not isinstance(data, dict) or data.get("format") != _CACHE_FORMAT:
        return {}
    entries = data.get("entries")
    return entries if isinstance(entries, dict) else {}


def _write_cache_entry(path: Path, text: str, entry: dict[str, Any]) -> None:
    from advtune.storage import atomic_write_text

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Read-modify-write: another process may have added entries since we read.
        entries = _read_cache_file(path)
        entries[text] = entry
        doc = {"format": _CACHE_FORMAT, "entries": dict(sorted(entries.items()))}
        atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    except OSError as e:  # a cache is an optimisation: a read-only home must not fail a run
        log.warning("could not write the batch-size cache %s (%s)", path, e)


def _entry_answer(entry: Any, limit: int) -> int | None:
    # An entry from a probe that stopped at its limit without an OOM only says that
    # `limit` fits: it answers for limits up to that one, not beyond.
    if not isinstance(entry, dict) or not isinstance(entry.get("batch_size"), int):
        return None
    capped_at = entry.get("capped_at")
    if capped_at is not None and (not isinstance(capped_at, int) or capped_at < limit):
        return None
    return max(1, min(entry["batch_size"], limit))


def auto_batch_size(
    model: nn.Module,
    *,
    input_shape: Sequence[int] = (3, 224, 224),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    step: Callable[[nn.Module, torch.Tensor], object] | None = None,
    key: Any = None,
    start: int = 8,
    limit: int = 16384,
    margin: float = 0.9,
    cpu_batch_size: int = CPU_BATCH_SIZE,
    cache_file: str | os.PathLike[str] | None = None,
) -> int:
    """The largest batch of ``input_shape`` images whose attack step fits in GPU memory.

    Probes a real forward+backward (by default: cross-entropy of the logits w.r.t. the
    input, which is what every gradient attack does once per step), backs off on OOM and
    caches the answer under ``key`` (in this process, and in ``cache_file`` across
    processes). On a CPU the probe is skipped (running out of host memory kills the
    process rather than raising) and ``min(cpu_batch_size, limit)`` is returned.

    Args:
        model: The prepared model (mode, AMP, layout already applied).
        input_shape: ``(C, H, W)`` of one image.
        device: Where to probe (default: the model's parameters' device).
        dtype: Input dtype.
        step: ``step(model, x)`` runs one attack step on the batch ``x``; the default
            computes ``CE(model(x), argmax)`` and its gradient w.r.t. ``x``.
        key: Cache key: the configuration (model name, mode, attack, amp,
            channels_last, compile, input size, device name), any JSON-able value;
            ``None`` disables caching.
        start, limit: See :func:`find_max_batch`. Never answers above ``limit`` (e.g.
            the number of images to attack: a larger batch only adds padding).
        margin: Fraction of the largest fitting batch to return (fragmentation and the
            attack's extra buffers need headroom; an OOM later halves the batch anyway).
            Not applied when even ``limit`` fits.
        cpu_batch_size: The answer on a CPU (clamped to ``limit``).
        cache_file: JSON file that keeps answers across runs (e.g.
            :func:`default_batch_size_cache`); written atomically; ``None``: this
            process only. Unreadable or unwritable files are ignored with a warning.

    Returns:
        The batch size, ``1 <= size <= limit``.
    """
    if not 0 < margin <= 1:
        raise ValueError(f"margin must be in (0, 1], got {margin}")
    if start < 1 or limit < 1:
        raise ValueError(f"start and limit must be >= 1, got start={start}, limit={limit}")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cpu":
        return max(1, min(cpu_batch_size, limit))
    text = _key_text(key) if key is not None else None
    path = Path(cache_file) if cache_file is not None else None
    if text is not None:
        answer = _entry_answer(_AUTO_CACHE.get(text), limit)
        if answer is None and path is not None:
            entry = _read_cache_file(path).get(text)
            answer = _entry_answer(entry, limit)
            if answer is not None and entry is not None:
                _AUTO_CACHE[text] = entry
        if answer is not None:
            log.debug("batch size %d from the cache", answer)
            return answer

    def default_step(m: nn.Module, x: torch.Tensor) -> object:
        x.requires_grad_(True)
        logits = m(x)
        loss = F.cross_entropy(logits.float(), logits.detach().argmax(1))
        return torch.autograd.grad(loss, x)[0]

    run_step = step or default_step

    def probe(batch: int) -> None:
        x = torch.rand(batch, *input_shape, device=device, dtype=dtype)
        run_step(model, x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = find_max_batch(probe, start=min(start, limit), limit=limit, key=None)
    capped = best >= limit
    result = limit if capped else max(1, int(best * margin))
    log.info(
        "largest batch that fits: %d%s; using %d", best, " (the limit)" if capped else "", result
    )
    if text is not None:
        entry = {"batch_size": result, "max_fitting": best, "capped_at": limit if capped else None}
        _AUTO_CACHE[text] = entry
        if path is not None:
            _write_cache_entry(path, text, {**entry, "key": key})
    return result


@dataclasses.dataclass(frozen=True)
class BackoffResult:
    """What :func:`run_with_oom_backoff` returns.

    Attributes:
        value: The combined result of all chunks.
        chunk_size: The chunk size that finally worked (use it for the next batches).
        oom_count: How many OOM errors were absorbed.
    """

    value: Any
    chunk_size: int
    oom_count: int


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, Mapping):
        return next(_batch_len(v) for v in batch.values() if _has_tensor(v))
    if isinstance(batch, (tuple, list)):
        return next(_batch_len(v) for v in batch if _has_tensor(v))
    raise ValueError(f"batch must be a tensor or a tuple/list/dict of tensors, got {batch!r}")


def _has_tensor(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return True
    if isinstance(v, Mapping):
        return any(_has_tensor(e) for e in v.values())
    if isinstance(v, (tuple, list)):
        return any(_has_tensor(e) for e in v)
    return False


def _slice(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return type(batch)({k: _slice(v, start, stop) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, start, stop) for v in batch)
    return batch  # non-tensor values (hyperparameters) are passed to every chunk


#: Result type -> (join, trim) for types whose chunks do not combine field by field
#: (registered by the module that owns the type: :func:`register_chunk_result`).
_CHUNK_RULES: dict[type, tuple[Callable[[list[Any]], Any], Callable[[Any, int], Any]]] = {}


def register_chunk_result(
    cls: type, *, join: Callable[[list[Any]], Any], trim: Callable[[Any, int], Any]
) -> None:
    """Say how chunk results of type ``cls`` combine (``join(parts)``) and how the first
    ``n`` samples' part is kept (``trim(result, n)``), for :func:`concat_results` and
    :func:`trim_results` (and so :func:`run_with_oom_backoff`). Registering twice raises.
    """
    if cls in _CHUNK_RULES:
        raise ValueError(f"chunk rules for {cls.__qualname__} are registered already")
    _CHUNK_RULES[cls] = (join, trim)


def concat_results(parts: list[Any]) -> Any:
    """Default combiner: concatenate tensors along dim 0, recursing into containers.

    Types registered with :func:`register_chunk_result` use their own rule. Tuples,
    lists, dicts and dataclasses are combined field by field. Other values must be equal
    in every part, except numbers, for which the maximum is kept (e.g. an attack's
    ``model_calls``: each chunk ran the same number of steps on its images).
    """
    first = parts[0]
    rule = _CHUNK_RULES.get(type(first))
    if rule is not None:
        return rule[0](parts)
    if isinstance(first, torch.Tensor):
        return torch.cat(parts) if first.dim() > 0 else torch.stack(parts)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        values = {
            f.name: concat_results([getattr(p, f.name) for p in parts])
            for f in dataclasses.fields(first)
            if f.init
        }
        return type(first)(**values)
    if isinstance(first, Mapping):
        return type(first)({k: concat_results([p[k] for p in parts]) for k in first})  # type: ignore[call-arg]
    if isinstance(first, (tuple, list)):
        return type(first)(concat_results(list(items)) for items in zip(*parts))
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return max(parts)
    if all(p == first for p in parts[1:]):
        return first
    raise ValueError(f"cannot combine differing non-tensor chunk results: {parts!r}")


def trim_results(value: Any, n: int) -> Any:
    """Default trimmer of :func:`run_with_oom_backoff`: the first ``n`` entries along dim 0
    of every tensor, recursing into tuples, lists, dicts and dataclasses (0-d tensors and
    other values are kept; registered types use their rule, :func:`register_chunk_result`)."""
    rule = _CHUNK_RULES.get(type(value))
    if rule is not None:
        return rule[1](value, n)
    if isinstance(value, torch.Tensor):
        return value[:n] if value.dim() > 0 else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value,
            **{
                f.name: trim_results(getattr(value, f.name), n)
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    if isinstance(value, Mapping):
        return type(value)({k: trim_results(v, n) for k, v in value.items()})  # type: ignore[call-arg]
    if isinstance(value, (tuple, list)):
        return type(value)(trim_results(v, n) for v in value)
    return value


def _pad(batch: Any, size: int) -> Any:
    # Repeat the last sample (dim 0 of every tensor) up to `size`.
    if isinstance(batch, torch.Tensor):
        fill = size - batch.shape[0]
        return torch.cat([batch, batch[-1:].expand(fill, *batch.shape[1:])]) if fill else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _pad(v, size) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_pad(v, size) for v in batch)
    return batch


def run_with_oom_backoff(
    fn: Callable[[Any], T],
    batch: Any,
    *,
    chunk_size: int | None = None,
    min_chunk_size: int = 1,
    combine: Callable[[list[T]], Any] | None = None,
    pad: bool = False,
    trim: Callable[[T, int], T] | None = None,
) -> BackoffResult:
    """Run ``fn`` over ``batch`` in chunks; on out-of-memory, halve the chunk and go on.

    Nothing is lost: the chunk that failed is rerun at half the size, finished chunks are
    kept, and the results are combined in order. Results equal one big call's as long as
    ``fn`` treats samples independently (advtune's attacks do, with per-sample seeds)
    *and* the kernels give each sample the same floats whatever the batch shape; on CPU
    and GPU alike they often do not in the last bits (another batch size can pick another
    algorithm). With ``pad=True`` every call of ``fn`` gets exactly ``chunk_size``
    samples, so each sample's result depends only on the chunk size in effect: a run
    that backed off to size ``c`` gives, from then on, what a run at ``c`` gives.

    Args:
        fn: Processes one chunk (same structure as ``batch``) and returns its result.
        batch: A tensor, or a tuple/list/dict of tensors sharing dim 0 (non-tensor
            entries are passed unchanged to every chunk).
        chunk_size: Start with chunks of this size (default: the whole batch).
        min_chunk_size: Give up (re-raise the OOM) below this size.
        combine: Combines the list of chunk results (default: :func:`concat_results`).
        pad: Pad a short chunk (the batch's last, or a batch smaller than
            ``chunk_size``) to the chunk size by repeating its last sample, and drop the
            copies' results with ``trim``.
        trim: ``trim(result, n)`` keeps the results of the first ``n`` samples (default:
            :func:`trim_results`).

    Returns:
        A :class:`BackoffResult`; its ``chunk_size`` is the size to use next time.
    """
    n = _batch_len(batch)
    size = n if chunk_size is None else chunk_size
    if size < 1 or min_chunk_size < 1:
        raise ValueError(
            f"chunk_size and min_chunk_size must be >= 1, got {size} and {min_chunk_size}"
        )
    parts: list[T] = []
    start, ooms = 0, 0
    while start < n:
        stop = min(start + size, n)
        chunk = _slice(batch, start, stop)
        padded = pad and stop - start < size
        error: BaseException | None = None
        try:
            result = fn(_pad(chunk, size) if padded else chunk)
            parts.append((trim or trim_results)(result, stop - start) if padded else result)
        except Exception as exc:
            if not is_oom_error(exc):
                raise
            error = exc
        if error is None:
            start = stop
            continue
        ooms += 1
        failed = size if pad else stop - start  # the shape fn actually ran out of memory at
        if failed <= min_chunk_size:
            raise error
        size = max(min_chunk_size, failed // 2)
        del error, chunk  # drop the traceback (and the tensors it pins) before retrying
        _release_memory()
        log.debug("out of memory; retrying with chunks of %d", size)
    value = (combine or concat_results)(parts)
    return BackoffResult(value=value, chunk_size=size, oom_count=ooms)
