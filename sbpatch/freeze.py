"""The freeze ledger: set ``requires_grad=False`` on parameters for the duration of a call, and restore exactly.

This module knows nothing about attack libraries. It imports torch lazily, so ``import sbpatch`` stays cheap.

Rules (docs/architecture.md, docs/kernels.md):

* the parameters of a module are a cached :class:`Group` (weak references only: a cache never keeps a model
  alive); a call whose group is already held (nested attacks) only adds its holder;
* while one group is held alone (the hot path: one attack at a time) its parameters are flipped without any ledger
  writes; a second group arriving moves them into a ledger keyed by parameter identity, where each parameter
  records the set of groups that hold it; the last one to leave restores ``requires_grad=True``;
* a parameter that does not require grad when a holder arrives (frozen by the user) is never touched;
* every step is written so that an asynchronous exception (KeyboardInterrupt from a signal handler) landing at any
  bytecode leaves a state that a second :func:`release` finishes: registrations are sets (idempotent), and a
  restoration is marked done only after it happened;
* kernel-preserving rules (what stays live and why: :mod:`sbpatch.rules`) keep the live model's kernels: products
  are decided at their operands by :mod:`sbpatch.operands` (a torch function mode pushed for the call, which runs
  an op on a live alias of a frozen weight where the flag decides the kernel); this module builds the static keeps
  into each group, installs the forward pre-hook probes for what the mode cannot see (RNN input projections inside
  ``_VF`` calls, CUDA batch norm), which make a weight live again for the rest of the call, and the hooks that set
  the mode aside while a fast-path module runs. Kept parameters' ``.grad`` is set aside for the call and put back.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import logging
import operator
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import repeat
from typing import Any

from sbpatch import rules
from sbpatch.rules import (  # noqa: F401 - the keep-rule API, also reachable here (sbpatch.freeze.add_keep_rule)
    add_keep_rule,
    builtin_rules,
    keep_rules,
    remove_keep_rule,
)

log = logging.getLogger("sbpatch")

_lock = threading.Lock()
# id(param) -> [param, set of holding Groups]: parameters sbpatch set to False while several groups are active.
_ledger: dict[int, list[Any]] = {}
# id(param) -> [param, set of guarding Groups, saved .grad]: live (kept) parameters whose .grad is set aside.
_guards: dict[int, list[Any]] = {}
# id(param) -> [param, saved .grad]: frozen parameters a run-time rule made live again during the call.
_promoted: dict[int, list[Any]] = {}
_active: set[Group] = set()  # groups with at least one holder
# id(param) -> the last value the user (or the library) wrote to requires_grad of a parameter sbpatch held frozen:
# a parameter set to False inside the call stays False afterwards.
_writes: dict[int, bool] = {}
# The only active group, while it is alone: its parameters are not written to the ledger.
_exclusive: Group | None = None

# id(param) -> (weak reference, reason): parameters a run-time rule found must stay live. Weak: never keeps a model
# alive (a WeakKeyDictionary cannot hold tensors: its lookups compare keys with ==).
_learned: dict[int, tuple[Any, str]] = {}
# What was kept live and why, for status() and verify: "Model.sub.weight" -> reason (most recent last, bounded).
_kept_log: OrderedDict[str, str] = OrderedDict()
_KEPT_LOG_MAX = 1000

# Per root module: (generation, its Group). The generation moves whenever any module anywhere registers a
# parameter or a submodule (torch's global registration hooks), a keep rule changes, or a rule learns a weight.
_generation = 0
_param_cache: weakref.WeakKeyDictionary[Any, tuple[int, Group]] = weakref.WeakKeyDictionary()
_hooks_installed = False
_freeze_failed = False  # warned once
_torch: Any = None


def _bump(*_: Any) -> None:
    global _generation
    _generation += 1


def _ensure_torch() -> Any:
    global _torch, _hooks_installed
    if _torch is None:
        import torch
        import torch.nn.modules.module as tmm

        if not _hooks_installed:
            for name in ("register_module_parameter_registration_hook", "register_module_module_registration_hook"):
                register = getattr(tmm, name, None)
                if register is not None:
                    register(_bump)
            _hooks_installed = hasattr(tmm, "register_module_parameter_registration_hook")
        _torch = torch
    return _torch


def kept_live() -> dict[str, str]:
    """Parameters sbpatch kept live so far in this process (``"Model.path.weight"`` -> why), most recent last."""
    with _lock:
        return dict(_kept_log)


def kept_in(module: Any) -> dict[str, str]:
    """The parameters of ``module`` that sbpatch keeps live when it freezes it now (``"path.weight"`` -> why):
    static rules, and run-time rules learned so far."""
    group = _module_group(module)
    kept = {id(p) for p in map(_deref, group.kept) if p is not None}
    root = type(module).__name__
    with _lock:
        aliased = {key for key, (ref, _) in _aliased.items() if ref() is not None}
        return {
            name: _kept_log.get(f"{root}.{name}", "kept live")
            for name, p in module.named_parameters()
            if id(p) in kept or id(p) in aliased
        }


def _note_kept(name: str, reason: str) -> None:
    _kept_log.pop(name, None)
    _kept_log[name] = reason
    while len(_kept_log) > _KEPT_LOG_MAX:
        _kept_log.popitem(last=False)


# --- groups --------------------------------------------------------------------------------------------------


class Holder:
    """One acquisition (one frozen call): the groups it holds. ``done`` once fully released."""

    __slots__ = ("__weakref__", "done", "groups", "owner")

    def __init__(self, owner: Any = None) -> None:
        self.groups: list[Group] = []
        self.done = False
        # the frozen() object that must release it (weak): once it is gone, nobody can
        self.owner = None if owner is None else weakref.ref(owner)


class Group:
    """Parameters frozen together (one module's, cached), by weak reference, and their current holders."""

    __slots__ = (
        "__weakref__", "by_hash", "cuda_probes", "holders", "hooked", "key", "kept", "mids", "live", "mods", "owned",
        "parts", "plain", "probes", "quiet", "refs", "roots", "variants",
    )

    def __init__(self, params: Iterable[Any], kept: Iterable[Any] = ()) -> None:
        self.refs = tuple(map(weakref.ref, params))  # to freeze
        self.kept = tuple(map(weakref.ref, kept))  # kept live by the rules: .grad set aside
        self.probes: tuple[tuple[Any, _Probe], ...] = ()  # (weakref to submodule, its pre-hook)
        # probes that matter only on CUDA (batch norm), installed only when the first one's module is on CUDA
        self.cuda_probes: tuple[tuple[Any, _Probe], ...] = ()
        # modules whose fused fast path is chosen only when no torch function mode is active (operands.py): the mode
        # is set aside while they run
        self.quiet: tuple[Any, ...] = ()  # weak references to those modules
        # the modules the group was built from (weakly): while a call running the mode holds the group, a forward of
        # one of them in another thread pushes a mode there for that forward (operands.guest_begin)
        self.roots: tuple[Any, ...] = ()
        self.holders: set[Holder] = set()
        self.owned: list[Any] = []  # parameters this group set to False while exclusive
        self.key = ("sbpatch", id(self))
        # what the module tree looked like when the group was built (see _unchanged)
        self.mods: tuple[Any, ...] = ()  # weak references to the modules of the tree
        self.mids: Any = None  # _tree_key of mods; None: no fingerprint (TorchScript)
        self.by_hash = False  # every child hashes by identity: mids is the hash of the children
        self.hooked = False  # the fast-path and guest hooks may be on (set before installing them)
        # call signatures (operands.signature) under which a call holding this group needed no operand rule
        self.plain: set[Any] = set()
        # the cached module groups a composite group (keep, parameters) was built from: they hold what it learns
        self.parts: tuple[Group, ...] = ()
        # call signature -> ids of the parameters whose products needed a rule in a call with it, when that call's
        # backward never accumulated into an alias: later calls keep them live instead of running the mode
        self.live: dict[Any, frozenset[int]] = {}
        self.variants: dict[frozenset[int], Group] = {}  # those ids -> this group with them kept live


class _Probe:
    """Forward pre-hook installed during a frozen call, for the kernel decisions made inside fused C++ calls that the
    operand mode (operands.py) cannot see: makes weights live when the input would change the kernel.

    ``kind``: "rnn" (the time-major input of the first layer's input projection, inside ``_VF.gru``/``lstm``) or
    "bn" (batch norm on CUDA: one affine parameter). ``paths``: the names of the weights to make live.
    """

    __slots__ = ("group", "has_bias", "kind", "name", "paths")

    def __init__(self, group: Group, name: str, paths: tuple[str, ...], has_bias: bool, kind: str) -> None:
        self.group = weakref.ref(group)
        self.name = name
        self.paths = paths
        self.has_bias = has_bias
        self.kind = kind

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> None:
        group = self.group()
        if group is None or not group.holders or _torch is None:  # a stale copy (deepcopy during an attack)
            return None
        tensor = _torch.Tensor
        kind = self.kind
        if kind == "bn":
            x = args[0] if args else kwargs.get("input")
            if (isinstance(x, tensor) and x.is_cuda and x.requires_grad and not module.training
                    and module.running_mean is not None):
                for path in self.paths:  # ("bias", "weight"): one live affine parameter keeps the fused kernel
                    p = getattr(module, path, None)
                    if p is None:
                        continue
                    if p.requires_grad:
                        break
                    if p.is_leaf and _frozen_by_sbpatch(p):
                        _for_dynamo(_promote)(p, f"{self.name}.{path}", rules.BN_REASON)
                        break
            return None
        x = args[0] if args else kwargs.get("input")  # "rnn": the first layer's input projection
        if not isinstance(x, tensor) or x.dim() != 3 or rules.rnn_fused(module, x):
            return None
        if module.batch_first:
            x = x.transpose(0, 1)
        if not rules.foldable(x, self.has_bias):
            reason = rules.RNN_REASON.format(dim=x.dim(), shape=tuple(x.shape), strides=tuple(x.stride()))
            for path in self.paths:
                p = getattr(module, path, None)
                if p is not None and p.is_leaf and not p.requires_grad:
                    _for_dynamo(_promote)(p, f"{self.name}.{path}", reason)
        return None

    # A model deep-copied or pickled during an attack must not carry sbpatch's state along.
    def __deepcopy__(self, memo: dict) -> _Probe:
        return self

    def __copy__(self) -> _Probe:
        return self

    def __reduce__(self) -> Any:
        return (_inert_probe, ())


class _Quiet:
    """Forward pre-hook and always-called forward hook (``kind``) that set sbpatch's torch function mode aside while
    a module runs whose fast path (``torch._native_multi_head_attention``, the fused encoder layer) is refused when
    any mode is active. Their in-projections are kept live statically, so the mode has nothing to do inside. Kinds
    ``guest_pre``/``guest_post``: on a group's root modules, push a mode for a forward run in another thread than
    the frozen call's (:func:`sbpatch.operands.guest_begin`)."""

    __slots__ = ("kind",)

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, module: Any, *_: Any) -> None:
        from sbpatch import operands

        getattr(operands, _QUIET_CALLS[self.kind])(module)
        return None

    def __deepcopy__(self, memo: dict) -> _Quiet:
        return self

    def __copy__(self) -> _Quiet:
        return self

    def __reduce__(self) -> Any:
        return (_inert_probe, ())


_QUIET_CALLS = {"pre": "quiet_begin", "post": "quiet_end", "guest_pre": "guest_begin", "guest_post": "guest_end"}
_QUIET_PRE = _Quiet("pre")
_QUIET_POST = _Quiet("post")
_GUEST_PRE = _Quiet("guest_pre")
_GUEST_POST = _Quiet("guest_post")
_dynamo_safe: dict[Callable[..., Any], Callable[..., Any]] = {}


def _for_dynamo(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, or once dynamo is loaded (a compiled model exists) a version dynamo runs eagerly instead of tracing:
    sbpatch's bookkeeping (a lock, flag writes) inside a compiled region would otherwise fail to compile."""
    if "torch._dynamo" not in sys.modules:
        return fn
    safe = _dynamo_safe.get(fn)
    if safe is None:
        safe = _dynamo_safe[fn] = _torch.compiler.disable(fn, recursive=True)
    return safe


def _inert_probe() -> Callable[..., None]:
    return _noop


def _noop(*_: Any) -> None:
    return None


def _module_group(module: Any) -> Group:
    """The cached :class:`Group` of ``module``: its parameters, de-duplicated, split by the rules."""
    cached = _param_cache.get(module)
    if cached is not None and cached[0] == _generation and _hooks_installed:
        group = cached[1]
        if group.holders or _unchanged(group):  # held: a nested call inside one that checked it
            return group
    torch = _ensure_torch()
    mha = torch.nn.MultiheadAttention
    generation = _generation
    root = type(module).__name__
    seen: set[int] = set()
    frozen_: list[Any] = []
    kept_: list[Any] = []
    kept_why: list[tuple[str, str]] = []
    probes: list[tuple[Any, str, tuple[str, ...], bool, str]] = []
    cuda_probes: list[tuple[Any, str, tuple[str, ...], bool, str]] = []
    rnn = torch.nn.RNNBase
    batch_norm = torch.nn.modules.batchnorm._BatchNorm
    learned = _learned
    quiet, no_probe = rules.fast_path_scopes(module)
    scripted = rules.scripted_keeps(module)
    for mname, sub in module.named_modules():
        user = rules.kept_names(type(sub))
        static: tuple[str, ...] = ()
        prefix = f"{root}.{mname}." if mname else f"{root}."
        if isinstance(sub, mha):
            if sub.batch_first:
                static = tuple(n for n in rules.MHA_WEIGHTS if getattr(sub, n, None) is not None)
        elif id(sub) in no_probe:
            pass
        elif isinstance(sub, rnn):
            paths = tuple(n for n in ("weight_ih_l0", "weight_ih_l0_reverse") if n in sub._parameters)
            probes.append((sub, prefix[:-1], paths, bool(sub.bias), "rnn"))
        elif isinstance(sub, batch_norm) and sub.affine:
            cuda_probes.append((sub, prefix[:-1], ("bias", "weight"), True, "bn"))
        params = sub._parameters
        if user:
            for name in user - set(params):
                rules.warn_rule(type(sub), name, params.keys())
        for name, p in params.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            qualified = prefix + name
            if name in user:
                kept_.append(p)
                kept_why.append((qualified, "user keep rule (add_keep_rule)"))
            elif name in static:
                kept_.append(p)
                kept_why.append((qualified, rules.MHA_REASON))
            elif id(p) in scripted:
                kept_.append(p)
                kept_why.append((qualified, scripted[id(p)][1]))
            elif any(b in qualified for b in rules.BIAS_NAMES):
                kept_.append(p)
                kept_why.append((qualified, rules.BIAS_REASON))
            elif learned and (hit := learned.get(id(p))) is not None and hit[0]() is p:
                kept_.append(p)
                kept_why.append((qualified, hit[1]))
            else:
                frozen_.append(p)
    group = Group(frozen_, kept_)
    _fingerprint(group, module)
    group.probes = tuple((weakref.ref(sub), _Probe(group, *spec)) for sub, *spec in probes)
    group.quiet = tuple(map(weakref.ref, quiet))
    with contextlib.suppress(TypeError):
        group.roots = (weakref.ref(module),)
    group.cuda_probes = tuple((weakref.ref(sub), _Probe(group, *spec)) for sub, *spec in cuda_probes)
    for name, reason in kept_why:
        _note_kept(name, reason)
    try:
        _param_cache[module] = (generation, group)
    except TypeError:  # not weak-referenceable
        pass
    return group


_MODULES = operator.attrgetter("_modules")
_PARAMETERS = operator.attrgetter("_parameters")
_referents = gc.get_referents


def _slots(mods: tuple[Any, ...]) -> tuple[list[Any], list[int]] | None:
    """Which module fills each ``_modules`` slot and which parameter each ``_parameters`` slot of the modules in
    ``mods``, in slot order, or None when one of them is gone. ``gc.get_referents`` of the dicts lists their values
    (and any non-string keys) in one C call, about half the cost of a ``dict.values`` per module."""
    modules = tuple(map(operator.call, mods))
    if None in modules:
        return None
    try:
        return _referents(*map(_MODULES, modules)), list(map(id, _referents(*map(_PARAMETERS, modules))))
    except AttributeError:  # a module lost its slots (a half-built or torn-down object)
        return None


def _tree_key(mods: tuple[Any, ...], by_hash: bool) -> Any:
    """A value that changes whenever a slot of the tree gets another module or parameter (see :func:`_slots_key`)."""
    slots = _slots(mods)
    return None if slots is None else _slots_key(slots, by_hash)


def _slots_key(slots: tuple[list[Any], list[int]], by_hash: bool) -> Any:
    """For the children, the hash of their tuple when every child hashes by identity (``object.__hash__``, C-level,
    about half the cost of listing their ids), else the list of their ids; for the parameters, the list of their ids
    (a tensor's ``__hash__`` is a Python function)."""
    children, params = slots
    if not by_hash:
        return list(map(id, children)), params
    try:
        return hash(tuple(children)), params
    except TypeError:  # a slot now holds an unhashable object (torch itself cannot list such a tree): changed
        return None


def _identity_hashed(module: Any) -> bool:
    return module is None or type(module).__hash__ is object.__hash__


def _fingerprint(group: Group, module: Any) -> None:
    """Remember the module tree: for every module (weakly), which module fills each ``_modules`` slot and which
    parameter each ``_parameters`` slot. Torch's registration hooks bump the generation on
    ``register_parameter``/``add_module``/attribute writes; this catches the writes that bypass them:
    ``Sequential.insert``, ``ModuleList.insert``, ``_modules[k] = m`` (a new layer, or one wrapping the old),
    ``_parameters[k] = p``, ``del``, on containers and leaf layers alike. One pass over the tree in C (about 38 us
    on a ResNet50, docs/architecture.md). A slot renamed with the same object in it is not seen: nothing frozen
    changes."""
    try:
        modules = tuple(module.modules())
        plain = all(type(m._modules) is dict and type(m._parameters) is dict for m in modules)
        group.mods = tuple(map(weakref.ref, modules)) if plain else ()
    except (TypeError, AttributeError):  # not weakly referenceable, or not a plain module: generation only
        group.mods = ()
    slots = _slots(group.mods) if group.mods else None  # TorchScript: generation only
    group.by_hash = slots is not None and all(map(_identity_hashed, slots[0]))
    group.mids = None if slots is None else _slots_key(slots, group.by_hash)


def _unchanged(group: Group) -> bool:
    """Whether the module tree is as it was when ``group`` was built."""
    return group.mids is None or _tree_key(group.mods, group.by_hash) == group.mids


# --- validating what users pass ------------------------------------------------------------------------------

_ACCEPTED = "nn.Module objects, parameters (leaf tensors), or iterables of them (e.g. model.parameters())"


def targets_of(items: Iterable[Any], what: str = "frozen()") -> list[Any]:
    """Flatten and check what to freeze: modules and leaf tensors, materialised once. Raises TypeError/ValueError."""
    torch = _ensure_torch()
    out: list[Any] = []

    def add(t: Any, depth: int) -> None:
        if isinstance(t, torch.nn.Module):
            out.append(t)
        elif isinstance(t, torch.Tensor):
            if not t.is_leaf:
                raise ValueError(f"{what}: got a non-leaf tensor (a computed value); pass the parameter itself")
            out.append(t)
        elif t is None or isinstance(t, (str, bytes, int, float, bool)):
            raise TypeError(f"{what}: cannot freeze {type(t).__name__} {t!r}; pass {_ACCEPTED}")
        elif isinstance(t, Mapping):
            values = [v for v in t.values() if isinstance(v, torch.nn.Parameter)]  # keep_vars=True: buffers too
            if not values and t:
                raise TypeError(
                    f"{what}: got a mapping with no parameters (a state_dict?): it holds detached copies, not the "
                    f"parameters; pass the module, module.parameters() or state_dict(keep_vars=True)"
                )
            out.extend(values)
        elif isinstance(t, tuple) and len(t) == 2 and isinstance(t[0], str):  # a named_parameters() pair
            add(t[1], depth)
        elif isinstance(t, Iterable) and depth < 3:
            for item in list(t):
                add(item, depth + 1)
        else:
            raise TypeError(f"{what}: cannot freeze {type(t).__name__}; pass {_ACCEPTED}")

    for item in items:
        add(item, 0)
    return out


def keep_of(keep: Any) -> tuple[Any, ...]:
    """Normalise ``keep=``: one name, parameter or module, or an iterable of them (materialised once)."""
    torch = _ensure_torch()
    if isinstance(keep, (str, torch.Tensor, torch.nn.Module)):
        return (keep,)
    if keep is None:
        return ()
    if not isinstance(keep, Iterable) or isinstance(keep, (bytes, Mapping)):
        raise TypeError(f"keep=: pass parameter or submodule names, parameters or modules, got {type(keep).__name__}")
    items = []
    for item in list(keep):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):  # named_parameters() pair
            item = item[1]
        if not isinstance(item, (str, torch.Tensor, torch.nn.Module)):
            raise TypeError(f"keep=: cannot keep {type(item).__name__} {item!r}; pass names, parameters or modules")
        items.append(item)
    return tuple(items)


def _resolve_keep(roots: list[Any], keep: Iterable[Any]) -> set[int]:
    torch = _ensure_torch()
    ids: set[int] = set()
    for item in keep:
        if isinstance(item, str):
            found = False
            for root in roots:
                if not isinstance(root, torch.nn.Module):
                    continue
                named = dict(root.named_parameters(remove_duplicate=False))
                if item in named:
                    ids.add(id(named[item]))
                    found = True
                    continue
                mods = dict(root.named_modules(remove_duplicate=False))
                if item in mods:
                    ids.update(id(p) for p in mods[item].parameters())
                    found = True
            if not found:
                raise ValueError(f"keep={item!r} names no parameter or submodule of the frozen modules")
        elif isinstance(item, torch.nn.Module):
            ids.update(id(p) for p in item.parameters())
        else:
            ids.add(id(item))
    return ids


def collect(targets: Iterable[Any], keep: Iterable[Any] = ()) -> list[Group]:
    """The groups of parameters that freezing ``targets`` concerns (before looking at their current flags).

    ``targets``: modules (DDP/FSDP wrappers included) and parameters (see :func:`targets_of`). ``keep``:
    parameters, modules, or names (relative to a target module) that stay live. Plain modules with no ``keep`` give
    their cached group; anything else gives one new group.
    """
    torch = _torch or _ensure_torch()
    module_type = torch.nn.Module
    if not keep and all(map(isinstance, targets, repeat(module_type))):
        return list(map(_module_group, targets))
    roots = targets_of(targets)
    params: list[Any] = []
    kept: list[Any] = []
    seen: set[int] = set()
    probes: list[tuple[Any, _Probe]] = []
    cuda_probes: list[tuple[Any, _Probe]] = []
    quiet: list[Any] = []
    roots_: list[Any] = []
    parts: list[Group] = []
    for r in roots:
        if isinstance(r, module_type):
            group = _module_group(r)
            parts.append(group)
            members = [p for p in map(_deref, group.refs) if p is not None]
            kept_members = [p for p in map(_deref, group.kept) if p is not None]
            probes.extend(group.probes)
            cuda_probes.extend(group.cuda_probes)
            quiet.extend(group.quiet)
            roots_.extend(group.roots)
        else:
            members, kept_members = [r], []
        for p in members:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        for p in kept_members:
            if id(p) not in seen:
                seen.add(id(p))
                kept.append(p)
    if keep:
        kept_ids = _resolve_keep(roots, keep)
        params = [p for p in params if id(p) not in kept_ids]
    group = Group(params, kept)
    group.probes = tuple((sub, _Probe(group, pr.name, pr.paths, pr.has_bias, pr.kind)) for sub, pr in probes)
    group.cuda_probes = tuple(
        (sub, _Probe(group, pr.name, pr.paths, pr.has_bias, pr.kind)) for sub, pr in cuda_probes
    )
    group.quiet = tuple(quiet)
    group.roots = tuple(roots_)
    group.parts = tuple(parts)
    return [group]


def _deref(ref: Any) -> Any:
    return ref()


# --- the user's own writes during a frozen call -------------------------------------------------------------------
# While sbpatch holds parameters, ``nn.Parameter.requires_grad`` (attribute) and ``requires_grad_`` (method) are
# shadowed by thin wrappers over torch's own, which note a write to a parameter sbpatch froze. Writes made by sbpatch
# itself (under its lock) are not noted. Installed after sbpatch's own flips and removed before its restores, so the
# hot path pays two class-attribute writes per call; only Parameter (not every tensor) is shadowed, so the attack's
# own tensors keep torch's attribute and their type caches.

_rg_descriptor: Any = None
_rg_method: Any = None
_rg_property: Any = None


def _note_write(p: Any, value: Any, before: bool) -> None:
    """Note what a write to a parameter sbpatch froze means: ``False`` written over sbpatch's ``False`` is a request
    to freeze it (it stays False afterwards); ``True`` written, or ``False`` written back over a ``True`` (a library
    saving and restoring the flag it found, as TextAttack's get_grad does), asks for nothing: restored as usual."""
    if _lock.locked():
        return
    with _lock:
        if not _frozen_by_sbpatch(p):
            return
        if not value and not before:
            _writes[id(p)] = False
        else:
            _writes.pop(id(p), None)


def _set_requires_grad(self: Any, value: Any) -> None:
    before = _rg_descriptor.__get__(self)
    _rg_descriptor.__set__(self, value)
    _note_write(self, value, before)


def _requires_grad_(self: Any, requires_grad: bool = True) -> Any:
    before = _rg_descriptor.__get__(self)
    out = _rg_method(self, requires_grad)
    _note_write(self, requires_grad, before)
    return out


_ours: list[Any] = []  # every property/method object sbpatch ever installed (plain and dynamo-safe variants)
_classes: list[Any] = []  # nn.Parameter.__dict__ and nn.Module.__dict__, once torch is loaded
_our_ids: set[int] = set()  # their ids (they are kept alive in _ours, so an id is never reused)


def _own(*objects: Any) -> None:
    _ours.extend(objects)
    _our_ids.update(map(id, objects))


def _watch(on: bool) -> None:
    """Install (or remove) the write watch. Idempotent and judged from the class itself, so an interruption half-way
    through leaves nothing that the next call does not finish; never replaces someone else's attribute."""
    global _rg_descriptor, _rg_method, _rg_property
    param = _torch.nn.Parameter
    if _rg_property is None:
        _classes.extend((param.__dict__, _torch.nn.Module.__dict__))  # live views of the two classes' attributes
        _rg_descriptor = _torch._C.TensorBase.__dict__["requires_grad"]
        _rg_method = _torch._C.TensorBase.requires_grad_
        functools.update_wrapper(_requires_grad_, _rg_method, assigned=("__doc__",))
        _rg_property = property(_rg_descriptor.__get__, _set_requires_grad, doc=_rg_descriptor.__doc__)
        _own(_rg_property, _requires_grad_)
    attrs = param.__dict__
    if on:
        if "torch._dynamo" in sys.modules:
            if _rg_property.fset is _set_requires_grad:
                _rg_property = property(_rg_descriptor.__get__, _for_dynamo(_set_requires_grad),
                                        doc=_rg_descriptor.__doc__)
                _own(_rg_property, _for_dynamo(_requires_grad_))
            method = _for_dynamo(_requires_grad_)
        else:
            method = _requires_grad_
        if "requires_grad" not in attrs:
            param.requires_grad = _rg_property
        if "requires_grad_" not in attrs:
            param.requires_grad_ = method
    else:
        if id(attrs.get("requires_grad")) in _our_ids:
            del param.requires_grad
        if id(attrs.get("requires_grad_")) in _our_ids:
            del param.requires_grad_


# --- copies made during a frozen call ------------------------------------------------------------------------------
# A model deep-copied, pickled or saved with torch.save while sbpatch holds it (a checkpoint callback inside an attack)
# must come out as it was before the call: parameters sbpatch froze with requires_grad=True, and no sbpatch probe
# hooks. From the first frozen call on, nn.Parameter's __deepcopy__/__reduce_ex__ and nn.Module's __getstate__ are
# thin wrappers over torch's own (see _copies), pass-throughs for a parameter sbpatch did not freeze and a module with
# no sbpatch hook: while nothing is held, every copy comes out exactly as torch makes it.

_copy_originals: dict[tuple[Any, str], Any] = {}


def _was_live(p: Any) -> bool:
    """Whether ``p`` is frozen now only because sbpatch froze it (its flag before the call was True)."""
    return not _rg_descriptor.__get__(p) and _frozen_by_sbpatch(p)


def _param_deepcopy(self: Any, memo: dict) -> Any:
    known = id(self) in memo
    result = _copy_originals[(_torch.nn.Parameter, "__deepcopy__")](self, memo)
    if not known and _was_live(self):
        _rg_descriptor.__set__(result, True)
    return result


def _param_reduce_ex(self: Any, proto: Any) -> Any:
    rebuild, args = _copy_originals[(_torch.nn.Parameter, "__reduce_ex__")](self, proto)[:2]
    if _was_live(self) and len(args) >= 2 and args[1] is False:
        args = (args[0], True, *args[2:])
    return rebuild, args


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_always_called")


def _module_getstate(self: Any) -> Any:
    state = _copy_originals[(_torch.nn.Module, "__getstate__")](self)
    for name in _HOOK_DICTS:
        hooks = state.get(name) if isinstance(state, dict) else None
        if hooks and any(isinstance(k, tuple) and k[:1] == ("sbpatch",) for k in hooks):
            state[name] = type(hooks)((k, v) for k, v in hooks.items() if not (isinstance(k, tuple) and k[:1] == (
                "sbpatch",)))
    return state


_COPY_WRAPPERS = (("Parameter", "__deepcopy__", _param_deepcopy), ("Parameter", "__reduce_ex__", _param_reduce_ex),
                  ("Module", "__getstate__", _module_getstate))


def _copies(on: bool, wrappers: tuple[tuple[str, str, Any], ...] = _COPY_WRAPPERS) -> None:
    """Install (``on``) or remove the copy ``wrappers``; judged from the classes, never replaces someone else's.

    Installed by the first frozen call and left in place until :func:`release_all`: writing a class attribute
    clears the attribute caches of the class and its subclasses (for nn.Module, every module class: 16% of a frozen
    call on a ResNet50), and installing and removing nn.Parameter's two on each call cost a tenth of a patched call.
    With nothing held each one returns exactly what torch's own returns."""
    nn = _torch.nn
    for owner_name, attr, wrapper in wrappers:
        owner = nn.Parameter if owner_name == "Parameter" else nn.Module
        current = owner.__dict__.get(attr)
        if current is None:  # torch no longer defines it here: nothing to wrap
            continue
        if current is not wrapper:
            if on:
                _copy_originals[(owner, attr)] = current
                setattr(owner, attr, wrapper)
        elif not on:
            setattr(owner, attr, _copy_originals[(owner, attr)])


def _copies_on() -> None:
    """Make copies taken during a call come out as the model was before it (see :func:`_copies`)."""
    param, module = _classes
    if param.get("__deepcopy__") is not _param_deepcopy or module.get("__getstate__") is not _module_getstate:
        _copies(True)


def _wanted_false(p: Any) -> bool:
    """Whether the user set ``p.requires_grad = False`` while sbpatch held it (then it stays False)."""
    return _writes.pop(id(p), None) is False


# --- acquire / release ---------------------------------------------------------------------------------------


def acquire(groups: Iterable[Group], holder: Holder, mode: bool = True) -> None:
    """Freeze ``groups`` for ``holder``. A group already held only records the new holder. ``mode``: the call runs
    the operand mode, so the modules whose fast path a mode would refuse get the hooks that set it aside.

    Written so that an exception landing at any point leaves what :func:`release` undoes: the holder is
    registered before anything is frozen, and only what was registered gets restored.
    """
    if _active:
        _reap()
    with _lock:
        for group in groups:
            if holder in group.holders:
                continue
            holder.groups.append(group)
            group.holders.add(holder)
            if len(group.holders) == 1:
                _freeze(group)
            if mode and (group.quiet or group.roots):
                _mode_hooks_on(group)


def _mode_hooks_on(group: Group) -> None:
    """Hook the fast-path modules of ``group`` and its roots (idempotent: a call running the mode may join a call
    that did not). A root's guest pre-hook runs first and its guest forward hook last, around any quiet hooks."""
    key = group.key
    group.hooked = True
    for ref in group.quiet:
        sub = ref()
        if sub is not None:
            sub._forward_pre_hooks[key] = _QUIET_PRE
            sub._forward_hooks[key] = _QUIET_POST
            sub._forward_hooks_always_called[key] = True
    guest = (*key, "thread")
    for ref in group.roots:
        root = ref()
        if root is not None and guest not in root._forward_pre_hooks:
            root._forward_pre_hooks[guest] = _for_dynamo(_GUEST_PRE)  # pushes a mode: never traced
            root._forward_pre_hooks.move_to_end(guest, last=False)
            root._forward_hooks[guest] = _for_dynamo(_GUEST_POST)
            root._forward_hooks_always_called[guest] = True


def _freeze(group: Group) -> None:
    global _exclusive
    if not _active:  # nothing else frozen: no ledger needed
        _active.add(group)
        _exclusive = group
        owned = [p for r in group.refs if (p := r()) is not None and p.requires_grad]
        group.owned = owned
        for p in owned:
            p.requires_grad = False
    else:
        if _exclusive is not None:
            _migrate(_exclusive)
            _exclusive = None
        _active.add(group)
        ledger = _ledger
        for r in group.refs:
            p = r()
            if p is None:
                continue
            key = id(p)
            entry = ledger.get(key)
            if entry is not None:
                if not entry[1]:  # an interrupted restoration left it: freeze again
                    p.requires_grad = False
                entry[1].add(group)
            elif p.requires_grad:
                ledger[key] = [p, {group}]
                p.requires_grad = False
    if group.kept:
        _guard(map(_deref, group.kept), group)
    key = group.key
    probes = group.probes
    if group.cuda_probes and _on_cuda(group.cuda_probes[0][0]()):
        probes = probes + group.cuda_probes
    for ref, probe in probes:
        sub = ref()
        if sub is not None:
            hooks = sub._forward_pre_hooks
            hooks[key] = probe
            if len(hooks) > 1:  # run before a legacy weight_norm hook recomputes the weight from its originals
                hooks.move_to_end(key, last=False)
            sub._forward_pre_hooks_with_kwargs[key] = True
    _watch(True)
    _copies_on()


def _guard(params: Iterable[Any], owner: Any) -> None:
    """Set aside the ``.grad`` of the live ``params`` for ``owner`` (under ``_lock``): the first owner of a parameter
    saves its ``.grad`` and clears it, later ones only join (see :func:`_unguard`). ``None`` entries are skipped."""
    for p in params:
        if p is None:
            continue
        key = id(p)
        entry = _guards.get(key)
        if entry is not None:
            if not entry[1]:  # an interrupted restoration left it: clear again
                p.grad = None
            entry[1].add(owner)
        elif p.requires_grad:
            _guards[key] = [p, {owner}, p.grad]
            p.grad = None


def _unguard(params: Iterable[Any], owner: Any) -> None:
    """``owner`` leaves the set-asides of ``params`` (under ``_lock``); the last one out puts the saved ``.grad``
    back, whatever order overlapping owners (threads) leave in."""
    for p in params:
        if p is None:
            continue
        entry = _guards.get(id(p))
        if entry is not None and (owner in entry[1] or not entry[1]):
            entry[1].discard(owner)
            if not entry[1]:
                p.grad = entry[2]
                del _guards[id(p)]


@contextlib.contextmanager
def grads_set_aside(params: Iterable[Any]) -> Iterator[None]:
    """The ``.grad`` of the live ``params`` set aside for the block and put back after it, for an adapter whose
    library needs some parameters live (their weight gradients accumulate): shares the kernel rules' own set-asides,
    so nested and overlapping blocks, in any thread, put back what was there before the first of them."""
    params = list(params)  # a parameter listed twice only joins its own entry again
    owner = object()
    try:  # an interruption inside _guard leaves only what _unguard undoes
        with _lock:
            _guard(params, owner)
        yield
    finally:
        with _lock:
            _unguard(params, owner)


def _on_cuda(module: Any) -> bool:
    """Whether ``module``'s first parameter lives on a CUDA device (checked at each frozen call: models move)."""
    for p in () if module is None else module._parameters.values():
        if p is not None:
            return bool(p.is_cuda)
    return False


def _migrate(group: Group) -> None:
    """Write the exclusive group's parameters into the ledger (idempotent), before a second group joins."""
    ledger = _ledger
    for p in group.owned:
        key = id(p)
        entry = ledger.get(key)
        if entry is None:
            ledger[key] = [p, {group}]
        else:
            entry[1].add(group)


def release(holder: Holder) -> None:
    """Give back what :func:`acquire` took for ``holder``; idempotent, so an interrupted release can be finished."""
    with _lock:
        groups = holder.groups
        while groups:
            group = groups[-1]
            if holder in group.holders:
                if len(group.holders) == 1:
                    _unfreeze(group)
                group.holders.discard(holder)
            groups.pop()
        holder.done = True


def _unfreeze(group: Group) -> None:
    global _exclusive
    if not _active or (len(_active) == 1 and group in _active):
        _watch(False)
    key = group.key
    probes = group.probes
    if group.cuda_probes:  # installed only on CUDA: look at the first one
        first = group.cuda_probes[0][0]()
        if first is not None and key in first._forward_pre_hooks:
            probes = probes + group.cuda_probes
    for ref, _ in probes:
        sub = ref()
        if sub is not None:
            sub._forward_pre_hooks.pop(key, None)
            sub._forward_pre_hooks_with_kwargs.pop(key, None)
    if group.hooked:
        for ref in group.quiet:
            sub = ref()
            if sub is not None:
                sub._forward_pre_hooks.pop(key, None)
                sub._forward_hooks.pop(key, None)
                sub._forward_hooks_always_called.pop(key, None)
        guest = (*key, "thread")
        for ref in group.roots:
            root = ref()
            if root is not None:
                root._forward_pre_hooks.pop(guest, None)
                root._forward_hooks.pop(guest, None)
                root._forward_hooks_always_called.pop(guest, None)
        group.hooked = False
    if group.kept:
        _unguard(map(_deref, group.kept), group)
    if group is _exclusive:
        owned = group.owned
        if _writes:
            owned = [p for p in owned if not _wanted_false(p)]
        for p in owned:
            p.requires_grad = True
        if _promoted:
            for p in owned:
                _unpromote(p)
        if _ledger:  # a second group's arrival was interrupted half-way through the migration
            _release_counted(group, [(id(p), p) for p in owned])
        _exclusive = None
    else:
        _release_counted(group, [(id(p), p) for r in group.refs if (p := r()) is not None])
    group.owned = []
    _active.discard(group)
    if not _active:
        _writes.clear()


def _release_counted(group: Group, params: list[tuple[int, Any]]) -> None:
    ledger = _ledger
    for key, p in params:
        entry = ledger.get(key)
        if entry is None:
            continue
        holders = entry[1]
        if group in holders or not holders:
            holders.discard(group)
            if not holders:
                if not (_writes and _wanted_false(p)):
                    p.requires_grad = True
                if _promoted:
                    _unpromote(p)
                del ledger[key]


def _unpromote(p: Any) -> None:
    entry = _promoted.get(id(p))
    if entry is not None:
        p.grad = entry[1]
        del _promoted[id(p)]


def _frozen_by_sbpatch(p: Any) -> bool:
    entry = _ledger.get(id(p))
    if entry is not None:
        return bool(entry[1])
    exclusive = _exclusive
    return exclusive is not None and any(q is p for q in exclusive.owned)


frozen_by_sbpatch = _frozen_by_sbpatch

# id(param) -> (weak reference, reason): frozen parameters an operand rule (operands.py) gave a live alias to
_aliased: dict[int, tuple[Any, str]] = {}


def note_operand(p: Any, reason: str) -> None:
    """Record that an operand rule ran an op on a live alias of ``p`` (for :func:`kept_live` and :func:`kept_in`)."""
    key = id(p)
    name = None
    with _lock:
        hit = _aliased.get(key)
        if hit is None or hit[0]() is not p:
            _aliased[key] = (weakref.ref(p, lambda _, key=key: _aliased.pop(key, None)), reason)
        for module, (_, group) in list(_param_cache.items()):
            if group in _active:
                name = next((n for n, q in module.named_parameters() if q is p), None)
                if name is not None:
                    name = f"{type(module).__name__}.{name}"
                    break
        _note_kept(name or f"parameter of shape {tuple(p.shape)}", reason)
    log.debug("sbpatch: live alias of %s: %s", name, reason)


def _promote(p: Any, name: str, reason: str) -> None:
    """Make a parameter sbpatch froze live again for the rest of the call (a run-time rule); remember it."""
    with _lock:
        if p.requires_grad or not _frozen_by_sbpatch(p):
            return
        if id(p) not in _promoted:
            _promoted[id(p)] = [p, p.grad]
            p.grad = None
        p.requires_grad = True
        _note_kept(name, reason)
    key = id(p)
    _learned[key] = (weakref.ref(p, lambda _, key=key: _learned.pop(key, None)), reason)
    _bump()
    log.debug("sbpatch: kept %s live: %s", name, reason)


def held_count() -> int:
    """Number of parameters sbpatch holds right now, frozen or guarded (0 when no frozen call is running)."""
    _reap()
    if _operands_module is not None:
        _operands_module.sweep(idle=not _active)
    with _lock:
        exclusive = len(_exclusive.owned) if _exclusive is not None else 0
        return len(_ledger) + exclusive + len(_guards)


# Holders whose call can no longer release them (a ``frozen()`` object collected with a block still entered: an
# interruption landed before its ``__exit__`` ran any line). Released by the next acquire/release/held_count, or at
# once when the lock is free. ``list.append`` and ``pop`` are atomic, so a garbage-collection callback may add here.
_orphans: list[Holder] = []


def _orphaned(holder: Holder) -> None:
    """Queue ``holder`` for release and release it now if the lock is free (never blocks: this may run inside a
    garbage-collection pass that interrupted sbpatch itself)."""
    if holder.done:
        return
    _orphans.append(holder)
    if _lock.acquire(blocking=False):
        _lock.release()
        _heal()


def _reap() -> None:
    """Release the holders whose ``frozen()`` object is gone (its ``__del__`` was itself interrupted)."""
    for group in list(_active):
        for h in list(group.holders):
            if h.owner is not None and h.owner() is None and not h.done:
                _orphans.append(h)
    if _orphans:
        _heal()


def _heal() -> None:
    while _orphans:
        try:
            holder = _orphans.pop()
        except IndexError:  # another thread took the last one
            return
        release(holder)
        log.warning("sbpatch: released %d group(s) left held by a frozen() block that never exited (interrupted "
                    "before its __exit__ ran)", len(holder.groups) or 1)


def release_all() -> int:
    """Give back every parameter sbpatch holds, whatever holds it; returns how many parameters were held.

    For a notebook after a Ctrl-C landed where no ``finally`` could run (e.g. as a ``with sbpatch.frozen(...)``
    block was leaving): the flags, ``.grad`` buffers set aside, probe hooks and this thread's operand mode are put
    back as if every frozen call had ended. Never call it while an attack is running in another thread: that call's
    model would be unfrozen.
    """
    _reap()
    with _lock:
        count = len(_ledger) + (len(_exclusive.owned) if _exclusive is not None else 0) + len(_guards)
        holders = {h for g in _active for h in g.holders}
    for holder in holders:
        release(holder)
    with _lock:  # what no holder accounts for any more (an interrupted arrival): restore it as release would
        for group in list(_active):
            group.holders.clear()
            _unfreeze(group)
        for key, (p, _holders) in list(_ledger.items()):
            p.requires_grad = True
            del _ledger[key]
        for p, grad in list(_promoted.values()):
            p.grad = grad
        _promoted.clear()
        for key, (p, _groups, grad) in list(_guards.items()):
            p.grad = grad
            del _guards[key]
        _release_state()
    if _operands_module is not None:  # this thread's operand mode, left by a call that never ended
        _operands_module.sweep(idle=True)
    return count


def _release_state() -> None:
    global _exclusive
    _exclusive = None
    _active.clear()
    _writes.clear()
    if _torch is not None and _rg_property is not None:
        _watch(False)
        _copies(False)


_comm_free_fn: Any = None


def _comm_free(targets: Iterable[Any]) -> Any:
    """A context in which a DDP wrapper among ``targets`` does no gradient or buffer communication."""
    global _comm_free_fn
    if _comm_free_fn is None:
        try:
            from sbpatch.distributed import comm_free as _comm_free_fn
        except ImportError:  # pragma: no cover - the module ships with sbpatch
            _comm_free_fn = lambda _targets: contextlib.nullcontext()  # noqa: E731
    return _comm_free_fn(targets)


_operands_module: Any = None


def _operands() -> Any:
    global _operands_module
    if _operands_module is None:
        from sbpatch import operands as _operands_module
    return _operands_module


def call_frozen(targets: Iterable[Any], keep: Iterable[Any], fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """Call ``fn(*args, **kwargs)`` with ``targets`` frozen. A failure to freeze runs ``fn`` unfrozen, never raises."""
    global _freeze_failed
    holder = Holder()
    operands = _operands()
    mark = operands.depth()
    learn = None
    try:
        try:
            if not isinstance(targets, list):
                targets = list(targets)
            groups = collect(targets, keep)
            sig = operands.signature(fn, args, kwargs, targets)
            if sig is not None and keep:
                sig = (sig, tuple(k if isinstance(k, str) else id(k) for k in keep))
            learners = groups if len(groups) == 1 and not groups[0].parts else [
                p for g in groups for p in (g.parts or (g,))]
            plain = sig is not None and all(sig in g.plain for g in learners)  # an earlier call needed no rule
            if not plain and sig is not None and (variants := _live_variants(groups, sig)) is not None:
                groups, plain = variants, True  # what needed a rule stays live: no mode either
            acquire(groups, holder, mode=not plain)
            sync = _comm_free(targets)
            if not plain:
                operands.enter()
                if sig is not None:
                    learn = (sig, learners, operands.hits(), operands.grads(), groups)
        except Exception:  # never break the user's call because freezing failed
            if not _freeze_failed:
                _freeze_failed = True
                log.warning("sbpatch could not freeze the model; running the call unpatched", exc_info=True)
            release(holder)
            sync = contextlib.nullcontext()
            learn = None
        with sync:
            result = fn(*args, **kwargs)
        if learn is not None:
            _learn(*learn, operands)
        return result
    finally:
        try:
            operands.leave_above(mark)
            release(holder)
        except BaseException:  # interrupted while releasing: finish it, then let the interruption through
            operands.leave_above(mark)
            release(holder)
            raise


_PLAIN_MAX = 64  # signatures remembered per group (a caller whose arguments change every call never repeats one)


def _learn(sig: Any, learners: list[Group], hits: int, grads: int, groups: list[Group], operands: Any) -> None:
    """After a call that ran the mode: remember that its signature needs no mode (no operand got a live alias), or,
    when aliases were given but no backward() accumulated into one (the attack takes input gradients with
    ``autograd.grad``, or only queries), which parameters to keep live instead: with them live, every product they
    enter sees the live model's flag, and their weight gradients are never computed (autograd prunes them)."""
    if operands.hits() == hits:
        for group in learners:
            if len(group.plain) >= _PLAIN_MAX:
                group.plain.clear()
            group.plain.add(sig)
    elif operands.grads() == grads and all(not g.parts for g in groups):
        ids = frozenset(map(id, operands.aliased_since(hits)))
        for group in groups:
            if len(group.live) >= _PLAIN_MAX:
                group.live.clear()
            group.live[sig] = ids


def _live_variants(groups: list[Group], sig: Any) -> list[Group] | None:
    """The groups of a call with signature ``sig`` with the parameters its rules needed kept live, if every group
    learned them (None: run the mode). Also None while one of them is frozen by another call (a thread attacking
    the same model with other arguments): the mode then gives its products the live flag."""
    found = []
    for group in groups:
        ids = group.live.get(sig)
        if ids is None or group.parts:
            return None
        variant = group.variants.get(ids)
        if variant is None:
            params = [p for p in map(_deref, group.refs) if p is not None]
            kept = [p for p in map(_deref, group.kept) if p is not None]
            variant = Group([p for p in params if id(p) not in ids], kept + [p for p in params if id(p) in ids])
            variant.probes = tuple((sub, _Probe(variant, pr.name, pr.paths, pr.has_bias, pr.kind))
                                   for sub, pr in group.probes)
            variant.cuda_probes = tuple((sub, _Probe(variant, pr.name, pr.paths, pr.has_bias, pr.kind))
                                        for sub, pr in group.cuda_probes)
            variant.quiet, variant.roots = group.quiet, group.roots
            if len(group.variants) >= _PLAIN_MAX:
                group.variants.clear()
            group.variants[ids] = variant
        if any(p is not None and _frozen_by_sbpatch(p) for p in map(_deref, variant.kept)):
            return None
        found.append(variant)
    return found


def _leave_mode(mark: list[Any]) -> None:
    if mark[0] is not None:
        _operands().leave_above(mark[0], mark[1])
        mark[0] = None


class frozen(contextlib.ContextDecorator):
    """Freeze the parameters of ``modules`` inside a ``with`` block or a decorated function, then restore them.

    >>> with sbpatch.frozen(model):
    ...     x_adv = my_attack(model, x, y)

    ``modules``: ``nn.Module`` objects (DDP/FSDP wrappers included), parameters, or iterables of them
    (``model.parameters()`` and ``named_parameters()`` are read once, here). ``keep``: one or several parameters,
    modules, or names relative to a given module (``"embeddings.word_embeddings"``) that stay live. Parameters
    already frozen by the user stay frozen; nesting and threads are safe; restoration happens even on an exception
    or KeyboardInterrupt. The kernel-preserving rules apply. As a decorator it also holds the freeze across the body
    of a generator or ``async`` function.
    """

    def __init__(self, *modules: Any, keep: Any = ()) -> None:
        if not modules:
            raise TypeError(f"frozen() needs what to freeze: {_ACCEPTED}")
        self._targets = targets_of(modules)
        self._keep = keep_of(keep)
        names = [k for k in self._keep if isinstance(k, str)]
        if names:
            _resolve_keep([t for t in self._targets if isinstance(t, _torch.nn.Module)], names)  # fail early
        self._stacks: dict[int, list[Holder]] = {}

    def __enter__(self) -> frozen:
        holder = Holder(self)
        sync = None
        operands = _operands()
        mark = operands.depth()
        try:
            acquire(collect(self._targets, self._keep), holder)
            sync = _comm_free(self._targets)
            sync.__enter__()
            # this thread and its operand-mode depth before the call (None once left)
            entry = (holder, sync, [mark, threading.get_ident()])
            operands.enter()
            self._stacks.setdefault(threading.get_ident(), []).append(entry)
        except BaseException:
            try:
                operands.leave_above(mark)
                if sync is not None:
                    with contextlib.suppress(Exception):
                        sync.__exit__(None, None, None)
                release(holder)
            finally:
                self._discard(holder)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            entry = self._top()
            if entry is not None:
                _leave_mode(entry[2])
                with contextlib.suppress(Exception):
                    entry[1].__exit__(None, None, None)
                release(entry[0])
        except BaseException:  # an interruption landed while restoring: finish, then let it through
            entry = self._top()
            if entry is not None:
                _leave_mode(entry[2])
                release(entry[0])
            raise
        finally:
            self._top()  # drops the released entry

    def __del__(self) -> None:
        # Collected with a block still entered: an interruption landed at the first bytecode of __exit__ (Python
        # checks for signals when a function starts), so no line of it ran. Nobody can exit it now: release.
        stacks = getattr(self, "_stacks", None)
        if not stacks:
            return
        for stack in list(stacks.values()):
            for holder, sync, mark in list(stack):
                if not holder.done:
                    with contextlib.suppress(Exception):
                        sync.__exit__(None, None, None)
                    with contextlib.suppress(Exception):
                        _leave_mode(mark)
                    _orphaned(holder)

    def _top(self) -> Any:
        """This thread's innermost live entry (dropping released ones); another thread's if this one has none."""
        stacks = self._stacks
        for ident in (threading.get_ident(), *list(stacks)):
            stack = stacks.get(ident)
            while stack and stack[-1][0].done:
                stack.pop()
            if stack:
                return stack[-1]
        return None

    def _discard(self, holder: Holder) -> None:
        for stack in self._stacks.values():
            for entry in list(stack):
                if entry[0] is holder:
                    stack.remove(entry)

    def _recreate_cm(self) -> frozen:  # ContextDecorator: each decorated call gets its own holder stack entry
        return self

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(fn):
            raise TypeError("@sbpatch.frozen cannot decorate an async generator; use `with sbpatch.frozen(...)` in it")
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def generator(*args: Any, **kwargs: Any) -> Any:
                with self:
                    return (yield from fn(*args, **kwargs))

            return generator
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def coroutine(*args: Any, **kwargs: Any) -> Any:
                with self:
                    return await fn(*args, **kwargs)

            return coroutine
        return super().__call__(fn)
