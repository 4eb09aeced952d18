"""One batch: clean forward, targets, the attack for each eps, 8-bit saving, re-check.

:func:`attack_batch` gives one manifest row per (image, eps). ``success``, ``adv_pred``
and the norms describe the *saved* (quantised) images; ``attack_success`` is the
attack's own verdict before quantisation. A sample whose clean or adversarial logits are
not finite (NaN or ±inf) gets ``clean_pred``/``adv_pred`` ``-1`` and a NaN confidence:
it can never count as correct or robust (:func:`row_is_finite`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from advtune.errors import UserError
from advtune.run.spec import AttackConfig, sample_seeds

__all__ = [
    "TARGET_MODES",
    "BatchOutput",
    "attack_batch",
    "attack_cost",
    "attack_kwargs",
    "broken_by_names",
    "merge_cost",
    "row_is_finite",
]

#: ``AttackConfig.targeted`` values besides ``None``.
TARGET_MODES = ("random", "least-likely")


@dataclass
class BatchOutput:
    """The result of :func:`attack_batch`.

    Attributes:
        rows: one manifest row per (image, eps), in (image, eps) order.
        images: per eps (same order as ``AttackConfig.eps_values()``), the saved
            ``(N, C, H, W)`` uint8 images.
        model_calls: forward passes of the batch, attacks plus clean and re-check passes.
        checks: per eps, the attack's gradient-masking checks (``result.checks`` of an
            ensemble; ``{}`` for other attacks), with their ``eps``.
        cost: model calls by kind (:func:`attack_cost`), JSON-ready; summed over
            batches with :func:`merge_cost`.
    """

    rows: list[dict[str, Any]]
    images: list[torch.Tensor]
    model_calls: int
    checks: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)


def merge_cost(*parts: Mapping[str, Any] | None) -> dict[str, Any]:
    """Add up ``cost`` entries (batches, sessions, torchrun ranks).

    Numbers add, nested dicts (``"components"``) merge key by key, lists
    (``"versions"``) become the sorted union.
    """
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in (part or {}).items():
            if isinstance(value, Mapping):
                out[key] = merge_cost(out.get(key), value)
            elif isinstance(value, (list, tuple)):
                out[key] = sorted({*out.get(key, []), *value})
            else:
                out[key] = out.get(key, 0) + value
    return out


def attack_cost(result: Any) -> dict[str, Any]:
    """An attack result's model calls as ``report.json``'s ``cost`` entry.

    ``{"forward", "gradient", "forward_images", "gradient_images"}`` (calls without and
    with a backward pass, and the images they processed: :class:`~advtune.attacks.ModelCalls`),
    plus for an ensemble ``"components"`` (the same per component) and ``"versions"``
    (``[version]``). A result without a split (built by hand) counts every call as
    ``"unsplit"``.
    """
    calls = getattr(result, "calls", None)
    if calls is None:
        cost: dict[str, Any] = {"unsplit": int(result.model_calls)}
    else:
        cost = calls.as_dict()
    names = getattr(result, "components", None)
    per = getattr(result, "component_cost", None)
    if names is not None and per:
        cost["components"] = {
            name: c.as_dict() if c is not None else {"unsplit": int(n)}
            for name, c, n in zip(names, per, result.component_calls)
        }
    version = getattr(result, "version", None)
    if isinstance(version, str):
        cost["versions"] = [version]
    return cost


def row_is_finite(row: Mapping[str, Any]) -> bool:
    """Whether a manifest row's clean and adversarial logits were finite."""
    return all(
        isinstance(row.get(k), (int, float)) and math.isfinite(row[k])
        for k in ("clean_conf", "adv_conf")
    )


def broken_by_names(result: Any) -> list[str]:
    """The ``broken_by`` manifest cell of each sample of an attack result.

    An ensemble result (one with ``components`` and ``broken_by``) names the component
    that broke each sample, ``"clean"`` for a clean image that already counted as a
    success (not attacked) and ``""`` for a sample no component broke; any other result
    gives ``""`` for every sample.
    """
    broken = getattr(result, "broken_by", None)
    components = getattr(result, "components", None)
    if broken is None or components is None:
        return [""] * int(result.success.shape[0])
    return [components[i] if i >= 0 else ("clean" if i == -2 else "") for i in broken.tolist()]


def attack_kwargs(config: AttackConfig, eps: float | None, *, probe: bool = False) -> dict:
    """The attack's keyword arguments for one eps, read from its declared spec.

    The threat model the attack uses (``spec.threat``) is made to agree with
    ``config.norm`` (an attack with a norm hyperparameter gets it set; one fixed to a norm
    must be that one); ``eps`` goes to the spec's radius parameter. With ``probe`` the
    cost budgets are at their minimum (``spec.probe_hyperparameters``: memory does not
    grow with the number of steps, restarts or queries), for batch-size probing.

    Raises:
        ValueError: the attack's threat model is not ``config.norm``, or ``eps`` is given
            to an attack without a radius.
    """
    from advtune import attacks

    spec = attacks.spec(config.attack)
    kwargs = dict(config.params)
    key = spec.norm_key
    if key is not None:
        # The threat model of the saved images and the attack's own must be the same one.
        if spec.norm_of(kwargs) != config.norm and key in kwargs:
            raise ValueError(
                f"params {key} {kwargs[key]!r} disagrees with config norm {config.norm!r}"
            )
        kwargs[key] = config.norm
    elif spec.norm != config.norm:
        raise ValueError(f"attack {config.attack!r} is {spec.norm}, not {config.norm}")
    if eps is not None:
        if spec.radius_key is None:
            raise ValueError(f"attack {config.attack!r} takes no eps, got {eps}")
        kwargs[spec.radius_key] = eps
    if probe:
        kwargs = spec.probe_hyperparameters(kwargs)
    return kwargs


def _targets(
    model: nn.Module,
    images: torch.Tensor,
    clean_logits: torch.Tensor,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    mode: str | None,
) -> tuple[torch.Tensor | None, int]:
    """``(target or None, model calls spent)`` for ``AttackConfig.targeted``."""
    from advtune.attacks import least_likely_target, random_target

    if mode is None:
        return None, 0
    if mode == "random":
        return random_target(labels, clean_logits.shape[1], seeds=seeds), 0
    if mode == "least-likely":
        target = least_likely_target(model, images)
        # A model that ranks the true class last has no least likely *other* class at
        # that rank: take the next one (a target equal to the label is no target).
        clash = target == labels
        if bool(clash.any()):
            masked = clean_logits.scatter(1, labels[:, None], float("inf"))
            target = torch.where(clash, masked.argmin(dim=1), target)
        return target, 1
    raise ValueError(f"targeted must be None, {' or '.join(map(repr, TARGET_MODES))}, got {mode!r}")


def _raised_in_model(exc: BaseException, model: nn.Module) -> bool:
    """Whether ``exc`` came out of a ``forward`` of ``model`` or one of its modules."""
    modules = {id(m) for m in model.modules()}
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "forward" and id(frame.f_locals.get("self")) in modules:
            return True
        tb = tb.tb_next
    return False


def check_logits(out: Any, n: int) -> torch.Tensor:
    """``out`` if it is the ``(n, K)`` floating-point logits tensor attacks need.

    Raises:
        UserError: a model that returns something else (a tuple, a numpy array, integer
            logits, another shape), named with what it returned.
    """
    if not isinstance(out, torch.Tensor):
        what = type(out).__name__
        hint = (
            " (take the logits out of it in your model's forward)"
            if isinstance(out, (tuple, list, dict))
            else ""
        )
        raise UserError(f"the model returned a {what}, not a logits tensor of shape (N, K){hint}")
    if not out.is_floating_point():
        raise UserError(
            f"the model returned {out.dtype} logits; attacks need floating-point logits "
            "(their gradient)"
        )
    if out.dim() != 2 or out.shape[0] != n:
        raise UserError(
            f"the model returned logits of shape {tuple(out.shape)} for {n} images; "
            f"expected ({n}, K)"
        )
    return out


def _predict(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pred, confidence, finite)``: non-finite rows get pred -1 and confidence NaN."""
    finite = torch.isfinite(logits).all(dim=1)
    conf, pred = logits.softmax(dim=1).max(dim=1)
    pred = torch.where(finite, pred, torch.full_like(pred, -1))
    conf = torch.where(finite, conf, torch.full_like(conf, float("nan")))
    return pred, conf, finite


def attack_batch(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: Sequence[int],
    paths: Sequence[str],
    config: AttackConfig,
    *,
    attack_fn: Callable[..., Any] | None = None,
    adv_paths: Mapping[str, str] | None = None,
    probe: bool = False,
) -> BatchOutput:
    """Attack one batch for every eps and describe each saved image.

    Args:
        model: classifier on [0, 1] images → logits ``(N, K)``.
        images: ``(N, C, H, W)`` clean images in [0, 1], 8-bit quantised, on the model's
            device.
        labels: ``(N,)`` labels; ``-1`` means unknown and is replaced by the model's clean
            prediction.
        indices: dataset index of each image (per-sample seeds derive from it).
        paths: relative path of each image.
        config: the attack configuration.
        attack_fn: the attack function (default ``advtune.attacks.get(config.attack)``).
        adv_paths: relative PNG path for each image path (``adv_path`` column); ``None``
            when images are not saved.
        probe: cost hyperparameters at one iteration (batch-size probing).

    Returns:
        A :class:`BatchOutput`.

    Raises:
        UserError: a label out of the model's range, or the attack rejected its
            settings (a ``ValueError`` raised by the model's own forward propagates
            unchanged).
    """
    if attack_fn is None:
        from advtune import attacks

        attack_fn = attacks.get(config.attack)
    n = images.shape[0]
    labels = labels.to(images.device).long()
    with torch.no_grad():
        clean_logits = check_logits(model(images), n).float()
    clean_pred, clean_conf, clean_finite = _predict(clean_logits)
    num_classes = clean_logits.shape[1]
    if n and int(labels.max()) >= num_classes:
        raise UserError(
            f"label {int(labels.max())} is out of range for a model with {num_classes} "
            "classes; is this the right model for the dataset?"
        )
    # Unknown labels: the clean prediction (class 0 for a non-finite one, which is then
    # flagged and never counted correct).
    labels = torch.where(labels < 0, clean_pred.clamp(min=0), labels)
    seeds = sample_seeds(config.seed, indices)
    target, calls = _targets(model, images, clean_logits, labels, seeds, config.targeted)
    calls += 1
    # The runner's own passes (clean, least-likely target, one re-check per eps) are
    # forward-only on the whole batch.
    costs: list[dict[str, Any]] = [{"forward": calls, "forward_images": calls * n}]

    saved: list[torch.Tensor] = []
    per_eps: list[tuple[float | None, dict[str, list[Any]]]] = []
    checks: list[dict[str, Any]] = []
    for eps in config.eps_values():
        kwargs = attack_kwargs(config, eps, probe=probe)
        try:
            result = attack_fn(model, images, labels, target=target, seeds=seeds, **kwargs)
        except UserError:
            raise
        except ValueError as e:
            if _raised_in_model(e, model):
                raise  # the model's own error, not a bad setting
            # Bad hyperparameters surface here (the attacks validate them); the chained
            # exception keeps the traceback for library users.
            raise UserError(f"attack {config.attack!r} rejected its settings: {e}") from e
        calls += int(result.model_calls) + 1
        costs += [attack_cost(result), {"forward": 1, "forward_images": n}]
        q = config.threat(eps).quantize(result.x_adv, images)
        x_q = q.to(images.dtype) / 255
        with torch.no_grad():
            adv_logits = model(x_q).float()
        adv_pred, adv_conf, _ = _predict(adv_logits)
        success = adv_pred == target if target is not None else adv_pred != labels
        if target is not None:  # no hit claimed on a sample whose clean logits were broken
            success = success & clean_finite
        delta = (q.double() - torch.round(images.double() * 255)).flatten(1) / 255
        size = delta.abs()
        saved.append(q)
        checks.append({"eps": eps, **dict(getattr(result, "checks", None) or {})})
        per_eps.append(
            (
                eps,
                {
                    "adv_pred": adv_pred.tolist(),
                    "success": success.tolist(),
                    "attack_success": result.success.tolist(),
                    "linf": size.amax(dim=1).tolist() if n else [],
                    "l2": delta.norm(dim=1).tolist(),
                    "l1": size.sum(dim=1).tolist(),
                    "adv_conf": adv_conf.tolist(),
                    "broken_by": broken_by_names(result),
                },
            )
        )
    label_list = labels.tolist()
    clean_list = clean_pred.tolist()
    conf_list = clean_conf.tolist()
    target_list = target.tolist() if target is not None else [None] * n
    rows: list[dict[str, Any]] = []
    for i in range(n):
        for eps, cols in per_eps:
            rows.append(
                {
                    "path": paths[i],
                    "label": label_list[i],
                    "clean_pred": clean_list[i],
                    "adv_pred": cols["adv_pred"][i],
                    "success": bool(cols["success"][i]),
                    "linf": float(cols["linf"][i]),
                    "l2": float(cols["l2"][i]),
                    "l1": float(cols["l1"][i]),
                    "index": int(indices[i]),
                    "eps": eps,
                    "target": target_list[i],
                    "clean_conf": float(conf_list[i]),
                    "adv_conf": float(cols["adv_conf"][i]),
                    "attack_success": bool(cols["attack_success"][i]),
                    "adv_path": adv_paths[paths[i]] if adv_paths else "",
                    "broken_by": cols["broken_by"][i],
                    "adv_sha256": "",  # OutputDir.save_images fills it in
                }
            )
    return BatchOutput(
        rows=rows, images=saved, model_calls=calls, checks=checks, cost=merge_cost(*costs)
    )
