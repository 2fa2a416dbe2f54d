"""What a kernel-ready tensor was derived from, kept with the tensor and copied with its model.

prepare builds kernel-ready weights (quantized, laid out) from a module's expert weights. Each
prepared layer gets one `Provenance`: the module that owns the sources (a weak link), the source
tensors by attribute name, and a stamp of each taken when the copy was built (version counter,
dtype, device, shape, storage). The fused op asks `check_fresh(w1)` before computing; the graph
pass asks `of(tensor)` which layer a graph input belongs to.

A provenance is model state, not a table of addresses: it lives on the layer's record (and so
in the model), and `copy.deepcopy`, pickling and `torch.save` carry it over with the model. A copy
gets a provenance of its own, linked to the copy's tensors and stamped afresh (a copy made of a
stale layer stays stale). The lookup `of(tensor)` is a weak index that the provenance fills for
the tensors it names, on creation and on every copy or load; nothing else writes it.

Limits (README, "What you may change after prepare"): writes through `.data` or `.numpy()` bypass
the version counter; inference tensors have none (they cannot change outside inference mode, so
they are compared by identity, dtype, device, shape and storage only).
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary


class WeakLink:
    """A weak reference that follows its object through `copy.deepcopy` and pickling.

    A plain `weakref.ref` deep-copies as itself (the copy would point at the original) and cannot
    be pickled. A deep copy of this link points at the copy of its target when the target is
    copied in the same `deepcopy` call (as a module's parent is, when the whole model is copied),
    else at nothing; a pickled link pickles its target (once, by pickle's memo) and is weak again
    once loaded."""

    __slots__ = ("_ref",)

    def __init__(self, target: object = None):
        self._ref = None if target is None else weakref.ref(target)

    def __call__(self):
        return None if self._ref is None else self._ref()

    def __deepcopy__(self, memo):
        target = self()
        return WeakLink(None if target is None else memo.get(id(target)))

    def __reduce__(self):
        return WeakLink, (self(),)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # a DTensor's local shard
    return to_local() if callable(to_local) else t


def stamp(t: torch.Tensor | None) -> tuple:
    """(version, dtype, device, shape, storage) of a source tensor as it is now. Inference tensors
    carry no version counter: None there (they change in place only inside inference mode)."""
    if t is None:
        return (None,)
    local = _local(t)
    version = None if local.is_inference() else local._version
    return (version, local.dtype, local.device, tuple(local.shape), local.untyped_storage()._cdata)


class Provenance:
    """Where one layer's kernel-ready weights came from.

    `owner` is the module holding the sources (`sources`: attribute names); `layer` names the layer
    in messages; `derived` says whether the kernel reads a copy (which can go stale) or the sources
    themselves (recipe "none": never stale). `stale_hint` is appended to a staleness message (what
    to do about it)."""

    def __init__(self, owner: torch.nn.Module | None, layer: str, sources: Sequence[str], *, derived: bool,
                 stale_hint: str = "", _copied_stale: str = ""):
        self.owner = WeakLink(owner)
        self.layer = layer
        self.derived = derived
        self.stale_hint = stale_hint
        self._copied_stale = _copied_stale  # stale when copied: the copy's sources are not what it was built from
        held = [(name, getattr(owner, name, None)) for name in sources] if owner is not None else []
        self._sources = tuple((name, WeakLink(t), stamp(t)) for name, t in held if t is not None)
        self._named = WeakIdKeyDictionary()  # tensors this provenance answers for (kept for copies), weakly

    # -- the tensors it answers for --------------------------------------------------------------

    def name(self, *tensors: torch.Tensor | None) -> Provenance:
        """Make `of(t)` find this provenance for each of `tensors` (a layer's kernel-ready weights and
        its own expert weights); returns self."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._named[t] = True
                _INDEX[t] = self
        return self

    def named_tensors(self) -> list[torch.Tensor]:
        return list(self._named.keys())

    # -- freshness ----------------------------------------------------------------------------------

    def stale_reason(self) -> str:
        """Why the kernel-ready copy no longer matches its sources ("" when it does, or when the
        kernel reads the sources themselves)."""
        if not self.derived:
            return ""
        if self._copied_stale:
            return self._copied_stale
        owner = self.owner()
        if owner is None:
            return ""
        for name, link, recorded in self._sources:
            current = getattr(owner, name, None)
            if current is None or current is not link():
                return self._message(f"{name} was replaced")
            now = stamp(current)
            if now != recorded:
                what = ("changed in place" if now[0] != recorded[0] else
                        "cast" if now[1] != recorded[1] else "moved" if now[2] != recorded[2] else "replaced")
                return self._message(f"{name} was {what}")
        return ""

    def _message(self, what: str) -> str:
        return (f"{self.layer}: its expert weights changed after prepare ({what}), so its kernel-ready copy is "
                f"stale{'; ' + self.stale_hint if self.stale_hint else ''}")

    # -- copies -------------------------------------------------------------------------------------

    def __deepcopy__(self, memo):
        owner = self.owner()
        new_owner = None if owner is None else memo.get(id(owner))
        reason = self.stale_reason()
        new = Provenance(None, self.layer, (), derived=self.derived, stale_hint=self.stale_hint,
                         _copied_stale=reason)
        memo[id(self)] = new
        new.owner = WeakLink(new_owner)
        if new_owner is not None and not reason:
            # The copy's own sources (copied now if the model's copy has not reached them yet; the
            # memo makes the model's copy use the same objects), stamped as they are in the copy.
            sources = []
            for name, link, _ in self._sources:
                t = link()
                if t is not None:
                    t = copy.deepcopy(t, memo)
                    sources.append((name, WeakLink(t), stamp(t)))
            new._sources = tuple(sources)
        if new_owner is not None:
            new.name(*(copy.deepcopy(t, memo) for t in self.named_tensors()))
        return new

    def __reduce__(self):
        owner = self.owner()
        sources = [(name, link()) for name, link, _ in self._sources]
        return _restore, (owner, self.layer, self.derived, self.stale_hint, self.stale_reason(), sources,
                          self.named_tensors())


def _restore(owner, layer, derived, stale_hint, copied_stale, sources, named):
    """A provenance loaded from a pickle: linked to the loaded tensors, stamped as loaded."""
    new = Provenance(None, layer, (), derived=derived, stale_hint=stale_hint, _copied_stale=copied_stale)
    new.owner = WeakLink(owner)
    new._sources = tuple((name, WeakLink(t), stamp(t)) for name, t in sources if t is not None)
    return new.name(*named)


# tensor -> the provenance that names it (weak keys: a freed tensor leaves no entry).
_INDEX: WeakIdKeyDictionary = WeakIdKeyDictionary()


def of(tensor: torch.Tensor) -> Provenance | None:
    """The provenance that names `tensor`, if any."""
    try:
        return _INDEX.get(tensor)
    except TypeError:  # not weak-referenceable (e.g. a FakeTensor under some modes)
        return None


def check_fresh(w1: torch.Tensor) -> None:
    """Refuse to compute with a kernel-ready copy whose sources changed since it was built.

    Runs on every call of the fused op that runs Python (not in CUDA-graph replays): one weak-dict
    lookup and a few attribute reads."""
    p = of(w1)
    if p is not None:
        why = p.stale_reason()
        if why:
            raise RuntimeError(why)
