"""Class swapping: every module class advtune puts in place of a native one, in one registry.

advtune converts a model by changing the class of its modules (``module.__class__ =
...``), never by assigning ``module.forward``: identity, parameters, buffers, hooks and
``state_dict`` keys all stay. Three kinds of class are swapped in:

* **replacements** defined in the source, one per native ``torch.nn`` class
  (:mod:`advtune.lean`'s ``LeanConv2d`` for ``nn.Conv2d``, ...): :func:`replacement`;
* **mixed classes** made at run time from a mix-in and the module's own class
  (:mod:`advtune.convbn`'s tune/fold mix-ins, :mod:`advtune.frozen`'s generated-forward
  and recomputation mix-ins), once per pair: :func:`mixed_class`. A mixed class can be
  the base of another (a recomputed block with a generated forward);
* **stand-ins** that take a module's place outright (``DeployedBatchNorm``):
  :func:`register`.

Every such class is registered here with its *kind* (``"lean-conv"``, ``"tune-bn"``,
...), so modules recognise advtune's classes with :func:`kind` / :func:`is_advtune` and
find the class a module had before with :func:`native_class`.

Pickling (and ``deepcopy``): replacements and stand-ins are module-level classes and
pickle by name. A mixed class is made at run time, so its instances pickle as
``(_restore, (mix-ins, native class), state)`` through :class:`Mixin`'s
``__reduce_ex__``: loading rebuilds the class (or finds it made already) from importable
parts. A mix-in may override ``_advtune_state`` to leave generated code out of the state
and ``__setstate__`` to rebuild it.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from torch import nn

__all__ = [
    "Mixin",
    "is_advtune",
    "kind",
    "mixed_class",
    "native_class",
    "register",
    "register_replacement",
    "replacement",
    "replacements",
]

C = TypeVar("C", bound=type)

#: Every class advtune swaps in -> its kind.
_KINDS: dict[type, str] = {}
#: Class swapped in -> the native class it stands for.
_NATIVE: dict[type, type] = {}
#: Native class -> its source-defined replacement (the lean layers).
_REPLACEMENTS: dict[type, type] = {}
#: (mix-ins, outermost first; native class) -> mixed class.
_MIXED: dict[tuple[tuple[type, ...], type], type] = {}
#: Mixed class -> (mix-ins, native class), for pickling.
_ORIGIN: dict[type, tuple[tuple[type, ...], type]] = {}


def register(cls: C, kind: str, *, native: type | None = None) -> C:
    """Register a source-defined class advtune swaps in (``native``: the class it stands
    for; default: itself). Registering a class twice raises."""
    if cls in _KINDS:
        raise ValueError(f"{cls.__qualname__} is registered already (kind {_KINDS[cls]!r})")
    _KINDS[cls] = kind
    _NATIVE[cls] = native if native is not None else cls
    return cls


def register_replacement(native: type[nn.Module], cls: type[nn.Module], kind: str) -> None:
    """Register ``cls`` (a subclass of ``native``) as the replacement of exactly ``native``."""
    if not issubclass(cls, native):
        raise ValueError(f"{cls.__name__} must subclass {native.__name__}")
    if native in _REPLACEMENTS:
        raise ValueError(f"{native.__name__} has a replacement already: {_REPLACEMENTS[native]}")
    register(cls, kind, native=native)
    _REPLACEMENTS[native] = cls


def replacement(module: nn.Module) -> type[nn.Module] | None:
    """The replacement registered for ``type(module)`` exactly (subclasses may override
    ``forward``, so they get none), else ``None``."""
    return _REPLACEMENTS.get(type(module))


def replacements() -> dict[type[nn.Module], type[nn.Module]]:
    """A copy of the native class -> replacement table."""
    return dict(_REPLACEMENTS)


def kind(module: object) -> str | None:
    """The kind of advtune class ``module`` is (``"lean-conv"``, ``"recompute"``, ...), or
    ``None`` for any other module."""
    cls = module if isinstance(module, type) else type(module)
    return _KINDS.get(cls)


def is_advtune(module: nn.Module) -> bool:
    """Whether ``module``'s class is one advtune swapped in."""
    return type(module) in _KINDS


def native_class(module: object) -> type:
    """The class ``module`` had before advtune swapped its class (else its own class)."""
    cls = module if isinstance(module, type) else type(module)
    return _NATIVE.get(cls, cls)


class Mixin:
    """Base of the mix-ins of :func:`mixed_class`: a ``kind`` and the pickle protocol."""

    _advtune_kind: ClassVar[str]
    #: Prefix of the mixed class's ``__name__`` (``"Tune"``: ``TuneConv2d``); empty keeps
    #: the base's name, so ``repr(model)`` is unchanged.
    _advtune_prefix: ClassVar[str] = ""

    def _advtune_state(self) -> dict[str, Any]:
        """The state to pickle (default: the whole ``__dict__``)."""
        return self.__dict__

    def __reduce_ex__(self, protocol: Any) -> Any:
        mixins, native = _ORIGIN[type(self)]
        return (_restore, (mixins, native), self._advtune_state())


def mixed_class(mixin: type[Mixin], base: type) -> type:
    """``class (mixin, base)``, made once per pair and registered with the mix-in's kind.

    Its ``__name__`` is the mix-in's ``_advtune_prefix`` plus the base's, its
    ``__qualname__`` ``base<kind>``.

    Args:
        mixin: A :class:`Mixin` subclass with a ``_advtune_kind``.
        base: The module's current class: native, or a mixed class itself (then the mix-ins
            stack and :func:`native_class` still gives the original).
    """
    if not (isinstance(mixin, type) and issubclass(mixin, Mixin)):
        raise TypeError(f"mixin must be a Mixin subclass, got {mixin!r}")
    mixins, native = _ORIGIN.get(base, ((), base))
    return _mixed((mixin, *mixins), native)


def _mixed(mixins: tuple[type, ...], native: type) -> type:
    key = (mixins, native)
    cls = _MIXED.get(key)
    if cls is not None:
        return cls
    base = native if len(mixins) == 1 else _mixed(mixins[1:], native)
    mixin = mixins[0]
    tag = mixin._advtune_kind  # type: ignore[attr-defined]
    cls = type(
        mixin._advtune_prefix + base.__name__,  # type: ignore[attr-defined]
        (mixin, base),
        {
            "__module__": native.__module__,
            "__qualname__": f"{base.__qualname__}<{tag}>",
            "__doc__": base.__doc__,
        },
    )
    _MIXED[key] = cls
    _ORIGIN[cls] = key
    _KINDS[cls] = tag
    _NATIVE[cls] = native
    return cls


def _restore(mixins: tuple[type, ...], native: type) -> Any:
    """Unpickling: an empty instance of the mixed class (pickle then sets its state)."""
    return object.__new__(_mixed(tuple(mixins), native))
