"""Measuring one row: the four columns run interleaved (A B C D per repeat) after a warm-up, medians kept.

Columns: ``shipped`` (the library inside :func:`sbpatch.paused`), ``oneliner`` (paused, every parameter set to
``requires_grad=False`` by hand around the call), ``sbpatch`` (the library patched), ``limit`` (a hand-written PGD
with frozen parameters and ``torch.autograd.grad``, same steps). Before every call the seeds are reset and every
``param.grad`` is set to None, so each column starts from the same state.
"""

from __future__ import annotations

import statistics
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import sbpatch
from sbpatch import registry
from sbpatch.bench.workloads import Builder, Row
from sbpatch.compare import identical, seed_all

COLUMNS: tuple[str, ...] = ("shipped", "oneliner", "sbpatch", "limit")
LABELS: dict[str, str] = {"shipped": "as shipped", "oneliner": "one-liner", "sbpatch": "sbpatch", "limit": "limit"}
THRESHOLD = 0.98


@dataclass
class Settings:
    """What every row shares."""

    steps: int
    repeats: int
    warmup: int = 1
    memory: bool = False
    device: str = "cpu"
    metric: str = "wall"


@dataclass
class Column:
    """The timings of one column of one row (seconds), and its peak memory figure in bytes when measured."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    memory: int | None = None

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall) if self.wall else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")

    def median(self, metric: str) -> float:
        return self.wall_median if metric == "wall" else self.cpu_median


@dataclass
class RowResult:
    """A measured (or skipped) row."""

    library: str
    attack: str
    case: str | None
    note: str = ""
    columns: dict[str, Column] = field(default_factory=dict)
    identical: bool | None = None  # shipped and sbpatch outputs bitwise equal (same seed)
    leaves_grad: bool | None = None  # as shipped, the attack filled param.grad (it calls backward())
    engaged: bool | None = None  # the sbpatch call was really frozen (the library's counter moved)
    # as shipped gave the same output twice at the run's thread count (False: identity was judged at 1 thread)
    deterministic: bool | None = None

    @property
    def measured(self) -> bool:
        return bool(self.columns) and all(c.wall for c in self.columns.values())

    def ratio(self, column: str, metric: str) -> float:
        """Speed-up of ``column`` over as shipped (> 1 is faster)."""
        return self.columns["shipped"].median(metric) / self.columns[column].median(metric)

    def checks(self, metric: str) -> dict[str, bool | None]:
        """The issue's per-row targets: True met, False missed, None not applicable."""
        if not self.measured:
            return {}
        out: dict[str, bool | None] = {
            "sbpatch_vs_shipped": self.ratio("sbpatch", metric) >= THRESHOLD,
            "sbpatch_vs_oneliner": self.ratio("sbpatch", metric) >= THRESHOLD * self.ratio("oneliner", metric),
            "identical": self.identical,
        }
        mem = {k: c.memory for k, c in self.columns.items()}
        if mem["shipped"] is not None and mem["sbpatch"] is not None:
            out["memory_lower"] = mem["sbpatch"] < mem["shipped"] if self.leaves_grad else None
        return out


def column_calls(
    model: torch.nn.Module, call: Callable[[], Any], limit: Callable[[], Any]
) -> dict[str, Callable[[], Any]]:
    """The four zero-argument calls of one row."""
    params = list(model.parameters())

    def shipped() -> Any:
        with sbpatch.paused():
            return call()

    def oneliner() -> Any:
        flags = [p.requires_grad for p in params]
        with sbpatch.paused():
            [p.requires_grad_(False) for p in params]
            try:
                return call()
            finally:
                for p, f in zip(params, flags):
                    p.requires_grad_(f)

    return {"shipped": shipped, "oneliner": oneliner, "sbpatch": call, "limit": limit}


class SavedTensorMeter:
    """Peak bytes held for backward (``saved_tensors_hooks``), de-duplicated by storage, parameters excluded."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, list[int]] = {}  # storage pointer -> [refs, bytes]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.live[key]
            self.current -= entry[1]

    def pack(self, t: torch.Tensor) -> Any:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.exclude or key == 0:
            return t
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [0, storage.nbytes()]
            self.current += entry[1]
            self.peak = max(self.peak, self.current)
        entry[0] += 1
        holder = _Held(t)
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    @contextmanager
    def measuring(self) -> Iterator[None]:
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _reset(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def measure_memory(model: torch.nn.Module, fn: Callable[[], Any], device: str) -> int:
    """Peak memory of one call: the CUDA allocator's peak above the start, or on CPU the peak bytes saved for
    backward plus the ``.grad`` buffers the call left."""
    _reset(model)
    seed_all()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    meter = SavedTensorMeter(list(model.parameters()) + list(model.buffers()))
    with meter.measuring():
        fn()
    grads = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    _reset(model)
    return int(meter.peak + grads)


def run_row(
    row: Row,
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    builder: Builder,
    limit: Callable[[], Any],
    settings: Settings,
    tick: Callable[[], None] = lambda: None,
) -> RowResult:
    """Measure one row; a library whose unpatched call fails is returned with a note, not measured."""
    result = RowResult(row.library, row.attack, row.case, row.note)
    cuda = settings.device.startswith("cuda")
    try:
        sbpatch.enable(row.library)
    except sbpatch.SbpatchError as exc:
        result.note = f"sbpatch cannot enable {row.library}: {exc}"
    try:
        call = builder(model, x, y, settings.steps)
    except Exception as exc:
        result.note = f"library-broken (building): {type(exc).__name__}: {exc}"[:300]
        return result
    calls = column_calls(model, call, limit)
    counters = registry.counters(row.library)
    columns = {name: Column() for name in COLUMNS}

    def one(name: str, keep: Column | None) -> Any:
        _reset(model)
        seed_all()
        if cuda:
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        out = calls[name]()
        if cuda:
            torch.cuda.synchronize()
        w1, c1 = time.perf_counter(), time.process_time()
        if keep is not None:
            keep.wall.append(w1 - w0)
            keep.cpu.append(c1 - c0)
        tick()
        return out

    running = "shipped"
    try:
        for i in range(settings.warmup + settings.repeats):
            timed = i >= settings.warmup
            if cuda:  # round 0 (the identity check) with deterministic kernels; the rest as the user runs them
                deterministic_kernels(i == 0)
            # The warm-up round runs in the canonical order (shipped first: the reference output); timed rounds
            # rotate the order so no column always follows the same neighbour.
            shift = 0 if i == 0 else i % len(COLUMNS)
            for name in COLUMNS[shift:] + COLUMNS[:shift]:
                running = name
                if i == 0 and name == "sbpatch":
                    before = counters.calls
                out = one(name, columns[name] if timed else None)
                if i == 0:
                    if name == "shipped":
                        reference = out
                        result.leaves_grad = any(p.grad is not None for p in model.parameters())
                        # the control: as shipped against itself, so a library that is not deterministic here is
                        # never reported as sbpatch's difference
                        result.deterministic = identical(reference, one("shipped", None))
                    elif name == "sbpatch":
                        result.engaged = counters.calls > before
                        result.identical = identical(reference, out)
                elif i == 1 and name == "sbpatch" and not cuda and result.identical:
                    # the second call: with the same arguments it may skip the operand mode (README, the rules)
                    result.identical = identical(reference, out)
    except Exception as exc:  # as shipped failing is the library's bug; any other column failing is not
        label = "library-broken" if running == "shipped" else f"the {running} column failed"
        result.note = f"{label}: {type(exc).__name__}: {exc}"[:300]
        _reset(model)
        return result
    finally:
        if cuda:
            deterministic_kernels(False)
    if not result.deterministic:
        if cuda:  # differs from itself even with deterministic kernels: nothing to compare against
            result.identical = None
            result.note = ("as shipped differs from itself with deterministic CUDA kernels (same seeds): the library "
                           "is not deterministic here, so identity cannot be judged")
        else:
            result.identical = _identical_single_thread(calls, one, result)
    if settings.memory:
        for name in COLUMNS:
            columns[name].memory = measure_memory(model, calls[name], settings.device)
            tick()
    _reset(model)
    result.columns = columns
    if result.engaged is False and not result.note:
        result.note = "sbpatch did not freeze this call (library not patched or model not located)"
    return result


_user_deterministic: tuple[bool, bool, bool] | None = None


def deterministic_kernels(on: bool) -> None:
    """CUDA: deterministic kernels on (cuDNN's deterministic algorithms, ``use_deterministic_algorithms`` warning
    only), or the user's settings back. Atomics-based CUDA kernels (cuDNN convolution backward, efficient attention
    backward) make a model differ from itself from one call to the next; the identity check must not read that as
    sbpatch's difference. The timed rounds run with the user's settings."""
    global _user_deterministic
    if on:
        if _user_deterministic is None:
            _user_deterministic = (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
                                   torch.is_deterministic_algorithms_warn_only_enabled())
        torch.backends.cudnn.deterministic = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.use_deterministic_algorithms(True, warn_only=True)
    elif _user_deterministic is not None:
        cudnn, enabled, warn_only = _user_deterministic
        torch.backends.cudnn.deterministic = cudnn
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        _user_deterministic = None


def _identical_single_thread(calls: dict[str, Callable[[], Any]], one: Callable[..., Any], result: RowResult) -> Any:
    """As shipped differed from itself at this thread count (torchattacks DeepFool at 2 threads on an Intel Xeon:
    the library, not sbpatch): compare like with like at one thread, where it is deterministic, and say so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with sbpatch.paused():
            reference = one("shipped", None)
            control = one("shipped", None)
        patched = one("sbpatch", None)
    finally:
        torch.set_num_threads(threads)
    if not identical(reference, control):
        result.note = (f"as shipped differs from itself at {threads} and at 1 thread (same seeds): the library is not "
                       "deterministic here, so identity cannot be judged")
        return None
    result.note = (f"as shipped differs from itself at {threads} threads (same seeds; the library is not "
                   "deterministic there): identity checked at 1 thread")
    return identical(reference, patched)


def calls_per_row(settings: Settings) -> int:
    """How many attack calls one row makes (for the progress bar)."""
    return len(COLUMNS) * (settings.warmup + settings.repeats + (1 if settings.memory else 0)) + 1
