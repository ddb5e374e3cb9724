"""What stays live and why: sbpatch's kernel-preserving rules, in one place.

Freezing a weight must never change which kernel PyTorch runs. Where a kernel depends on whether a parameter
requires grad, a rule keeps it (or a live alias of it) requiring grad for the call. :func:`builtin_rules` lists them;
each reason below is what :func:`sbpatch.freeze.kept_live` and ``status()`` show.

* **Products** (``torch.matmul``, ``@``, ``F.linear``, the attention in-projection, an attention mask): decided
  where PyTorch decides, with the real operands, by :mod:`sbpatch.operands` (a torch function mode during frozen
  calls). This module holds the fold test they share (:func:`foldable`).
* **Module rules**, decided when a model's group is built (:func:`sbpatch.freeze._module_group` asks this module):
  ``nn.MultiheadAttention(batch_first=True)`` keeps its in-projections live (:data:`MHA_REASON`); parameters named
  ``*relative_position*``/``*rel_pos*`` stay live (:data:`BIAS_REASON`); TorchScript modules keep what feeds a
  product in their graph (:func:`scripted_matmul_weights`); the modules whose fused fast path is refused under any
  torch function mode are listed by :func:`fast_path_scopes`.
* **Run-time module probes** (forward pre-hooks during the call, in :mod:`sbpatch.freeze`): a batch-first RNN's
  first input projection on a non-foldable time-major input (:func:`rnn_fused`, :data:`RNN_REASON`), batch norm
  in eval mode on CUDA (:data:`BN_REASON`).
* **The user's static rules**: :func:`add_keep_rule`.

Like :mod:`sbpatch.freeze`, nothing here imports torch until a rule is first applied.
"""

from __future__ import annotations

import keyword
import threading
import warnings
from collections.abc import Iterable
from typing import Any

from sbpatch.errors import SbpatchWarning

MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

MHA_REASON = (
    "nn.MultiheadAttention(batch_first=True): its in-projection sees a transposed input (mm vs bmm) and its fused "
    "fast path is taken only when no projection weight requires grad"
)
RNN_REASON = (
    "RNN input projection on a non-foldable time-major {dim}-D input (shape {shape}, strides {strides}): mm vs bmm"
)
BIAS_REASON = (
    "relative-position attention bias: an attention mask that requires grad keeps scaled_dot_product_attention off "
    "its CPU flash kernel"
)
BIAS_NAMES = ("relative_position", "rel_pos")
BN_REASON = (
    "batch norm in eval mode on a CUDA input: with no affine parameter requiring grad, CUDA's backward takes an "
    "elementwise-only kernel, which rounds differently from the fused reduction kernel it runs as shipped"
)

_lock = threading.Lock()
# "module.QualName" of a module type -> parameter names on that module (or a subclass) that always stay live.
_keep_rules: dict[str, frozenset[str]] = {}
_rule_cache: dict[type, frozenset[str]] = {}
_rule_warned: set[tuple[str, str]] = set()

def _changed() -> None:
    """A rule changed: every cached group must be rebuilt."""
    from sbpatch import freeze

    freeze._bump()


# --- the user's static rules ----------------------------------------------------------------------------------


def add_keep_rule(module_type: type | str, *parameter_names: str) -> None:
    """Keep ``parameter_names`` of every ``module_type`` (or subclass) live whenever sbpatch freezes a model.

    ``module_type`` is an ``nn.Module`` subclass or its qualified name ``"package.module.ClassName"``. Use it for a
    layer whose kernel depends on whether a weight requires grad and that the built-in run-time rules do not see
    (a custom layer calling ``x @ self.weight`` on a transposed input; check a suspect with ``sbpatch verify``).
    A name that the matched modules do not have is warned about once, when it first fails to match.
    """
    key = type_name(module_type)
    if not parameter_names:
        raise ValueError("add_keep_rule needs at least one parameter name, e.g. add_keep_rule(MyLayer, 'weight')")
    for name in parameter_names:
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {type(name).__name__} {name!r}")
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"{name!r} is not a parameter name (a Python identifier such as 'weight')")
    with _lock:
        _keep_rules[key] = _keep_rules.get(key, frozenset()) | frozenset(parameter_names)
        _rule_cache.clear()
    _changed()


def remove_keep_rule(module_type: type | str) -> None:
    """Drop every keep rule registered for ``module_type`` (a class or its qualified name)."""
    key = type_name(module_type)
    with _lock:
        _keep_rules.pop(key, None)
        _rule_cache.clear()
    _changed()


def keep_rules() -> dict[str, list[str]]:
    """The user's static keep rules: module type -> parameter names that always stay live."""
    return {k: sorted(v) for k, v in _keep_rules.items()}


def builtin_rules() -> dict[str, str]:
    """The built-in kernel-preserving rules: where (ops, a module type, a name) -> what stays live, and when."""
    return {
        "products (matmul, @, F.linear; any caller)": "a live alias of a frozen weight, or of a tensor computed "
        "from one, when the other operand is >=3-D and cannot be folded without a copy (the parameter stays frozen)",
        "F.multi_head_attention_forward": "live aliases of the in-projection weights when query, key or value "
        "cannot be folded",
        "F.scaled_dot_product_attention": "a live alias of an attention mask computed from frozen parameters",
        "torch.jit.ScriptModule": "parameters that feed linear/matmul in its graph stay live",
        "torch.nn.modules.activation.MultiheadAttention": "in-projection weights live when batch_first=True (its "
        "fused fast path)",
        "torch.nn.modules.rnn.RNNBase": "first layer's input weights live when its time-major input is not "
        "foldable (batch_first=True) and no fused kernel (oneDNN LSTM, cuDNN) runs",
        "parameters named *relative_position* / *rel_pos*": "always live: they feed attention masks, and a mask "
        "that requires grad keeps scaled_dot_product_attention off its CPU flash kernel",
        "torch.nn.modules.batchnorm._BatchNorm": "bias (else weight) live when it runs in eval mode on a CUDA input "
        "that requires grad (CUDA's backward kernel changes when no affine parameter requires grad)",
    }


def type_name(t: Any) -> str:
    if isinstance(t, str):
        if "." not in t or not all(part.isidentifier() for part in t.split(".")):
            raise ValueError(
                f"{t!r}: name the module type by its class or its qualified name 'package.module.ClassName' "
                "(e.g. 'torch.nn.modules.linear.Linear')"
            )
        return t
    if not isinstance(t, type):
        raise TypeError(f"module_type must be an nn.Module subclass or its qualified name, got {type(t).__name__}")
    import torch

    if not issubclass(t, torch.nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {t.__qualname__}")
    return f"{t.__module__}.{t.__qualname__}"


def kept_names(cls: type) -> frozenset[str]:
    names = _rule_cache.get(cls)
    if names is None:
        names = frozenset()
        for base in cls.__mro__:
            names |= _keep_rules.get(f"{base.__module__}.{base.__qualname__}", frozenset())
        _rule_cache[cls] = names
    return names


def warn_rule(cls: type, name: str, present: Iterable[str]) -> None:
    key = (f"{cls.__module__}.{cls.__qualname__}", name)
    if key not in _rule_warned:
        _rule_warned.add(key)
        warnings.warn(
            f"sbpatch: keep rule for {cls.__qualname__} names {name!r}, which it does not have "
            f"(its parameters: {', '.join(present) or 'none'})",
            SbpatchWarning,
            stacklevel=4,
        )


# --- the fold test, the fused-kernel test, the fast-path scopes ---


def foldable(x: Any, has_bias: bool) -> bool:
    """Whether ``F.linear(x, w)`` runs the same kernel whatever ``w.requires_grad`` is (torch's ``should_fold``)."""
    dim = x.dim()
    if dim < 3:
        return True
    if has_bias and x.is_contiguous():  # at::linear's _flatten_nd_linear path
        return True
    if x.numel() == 0:
        return True
    sizes, strides = x.shape, x.stride()
    return all(strides[i] == strides[i + 1] * sizes[i + 1] for i in range(dim - 2))


def rnn_fused(module: Any, x: Any) -> bool:
    """Whether this RNN call runs a fused kernel (oneDNN LSTM on CPU, cuDNN on GPU) with no input projection fold."""
    import torch

    if x.is_cuda:
        return bool(torch.backends.cudnn.enabled)
    return (
        module.mode == "LSTM"
        and not getattr(module, "proj_size", 0)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() > 0
        and torch.backends.mkldnn.is_available()
        and torch._C._get_mkldnn_enabled()
    )


def scripted_keeps(module: Any) -> dict[int, tuple[Any, str]]:
    """The parameters of TorchScript submodules that feed a product in their graphs (scripted_matmul_weights)."""
    import torch

    script = getattr(torch.jit, "ScriptModule", None)
    keeps: dict[int, tuple[Any, str]] = {}
    if script is None:
        return keeps
    inside: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, script) and id(sub) not in inside:
            inside.update(id(m) for m in sub.modules())
            keeps.update(scripted_matmul_weights(sub))
    return keeps


def fast_path_scopes(module: Any) -> tuple[list[Any], set[int]]:
    """Where torch decides a fused fast path by ``has_torch_function`` (which any active mode makes true): the
    modules during which the mode is set aside, and the ids of the modules inside a fused encoder layer, where no
    hook may be added (the layer refuses its fast path when any submodule has one)."""
    import torch

    nn = torch.nn
    named = dict(module.named_modules())
    no_probe = {
        id(m)
        for layer in named.values()
        if isinstance(layer, nn.TransformerEncoderLayer) and layer.self_attn.batch_first
        for m in layer.modules()
    }
    quiet: list[Any] = []
    covered: set[int] = set()
    for name, sub in named.items():
        if id(sub) in covered:
            continue
        scope = None
        if isinstance(sub, nn.TransformerEncoder):
            # its fast path (and its layers') needs batch-first attention; a sequence-first encoder keeps the mode,
            # which gives its in-projections live aliases on their non-foldable (N, B, d) inputs
            if all(getattr(getattr(layer, "self_attn", None), "batch_first", False) for layer in sub.layers):
                scope = sub
        elif isinstance(sub, nn.TransformerEncoderLayer) and sub.self_attn.batch_first:
            scope = named.get(name.rpartition(".")[0]) if name else None  # its parent: no hook on the layer itself
        elif isinstance(sub, nn.MultiheadAttention) and sub.batch_first and id(sub) not in no_probe:
            scope = sub
        if scope is not None and all(scope is not q for q in quiet):
            quiet.append(scope)
            covered.update(id(m) for m in scope.modules())
    return quiet, no_probe


# --- TorchScript: the operand mode never sees inside a graph; read it instead ------------------------------

SCRIPT_REASON = (
    "TorchScript: it feeds {op} inside a compiled graph, where the fold decision (mm vs bmm) happens out of sbpatch's "
    "sight; kept live (read from the graph)"
)
_SCRIPT_OPS = {"aten::linear": (1,), "aten::matmul": (0, 1), "aten::multi_head_attention_forward": (5,)}


def scripted_matmul_weights(module: Any) -> dict[int, tuple[Any, str]]:
    """For a TorchScript module (scripted or traced): the parameters that are, or are computed only from parameters
    into, an operand of ``linear``/``matmul`` in its inlined graph: ``{id(param): (param, reason)}``. When the graph
    cannot be read, every parameter of at most two dimensions (what can enter a product as the small operand)."""
    params = dict(module.named_parameters())
    try:
        graph = module.inlined_graph
        self_value = next(iter(graph.inputs())).unique()
        paths: dict[int, str] = {self_value: ""}
        derived: dict[int, set[str]] = {}
        keep: dict[str, str] = {}
        for node in graph.nodes():
            kind = node.kind()
            if kind == "prim::GetAttr":
                base = paths.get(node.input().unique())
                if base is not None:
                    path = f"{base}.{node.s('name')}" if base else node.s("name")
                    out = node.output().unique()
                    paths[out] = path
                    if path in params:
                        derived[out] = {path}
                continue
            inputs = list(node.inputs())
            operands = _SCRIPT_OPS.get(kind)
            if operands is not None:
                for index in operands:
                    if index < len(inputs):
                        for path in derived.get(inputs[index].unique(), ()):
                            keep.setdefault(path, SCRIPT_REASON.format(op=kind))
            if node.blocks():  # control flow: its outputs are not followed
                continue
            sources: set[str] = set()
            complete = False
            for value in inputs:
                hit = derived.get(value.unique())
                if hit is not None:
                    sources |= hit
                    complete = True
                elif value.type().kind() in ("TensorType", "ListType", "TupleType"):
                    complete = False
                    break
            if complete:
                for out in node.outputs():
                    derived[out.unique()] = sources
    except Exception as error:  # any failure to read the graph: keep what can enter a product
        reason = f"TorchScript graph not readable ({type(error).__name__}: {error}): kept live, <=2-D"
        return {id(p): (p, reason) for p in params.values() if p.dim() <= 2}
    return {id(params[path]): (params[path], reason) for path, reason in keep.items()}
