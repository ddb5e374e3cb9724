"""Attacks through ``torch.distributed`` wrappers without gradient communication.

A frozen attack through a data-parallel wrapper should not talk to the other ranks: ranks may take different
numbers of attack steps, and any collective inside the attack then hangs or pairs with the wrong one. As shipped
(torch 2.14, ``torch/nn/parallel/distributed.py``), ``DistributedDataParallel`` communicates in an attack in two ways:

* ``backward()`` all-reduces the gradients of every parameter that requires grad; a model frozen only partly (say
  with ``nn.MultiheadAttention``'s in-projections kept live) raises "Expected to have finished reduction" at the
  next forward unless built with ``find_unused_parameters=True``. ``no_sync()`` stops both: it clears
  ``require_backward_grad_sync``, so the forward does not prepare the reducer and the backward reduces nothing
  (gradients of live parameters accumulate locally; the freeze ledger sets them aside and puts them back).
* the forward broadcasts rank 0's buffers (``broadcast_buffers=True`` and a model with buffers) whenever
  ``require_forward_param_sync`` is set, which the previous synchronised forward did. ``no_sync()`` does not stop
  that: the attack's first forward still broadcasts, then clears the flag, so the next training forward skips its
  own broadcast. :func:`comm_free` broadcasts the buffers once, at entry, exactly when DDP's next forward would
  have (so every rank attacks with rank 0's buffers, as unpatched), clears the flag for the call, and restores both
  flags exactly on exit.

Left to DDP: once per process, the first gradient-enabled forward after the first training backward rebuilds the
gradient buckets and broadcasts their order (two small broadcasts); every rank does it at the same point of its
sequence, attack or not. Inside ``torch.distributed.algorithms.Join`` every DDP forward also all-reduces (the join
protocol): not changed here.

FSDP2 (``torch.distributed.fsdp.fully_shard``): each forward all-gathers the sharded parameters (that is how FSDP
gets its weights, so ranks must run the same number of forwards), and each backward reduce-scatters the gradients
of the parameters that require grad. :func:`comm_free` turns the reduction off for the call (FSDP's own
``set_requires_gradient_sync(False)``) and, on exit, puts back the unsharded gradients FSDP keeps for the next
reduction, so the gradients of kept (live) weights never reach the next training step.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import weakref
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("sbpatch")

_DDP_MODULE = "torch.nn.parallel.distributed"
_FSDP_MODULE = "torch.distributed.fsdp._fully_shard._fully_shard"
_ddp_type: Any = None
_fsdp_type: Any = None
_wrapper_types: tuple[Any, ...] = ()
_all_types = False
_modules_seen = -1  # len(sys.modules) when _types() last looked
_NULL = contextlib.nullcontext()
_lock = threading.Lock()
# id(wrapper) -> [holders, what the first holder changed (to restore)]
_held: dict[int, list[Any]] = {}
_fsdp_failed = False  # warned once
_is_initialized: Any = None  # torch.distributed.is_initialized, once imported
# module -> (the freeze ledger's generation, weak references to the wrappers found inside it)
_inner_cache: weakref.WeakKeyDictionary[Any, tuple[int, tuple[Any, ...]]] = weakref.WeakKeyDictionary()


def _types() -> tuple[Any, ...]:
    """The DDP and FSDP2 module classes whose modules are imported (a module never imported has no instance)."""
    global _ddp_type, _fsdp_type, _wrapper_types, _all_types
    if _ddp_type is None:
        module = sys.modules.get(_DDP_MODULE)
        if module is not None:
            _ddp_type = module.DistributedDataParallel
    if _fsdp_type is None:
        module = sys.modules.get(_FSDP_MODULE)
        if module is not None:
            _fsdp_type = getattr(module, "FSDPModule", None)
    _wrapper_types = tuple(t for t in (_ddp_type, _fsdp_type) if t is not None)
    _all_types = len(_wrapper_types) == 2
    return _wrapper_types


def comm_free(targets: Iterable[Any]) -> contextlib.AbstractContextManager:
    """A context in which calls through the ``DistributedDataParallel`` and FSDP2 (``fully_shard``) wrappers among
    ``targets`` reduce no gradient: for DDP no all-reduce in ``backward()``, no buffer broadcast in the forwards and
    no need for ``find_unused_parameters``; for FSDP2 no reduce-scatter (its forwards still all-gather).

    ``targets``: the modules an attack call freezes (read once); a wrapper among them or inside them
    (``nn.Sequential(normalize, ddp_model)``) counts. Anything else is ignored; with no such wrapper a shared
    ``nullcontext`` is returned (an ``isinstance`` per target, and a cached look inside it when a process group
    exists). The returned object is for one ``with``. Nested and overlapping uses from several threads are counted
    per wrapper: the first holder switches the wrapper off (DDP: enters its ``no_sync()`` and, if DDP's next
    forward would broadcast the buffers, broadcasts them now, a collective every rank reaches once per attack call)
    and the last holder restores it.
    """
    if _all_types:
        types = _wrapper_types
    else:  # look again only once more modules are imported (a module never imported has no instance)
        global _modules_seen
        if len(sys.modules) != _modules_seen:
            _modules_seen = len(sys.modules)
            _types()
        types = _wrapper_types
    if not types:
        return _NULL
    found = None
    for t in targets:
        if isinstance(t, types):
            found = [t] if found is None else [*found, t]
        else:
            inner = _inner_wrappers(t, types)
            if inner:
                found = [*(found or ()), *inner]
    return _NULL if found is None else _CommFree(found)


def _inner_wrappers(target: Any, types: tuple[Any, ...]) -> tuple[Any, ...]:
    """The outermost wrappers inside ``target`` (``nn.Sequential(normalize, ddp_model)``, a library's wrapper
    module); only when a process group exists (no wrapper can work without one), cached per module until any
    module anywhere registers a submodule or a parameter (the freeze ledger's generation)."""
    global _is_initialized
    if _is_initialized is None:
        module = sys.modules.get("torch.distributed")
        if module is None:
            return ()
        _is_initialized = getattr(module, "is_initialized", None) or (lambda: False)
    children = getattr(target, "_modules", None)
    if not children or not _is_initialized():
        return ()
    freeze = sys.modules.get("sbpatch.freeze")
    generation = getattr(freeze, "_generation", None) if getattr(freeze, "_hooks_installed", False) else None
    try:
        cached = _inner_cache.get(target) if generation is not None else None
    except TypeError:  # not weak-referenceable
        cached = generation = None
    if cached is not None and cached[0] == generation:
        alive = tuple(ref() for ref in cached[1])
        if None not in alive:
            return alive
    found: list[Any] = []
    stack = list(children.values())
    while stack:
        module = stack.pop()
        if module is None:
            continue
        if isinstance(module, types):
            found.append(module)
        else:
            stack.extend(module._modules.values())
    result = tuple(dict.fromkeys(found))
    if generation is not None:
        _inner_cache[target] = (generation, tuple(weakref.ref(w) for w in result))  # never keeps target alive
    return result


class _CommFree:
    """The context :func:`comm_free` returns for one or more wrappers."""

    __slots__ = ("_entered", "_wrappers")

    def __init__(self, wrappers: list[Any]) -> None:
        self._wrappers = wrappers
        self._entered: list[Any] = []

    def __enter__(self) -> _CommFree:
        try:
            for wrapper in self._wrappers:
                with _lock:
                    entry = _held.get(id(wrapper))
                    self._entered.append(wrapper)
                    if entry is not None:
                        entry[0] += 1
                        continue
                    _held[id(wrapper)] = entry = [1, None]
                    is_ddp = _ddp_type is not None and isinstance(wrapper, _ddp_type)
                    entry[1] = _ddp_off(wrapper) if is_ddp else _fsdp_off(wrapper)
                if is_ddp:
                    _ddp_buffers_once(wrapper)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        entered, self._entered = self._entered, []
        while entered:
            wrapper = entered.pop()
            with _lock:
                entry = _held[id(wrapper)]
                entry[0] -= 1
                if entry[0]:
                    continue
                del _held[id(wrapper)]
                if entry[1] is not None:
                    entry[1]()


def _ddp_off(ddp: Any) -> Any:
    """Enter ``ddp.no_sync()``; return the function that undoes it and restores ``require_forward_param_sync``."""
    forward_sync = ddp.require_forward_param_sync
    context = ddp.no_sync()
    context.__enter__()

    def restore() -> None:
        ddp.require_forward_param_sync = forward_sync
        context.__exit__(None, None, None)

    return restore


def _ddp_buffers_once(ddp: Any) -> None:
    """Broadcast the buffers now if DDP's next forward would, then keep the attack's forwards from doing it."""
    check = getattr(ddp, "_check_sync_bufs_pre_fwd", None)
    sync = getattr(ddp, "_sync_buffers", None)
    if check is not None and sync is not None:  # else DDP's first forward broadcasts, as unpatched
        if check():
            sync()  # what the next forward would have done: rank 0's buffers on every rank
        ddp.require_forward_param_sync = False


def _fsdp_off(root: Any) -> Any:
    """Turn off gradient reduction in every FSDP2 parameter group under ``root``; return the function that restores
    the groups' flags and the unsharded gradients FSDP keeps for its next reduction. FSDP internals that moved (a
    torch version this was not written for) leave FSDP as it is: its gradients are reduced as unpatched."""
    global _fsdp_failed
    try:
        return _fsdp_switch(root)
    except Exception:
        if not _fsdp_failed:
            _fsdp_failed = True
            log.warning("sbpatch: could not switch off FSDP's gradient reduction for attacks", exc_info=True)
        return None


def _fsdp_switch(root: Any) -> Any:
    groups: list[tuple[Any, bool, bool]] = []
    params: list[tuple[Any, Any, Any, Any]] = []
    for module in root.modules():
        if not isinstance(module, _fsdp_type):
            continue
        for group in getattr(module._get_fsdp_state(), "_fsdp_param_groups", ()):
            groups.append((group, group.reduce_grads, group.all_reduce_grads))
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                grad = None if unsharded is None else unsharded.grad
                params.append((fsdp_param, unsharded, grad, fsdp_param.unsharded_accumulated_grad))
    for group, _, _ in groups:
        group.reduce_grads = group.all_reduce_grads = False

    def restore() -> None:
        for group, reduce_grads, all_reduce_grads in groups:
            group.reduce_grads, group.all_reduce_grads = reduce_grads, all_reduce_grads
        for fsdp_param, unsharded, grad, accumulated in params:
            now = getattr(fsdp_param, "_unsharded_param", None)
            if now is not None:
                now.grad = grad if now is unsharded else None
            fsdp_param.unsharded_accumulated_grad = accumulated

    return restore
