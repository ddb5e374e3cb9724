"""Kernel rules at the operands: during a frozen call, see each product a frozen weight enters, where PyTorch decides.

``torch.matmul`` (and ``F.linear`` when it falls back to it) folds a >=3-D operand into one ``mm`` only when the
2-D operand requires grad or when the fold needs no copy (ATen's ``should_fold``); otherwise it runs ``bmm``, which
rounds differently. Freezing a weight flips that decision for every product where the other operand cannot be
folded without a copy (a transposed or permuted input), wherever the product happens: in ``nn.Linear``, in a user
pre-hook, in ``layer.forward(x.mT)``, in ``x.mT @ W``, ``W @ x``, in a LoRA adapter. A mask that requires grad keeps
``scaled_dot_product_attention`` off its fused CPU kernels, so a mask computed from a frozen parameter changes it too.

During a frozen call, in the calling thread, a :class:`torch.overrides.TorchFunctionMode` sees every such call with
its real operands. When an operand is a parameter sbpatch froze, a view of one, or a tensor computed from one (tracked
for the call), and the decision would differ from the live model's, the op gets a live alias of that operand instead
(``detach().requires_grad_()``: same storage and strides, requires grad): the kernel is the one the live model runs,
the parameter itself stays frozen, and its ``.grad`` is never written (the alias absorbs it).

What the mode cannot see: TorchScript graphs (read statically, :func:`sbpatch.rules.scripted_matmul_weights`), the
inside of fused C++ calls (``_VF.lstm``/``gru``: the RNN probe in :mod:`sbpatch.freeze`), and other threads.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from sbpatch import freeze, rules

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_grad_enabled = torch.is_grad_enabled
_F = torch.nn.functional

OPERAND_REASON = (
    "{op} with a non-foldable {dim}-D operand (shape {shape}, strides {strides}): torch.matmul folds it into one mm "
    "only while the other operand requires grad, else runs bmm, which rounds differently"
)
MASK_REASON = (
    "attention mask computed from it: a mask that requires grad keeps scaled_dot_product_attention off its fused "
    "CPU kernels"
)

# ops whose float result never requires grad, whatever their inputs: not tracked as computed from a weight
_NO_GRAD_OPS = frozenset(
    f
    for f in (
        torch.Tensor.detach,
        torch.detach,
        torch.Tensor.detach_,
        torch.Tensor.requires_grad_,
        torch.Tensor.data.__get__,
        torch.zeros_like,
        torch.ones_like,
        torch.empty_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
        torch.randint_like,
        torch.Tensor.new_zeros,
        torch.Tensor.new_ones,
        torch.Tensor.new_empty,
        torch.Tensor.new_full,
        torch.Tensor.new_tensor,
    )
)


def _contiguous_leading(t: Any) -> bool:
    """Whether ``t.view(-1, t.size(-1))`` needs no copy (ATen's ``should_fold`` stride test)."""
    if t.numel() == 0:
        return True
    sizes, strides = t.shape, t.stride()
    return all(strides[i] == strides[i + 1] * sizes[i + 1] for i in range(t.dim() - 2))


def _batch_one(t: Any) -> bool:
    return all(size == 1 for size in t.shape[:-2])


def _matmul_differs(a: Any, b: Any) -> tuple[int, Any] | None:
    """For ``torch.matmul(a, b)``: ``(index of the operand whose requires_grad decides, the other operand)`` when
    ATen's choice of kernel depends on that operand's flag, else None. Two places (``_matmul_impl``): a >=3-D
    operand meeting a 1-D/2-D one is folded into one ``mm`` when the small one requires grad or the fold needs no
    copy (``should_fold``; never without the flag for ``2-D @ N-D``), else ``bmm`` on an expanded copy; and between
    two >=3-D operands, one whose batch dimensions are all 1 is squeezed into the fold path when it requires grad,
    else expanded for ``bmm``."""
    da, db = a.dim(), b.dim()
    if da >= 3 and db >= 3:
        if _batch_one(b) and not _batch_one(a):
            return 1, a
        if _batch_one(a) and not _batch_one(b):
            return 0, b
        return None
    if da >= db:
        if da < 3 or db < 1:
            return None
        big, index = a, 1
    else:
        if db < 3 or da < 1:
            return None
        big, index = b.mT, 0
        if da == 2:  # W @ x: never folded without the grad flag
            return index, big
    return None if _contiguous_leading(big) else (index, big)


class OperandMode(TorchFunctionMode):
    """The mode sbpatch pushes during a frozen call (one per thread). See the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        # id(tensor) -> (weak ref, {id(param): param}): tensors computed, in this call, from frozen parameters
        self.derived: dict[int, tuple[Any, dict[int, Any]]] = {}
        self.noted: set[int] = set()
        self.inert = False  # its frozen call was ended from another thread: pass every call through

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        if kwargs is None:
            kwargs = {}
        rule = _RULES.get(func)
        if rule is not None and not self.inert:
            args, kwargs = rule(self, args, kwargs)
        out = func(*args, **kwargs)
        if (
            type(out) is _Tensor
            and _grad_enabled()
            and not out.requires_grad
            and out.is_floating_point()
            and func not in _NO_GRAD_OPS
        ):
            sources = self._sources_of(args, kwargs)
            if sources:
                key = id(out)
                derived = self.derived
                derived[key] = (weakref.ref(out, lambda _, key=key: derived.pop(key, None)), sources)
        return out

    # --- what an operand comes from -------------------------------------------------------------------------------

    def source(self, t: Any) -> dict[int, Any] | None:
        """The frozen parameters ``t`` is, is a view of (a view of a leaf that requires grad requires grad too, even
        when taken under ``no_grad``), or was computed from in this call under grad mode: exactly the operands that
        would require grad in the live model."""
        if t.requires_grad:
            return None
        base = t._base
        if base is None:
            base = t
        if isinstance(base, _Parameter):
            return {id(base): base}
        derived = self.derived
        if not derived:
            return None
        for candidate in (t, base):
            hit = derived.get(id(candidate))
            if hit is not None and hit[0]() is candidate:
                return hit[1]
        return None

    def _sources_of(self, args: tuple, kwargs: dict) -> dict[int, Any] | None:
        found = None
        for group in (args, kwargs.values()):
            for a in group:
                if isinstance(a, (list, tuple)):
                    for item in a:
                        if isinstance(item, _Tensor):
                            found = self._merge(found, item)
                elif isinstance(a, _Tensor):
                    found = self._merge(found, a)
        return found

    def _merge(self, found: dict[int, Any] | None, t: Any) -> dict[int, Any] | None:
        s = self.source(t)
        if not s:
            return found
        if found is None:
            return s
        merged = dict(found)
        merged.update(s)
        return merged

    def live_alias(self, t: Any, reason: str) -> Any:
        """``t``, or a live alias of it when it comes from a parameter sbpatch froze (noting why)."""
        sources = self.source(t)
        if not sources:
            return t
        frozen_ = [p for p in sources.values() if freeze.frozen_by_sbpatch(p)]
        if not frozen_:
            return t
        global _hits
        _hits += 1
        serial = _hits
        for p in frozen_:
            _aliased[id(p)] = (serial, weakref.ref(p))
            if id(p) not in self.noted:
                self.noted.add(id(p))
                freeze.note_operand(p, reason)
        try:
            alias = t.detach().requires_grad_()
        except RuntimeError:  # e.g. an inference tensor: leave the op as it is
            return t
        alias.register_post_accumulate_grad_hook(_accumulated)
        return alias


# --- the rules: one per op whose kernel depends on an operand's requires_grad -----------------------------------------


def _reason_for(op: str, big: Any) -> str:
    return OPERAND_REASON.format(op=op, dim=big.dim(), shape=tuple(big.shape), strides=tuple(big.stride()))


def _matmul_rule(mode: OperandMode, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if len(args) < 2 or kwargs.get("out") is not None:
        return args, kwargs
    a, b = args[0], args[1]
    if not (isinstance(a, _Tensor) and isinstance(b, _Tensor)):
        return args, kwargs
    hit = _matmul_differs(a, b)
    if hit is None:
        return args, kwargs
    index, big = hit
    operand = args[index]
    alias = mode.live_alias(operand, _reason_for("matmul", big))
    if alias is operand:
        return args, kwargs
    args = list(args)
    args[index] = alias
    return tuple(args), kwargs


def _rmatmul_rule(mode: OperandMode, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    if len(args) < 2:
        return args, kwargs
    swapped, kwargs = _matmul_rule(mode, (args[1], args[0]), kwargs)
    return (swapped[1], swapped[0], *args[2:]), kwargs


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _put(args: tuple, kwargs: dict, index: int, name: str, value: Any) -> tuple[tuple, dict]:
    if len(args) > index:
        args = list(args)
        args[index] = value
        return tuple(args), kwargs
    kwargs = dict(kwargs)
    kwargs[name] = value
    return args, kwargs


def _linear_rule(mode: OperandMode, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    x, weight, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
    if not (isinstance(x, _Tensor) and isinstance(weight, _Tensor)) or weight.dim() != 2:
        return args, kwargs
    if x.dim() < 3 or rules.foldable(x, bias is not None):
        return args, kwargs
    alias = mode.live_alias(weight, _reason_for("linear", x))
    return (args, kwargs) if alias is weight else _put(args, kwargs, 1, "weight", alias)


_MHA_WEIGHTS = ((5, "in_proj_weight"), (18, "q_proj_weight"), (19, "k_proj_weight"), (20, "v_proj_weight"))


def _mha_rule(mode: OperandMode, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``F.multi_head_attention_forward``: its in-projections are ``linear`` calls on query, key and value."""
    has_bias = _arg(args, kwargs, 6, "in_proj_bias") is not None
    for index, name in ((0, "query"), (1, "key"), (2, "value")):
        x = _arg(args, kwargs, index, name)
        if isinstance(x, _Tensor) and x.dim() >= 3 and not rules.foldable(x, has_bias):
            reason = _reason_for("multi_head_attention_forward in-projection", x)
            for windex, wname in _MHA_WEIGHTS:
                w = _arg(args, kwargs, windex, wname)
                if isinstance(w, _Tensor):
                    alias = mode.live_alias(w, reason)
                    if alias is not w:
                        args, kwargs = _put(args, kwargs, windex, wname, alias)
            break
    return args, kwargs


def _sdpa_rule(mode: OperandMode, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    mask = _arg(args, kwargs, 3, "attn_mask")
    if not isinstance(mask, _Tensor) or not mask.is_floating_point():
        return args, kwargs
    alias = mode.live_alias(mask, MASK_REASON)
    return (args, kwargs) if alias is mask else _put(args, kwargs, 3, "attn_mask", alias)


_RULES: dict[Any, Any] = {
    torch.matmul: _matmul_rule,
    torch.Tensor.matmul: _matmul_rule,
    torch.Tensor.__matmul__: _matmul_rule,
    torch.Tensor.__rmatmul__: _rmatmul_rule,
    torch._C._nn.linear: _linear_rule,
    _F.multi_head_attention_forward: _mha_rule,
    torch._C._nn.scaled_dot_product_attention: _sdpa_rule,
}


# --- pushing the mode for the duration of a frozen call ---------------------------------------------------------------

class _State:
    """One thread's mode and how many frozen calls hold it."""

    __slots__ = ("depth", "guest", "mode", "quiet")

    def __init__(self) -> None:
        self.depth = 0
        self.mode: OperandMode | None = None
        self.quiet: list[int] = []
        self.guest: list[tuple[int, bool]] = []  # (id of the module, whether its guest_begin entered the mode)


# thread ident -> its state; a frozen() block may be exited from another thread than the one that entered it
_states: dict[int, _State] = {}


def _state(ident: int | None = None) -> _State:
    ident = threading.get_ident() if ident is None else ident
    state = _states.get(ident)
    if state is None:
        state = _states[ident] = _State()
    return state


def depth() -> int:
    """How many frozen calls hold this thread's mode now."""
    state = _states.get(threading.get_ident())
    return 0 if state is None else state.depth


def leave_above(mark: int, ident: int | None = None) -> None:
    """:func:`leave` once if more than ``mark`` calls hold the mode of thread ``ident`` (this one by default): a
    caller that noted ``mark = depth()`` before :func:`enter` may call this again after an interruption without
    leaving twice."""
    state = _states.get(threading.get_ident() if ident is None else ident)
    if state is not None and state.depth > mark:
        leave(ident)


def enter() -> bool:
    """Push this thread's mode for a frozen call (nested calls share it). Returns True.

    Ordered so that an interruption at any point leaves a state that :func:`leave_above` cleans up: the depth is
    counted before the mode is pushed, and :func:`leave` removes the mode before it forgets it."""
    state = _state()
    if state.depth:
        state.depth += 1
        return True
    if state.mode is not None:  # left by a frozen() block that another thread exited
        _remove(state.mode)
        state.mode = None
    mode = OperandMode()
    state.quiet = []
    state.mode = mode
    state.depth = 1
    torch._C._push_on_torch_function_stack(mode)
    return True


def leave(ident: int | None = None) -> bool:
    """Undo :func:`enter`; the last one removes the mode, wherever it is on the stack. Returns False. From another
    thread (``ident``), the mode cannot be taken off that thread's stack: it goes inert, and that thread removes it
    at its next frozen call or :func:`sweep`."""
    here = ident is None or ident == threading.get_ident()
    state = _states.get(threading.get_ident() if ident is None else ident)
    if state is None or state.depth <= 0:
        return False
    if state.depth == 1:
        mode = state.mode
        if mode is not None:
            if here:
                _remove(mode)
                state.mode = None
            else:
                mode.inert = True
        state.quiet = []
    state.depth -= 1
    return False


def sweep(idle: bool = False) -> None:
    """Remove this thread's inert mode (its frozen() block was exited from another thread). ``idle``: nothing is
    frozen any more, so a depth still counted here was left by an interruption that no cleanup could see (one
    landing inside a ``__del__``): forget it too."""
    state = _states.get(threading.get_ident())
    if state is None:
        return
    if idle:
        state.depth = 0
        state.guest = []
    if state.depth == 0 and state.mode is not None:
        _remove(state.mode)
        state.mode = None


def quiet_begin(module: Any) -> None:
    """Set the mode aside while ``module`` runs (its fast path is refused under any mode); see freeze._Quiet."""
    state = _states.get(threading.get_ident())
    if state is None or state.mode is None or torch._C._len_torch_function_stack() == 0:
        return
    top = torch._C._pop_torch_function_stack()
    if top is not state.mode:
        torch._C._push_on_torch_function_stack(top)
        return
    state.quiet.append(id(module))


def quiet_end(module: Any) -> None:
    state = _states.get(threading.get_ident())
    if state is not None and state.quiet and state.quiet[-1] == id(module):
        state.quiet.pop()
        if state.mode is not None:
            torch._C._push_on_torch_function_stack(state.mode)


def guest_begin(module: Any) -> None:
    """A frozen model (held by a call running the mode) starts a forward: in a thread where no frozen call runs the
    mode (a thread pool inside the attack), push one for that forward, so its products get the rules too."""
    state = _state()
    entered = state.depth == 0
    if entered:
        enter()
    state.guest.append((id(module), entered))


def guest_end(module: Any) -> None:
    state = _states.get(threading.get_ident())
    if state is not None and state.guest and state.guest[-1][0] == id(module) and state.guest.pop()[1]:
        leave()


def _remove(mode: Any) -> None:
    stack = torch._C._len_torch_function_stack()
    if stack == 0:
        return
    top = torch._C._pop_torch_function_stack()
    if top is mode:
        return
    torch._C._push_on_torch_function_stack(top)
    above = []
    try:
        while torch._C._len_torch_function_stack() > 0:
            top = torch._C._pop_torch_function_stack()
            if top is mode:
                break
            above.append(top)
    finally:
        for m in reversed(above):
            torch._C._push_on_torch_function_stack(m)


_hits = 0  # live aliases given so far, by every mode in every thread
# id(param) -> (value of _hits when it last got an alias, weak reference): what a call's aliases came from
_aliased: dict[int, tuple[int, Any]] = {}
_grads = 0  # aliases whose gradient a backward() accumulated (an attack calling backward(), not autograd.grad)


def _accumulated(_alias: Any) -> None:
    global _grads
    _grads += 1


def grads() -> int:
    """How many times a backward() has accumulated a gradient into an alias, in every thread."""
    return _grads


def aliased_since(mark: int) -> list[Any]:
    """The frozen parameters that got (or whose views or products got) a live alias after :func:`hits` was ``mark``."""
    found = []
    for key, (serial, ref) in list(_aliased.items()):
        if serial > mark:
            p = ref()
            if p is None:
                _aliased.pop(key, None)
            else:
                found.append(p)
    return found


def hits() -> int:
    """How many live aliases the modes of all threads have given so far: a call during which it does not move needed
    no rule (see :func:`signature`; a rule firing in another thread meanwhile only makes that call not learn)."""
    return _hits


def active() -> OperandMode | None:
    """This thread's mode, while a frozen call runs in it."""
    state = _states.get(threading.get_ident())
    return None if state is None or state.depth == 0 else state.mode


# --- which calls need the mode ----------------------------------------------------------------------------------------
# The mode costs a Python round trip on every torch call the attack makes (rules_cost.md); on a small model that is a
# tenth of the attack. Whether a product's kernel depends on a frozen operand's flag is decided by the operands'
# dimensions, strides and origins, which the model's code and the call's inputs fix: a later call of the same function
# with arguments of the same shapes, strides, dtypes, devices and flags, under the same grad mode and training flags,
# runs the same products. So a call whose mode gave no live alias is remembered (per group, by its signature), and such
# later calls run without the mode. A ``with frozen(...)`` block has no arguments to compare: it always runs the mode.

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_ITEMS = 16  # items of a list/tuple/dict argument looked at; a longer one is described by its type and length


def _describe(value: Any, depth: int = 0) -> Any:
    if isinstance(value, _Tensor):
        return (value.shape, value.stride(), value.dtype, value.device, value.requires_grad, value.layout)
    if isinstance(value, _SCALARS):
        return value
    kind = type(value)
    if kind in (list, tuple) and depth < 2:
        if len(value) > _MAX_ITEMS:
            return (kind, len(value))
        return (kind, *(_describe(v, depth + 1) for v in value))
    if kind is dict and depth < 2:
        if len(value) > _MAX_ITEMS:
            return (kind, len(value))
        return (kind, *((k, _describe(v, depth + 1)) for k, v in value.items() if isinstance(k, _SCALARS)))
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "strides"):  # a numpy array (ART, foolbox's numpy models)
        return (kind, tuple(shape), tuple(value.strides), str(getattr(value, "dtype", "")))
    return kind


_autocast = getattr(torch, "is_autocast_enabled", None)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)
_Module = torch.nn.Module


def _autocast_state() -> Any:
    if _any_autocast is not None and not _any_autocast():  # one call in the usual case
        return None
    return (_autocast("cpu"), _autocast("cuda")) if _autocast is not None else True


def _training_or_id(target: Any) -> Any:
    return target.training if isinstance(target, _Module) else id(target)


def signature(fn: Any, args: tuple, kwargs: dict, targets: Any) -> Any:
    """What fixes the products of ``fn(*args, **kwargs)`` on ``targets``, hashable; None when it cannot be told
    (then the call runs the mode). Costs a few microseconds: one tuple per argument."""
    try:
        sig = (
            getattr(fn, "__func__", fn),
            _grad_enabled(),
            torch.is_inference_mode_enabled(),
            _autocast_state(),
            tuple(map(_training_or_id, targets)),
            tuple(map(_describe, args)),
            tuple((k, _describe(v)) for k, v in kwargs.items()) if kwargs else (),
        )
        hash(sig)
    except Exception:  # an argument that cannot be described: run the mode
        return None
    return sig
