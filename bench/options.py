"""Options checked against their declared types: declare an option once, check it in one call.

An option's type hint is its specification. A method declares its options in its constructor's
signature, a config group can declare them as the fields of a dataclass, and ``validate`` checks a
plain mapping of values against either::

    k_ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.25   # a number in [0, 1)
    fm_time: Literal["uniform", "grid128", "logit_normal"] = "uniform"
    clip: Annotated[float, Range(0, lo_open=True)] | None = 4.0    # a number > 0 or null
    gen_steps: Literal[1, 2, 4, 8, 16, 32, 64, 128] = 8

Every refusal is the same one sentence -- the option's full name, the value given and what is
allowed, in words derived from the hint::

    method.k_ratio=1.5 is not allowed: a number in [0, 1)

Why hints and not hand-written checks: the signature is where a reader looks for an option, and
one checker gives every option the same strictness (a bool is not an int, a string is not a
number, NaN is not in any range) and the same message. Why not Hydra structured configs (a
dataclass per method registered as the group's schema): the options would be declared twice, in
the dataclass and in the constructor; OmegaConf checks types (choices only as Enums) but not
ranges, and its errors are multi-line ``ValidationError``s in its own words; and a schema changes
how the YAML composes. A dataclass can still be the spec of a plain config group (``validate``).

Understood: ``bool``, ``int``, ``float`` (an int is accepted and returned as a float; NaN and
infinities are refused), ``str``, ``Literal[...]``, ``X | None`` and other unions, ``tuple[X, Y]``
and ``tuple[X, ...]`` (from a list), ``Any``, and ``Annotated[X, Range(...), Rule(...)]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from bench.errors import UserError


@dataclass(frozen=True)
class Range:
    """Bounds of a number (either may be absent); closed unless ``lo_open`` / ``hi_open``."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def ok(self, v) -> bool:
        # Written so that NaN, which compares false with everything, is outside every range.
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return bool(above and below)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"in {left}{self.lo:g}, {self.hi:g}{right}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"


@dataclass(frozen=True)
class Rule:
    """Any other condition on a value, with what it allows in words (``"ordered lo <= hi"``)."""

    ok: Callable[[Any], bool]
    text: str

    def __str__(self) -> str:
        return self.text


#: Common shapes of options.
Probability = Annotated[float, Range(0, 1)]
Positive = Annotated[float, Range(0, lo_open=True)]
PositiveInt = Annotated[int, Range(1)]


class _Refused(Exception):
    """A value does not match a hint (turned into the one-sentence ``UserError`` by ``check``)."""


def describe(hint) -> str:
    """What a hint allows, in words: ``a number in [0, 1)``, ``one of ema, online``, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, *meta = args
        extra = [str(m) for m in meta if isinstance(m, Range | Rule)]
        return " ".join([describe(base), *extra])
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (Union, types.UnionType):
        words = [describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list whose items are each {describe(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} items, each {describe(args[0])}"
        return f"a list of {len(args)} items: " + ", ".join(describe(a) for a in args)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint is Any:
        return "anything"
    if hint in names:
        return names[hint]
    return f"a {getattr(hint, '__name__', hint)}"


def _convert(v, hint):
    """``v`` as the hint's type (ints as floats, lists as tuples), or ``_Refused``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return v
    if origin is Annotated:
        base, *meta = args
        v = _convert(v, base)
        if not all(m.ok(v) for m in meta if isinstance(m, Range | Rule)):
            raise _Refused
        return v
    if origin is Literal:
        for choice in args:  # the type too: True is not 1, 1 is not "1"
            if type(v) is type(choice) and v == choice:
                return choice
        raise _Refused
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                try:
                    return _convert(v, a)
                except _Refused:
                    pass
        raise _Refused
    if origin is tuple:
        if isinstance(v, str | bytes) or not isinstance(v, Sequence):
            raise _Refused
        items = list(v)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(i, args[0]) for i in items)
        if len(items) != len(args):
            raise _Refused
        return tuple(_convert(i, a) for i, a in zip(items, args, strict=True))
    if hint is bool:
        ok = isinstance(v, bool)
    elif hint is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif hint is float:
        ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        v = float(v) if ok else v
    elif hint is type(None):
        ok = v is None
    elif isinstance(hint, type):
        ok = isinstance(v, hint)
    else:
        raise TypeError(f"bench.options cannot check values against {hint!r}")
    if not ok:
        raise _Refused
    return v


def check(name: str, value, hint):
    """``value`` checked against ``hint`` and normalised; otherwise one sentence naming it."""
    try:
        return _convert(value, hint)
    except _Refused:
        raise UserError(f"{name}={value!r} is not allowed: {describe(hint)}") from None


def hints(spec) -> dict[str, Any]:
    """The declared type of each option of ``spec``: a dataclass's fields, or the parameters of a
    callable (a class: of its ``__init__``; ``self``, ``*args`` and ``**kwargs`` are not options).
    An option without a hint is a programming error, not bad input."""
    if dataclasses.is_dataclass(spec):
        target, names = spec, [f.name for f in dataclasses.fields(spec)]
    else:
        target = spec.__init__ if isinstance(spec, type) else spec
        names = [
            p.name
            for p in inspect.signature(target).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
    declared = typing.get_type_hints(target, include_extras=True)
    missing = [n for n in names if n not in declared]
    if missing:
        raise TypeError(f"{getattr(target, '__qualname__', target)}: no type hint for {missing}")
    return {n: declared[n] for n in names}


def validate(spec, values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every entry of ``values`` checked against ``spec``'s declared options (``hints``) and
    normalised; an unknown key is refused too. ``prefix`` names the group (``method``,
    ``train``): messages say ``method.k_ratio=...``."""
    declared = hints(spec)
    out = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if key not in declared:
            raise UserError(
                f"{name}={value!r} is not allowed: not an option; "
                f"the options are {', '.join(declared)}"
            )
        out[key] = check(name, value, declared[key])
    return out
