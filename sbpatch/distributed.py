"""Attacks through ``torch.distributed`` wrappers without gradient communication.

A frozen attack through a ``DistributedDataParallel`` wrapper should not talk to the other ranks: ranks may take
different numbers of attack steps, and any collective inside the attack then hangs or pairs with the wrong one.
As shipped, DDP communicates in an attack in two ways (torch 2.14, ``torch/nn/parallel/distributed.py``):

* ``backward()`` all-reduces the gradients of every parameter that requires grad (and a model frozen only partly,
  say with ``nn.MultiheadAttention``'s in-projections kept live, raises "Expected to have finished reduction"
  unless built with ``find_unused_parameters=True``). ``no_sync()`` stops both: it clears
  ``require_backward_grad_sync``, so the forward does not prepare the reducer for a backward and the backward
  reduces nothing (gradients of live parameters accumulate locally; the freeze ledger sets them aside).
* the forward broadcasts rank 0's buffers (``broadcast_buffers=True``, a model with buffers) whenever
  ``require_forward_param_sync`` is set, which the previous synchronised forward did. ``no_sync()`` does not stop
  that: the attack's first forward still broadcasts, then clears the flag, so the next training forward would skip
  its own broadcast. :func:`comm_free` therefore broadcasts the buffers once, at entry, exactly when DDP's next
  forward would have (so every rank attacks with rank 0's buffers, as unpatched), clears the flag for the call, and
  restores both flags exactly on exit.

Left to DDP: once per process, the first gradient-enabled forward after the first training backward rebuilds the
gradient buckets and broadcasts their order (two small broadcasts); every rank does it at the same point of its
sequence, attack or not. Inside ``torch.distributed.algorithms.Join`` every DDP forward also all-reduces (the join
protocol): not changed here.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterable
from typing import Any

_DDP_MODULE = "torch.nn.parallel.distributed"
_ddp_type: Any = None
_NULL = contextlib.nullcontext()
_lock = threading.Lock()
# id(ddp) -> [holders, the no_sync() context entered by the first holder, require_forward_param_sync at entry]
_held: dict[int, list[Any]] = {}


def _ddp_class() -> Any:
    global _ddp_type
    if _ddp_type is None:
        module = sys.modules.get(_DDP_MODULE)  # never imported: no DDP instance can exist
        if module is None:
            return None
        _ddp_type = module.DistributedDataParallel
    return _ddp_type


def comm_free(targets: Iterable[Any]) -> contextlib.AbstractContextManager:
    """A context in which calls through the ``DistributedDataParallel`` wrappers among ``targets`` communicate
    nothing: no gradient all-reduce in ``backward()``, no buffer broadcast in the forwards, no need for
    ``find_unused_parameters``.

    ``targets``: the modules an attack call freezes (read once). Anything that is not a DDP instance is ignored;
    with none, a shared ``nullcontext`` is returned (one ``isinstance`` per target). Nested and overlapping uses
    from several threads are counted per wrapper: the first holder enters its ``no_sync()`` and, if DDP's next
    forward would broadcast the buffers, broadcasts them now (a collective at a point every rank reaches once per
    attack call); the last holder restores ``require_backward_grad_sync`` and ``require_forward_param_sync``.
    """
    ddp_type = _ddp_type if _ddp_type is not None else _ddp_class()
    if ddp_type is None:
        return _NULL
    found = None
    for t in targets:
        if isinstance(t, ddp_type):
            found = [t] if found is None else [*found, t]
    return _NULL if found is None else _CommFree(found)


class _CommFree:
    """The context :func:`comm_free` returns for one or more DDP wrappers."""

    __slots__ = ("_ddps", "_entered")

    def __init__(self, ddps: list[Any]) -> None:
        self._ddps = ddps
        self._entered: list[Any] = []

    def __enter__(self) -> _CommFree:
        try:
            for ddp in self._ddps:
                with _lock:
                    entry = _held.get(id(ddp))
                    if entry is not None:
                        entry[0] += 1
                        self._entered.append(ddp)
                        continue
                    _held[id(ddp)] = entry = [1, None, ddp.require_forward_param_sync]
                    self._entered.append(ddp)
                    entry[1] = ddp.no_sync()
                    entry[1].__enter__()
                check = getattr(ddp, "_check_sync_bufs_pre_fwd", None)
                sync = getattr(ddp, "_sync_buffers", None)
                if check is not None and sync is not None:  # else DDP's first forward broadcasts, as unpatched
                    if check():
                        sync()  # what the next forward would have done: rank 0's buffers on every rank
                    ddp.require_forward_param_sync = False
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        entered, self._entered = self._entered, []
        while entered:
            ddp = entered.pop()
            with _lock:
                entry = _held[id(ddp)]
                entry[0] -= 1
                if entry[0]:
                    continue
                del _held[id(ddp)]
                ddp.require_forward_param_sync = entry[2]
                if entry[1] is not None:
                    entry[1].__exit__(None, None, None)

