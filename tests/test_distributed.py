"""sbpatch under torch.distributed: 2 gloo ranks on 127.0.0.1, one process group shared by every check.

A patched attack through ``DistributedDataParallel`` must communicate nothing (no gradient all-reduce, counted by a
DDP comm hook; no collective at all, counted by the profiler's ``gloo:*`` events) and need no DDP option, whatever
the kernel-preserving rules keep live; ranks may take different numbers of attack steps; training afterwards still
all-reduces and keeps the ranks equal. FSDP2 (``fully_shard``) on the same ranks: no gradient reduction during an
attack, and the next training step reduces exactly what it would have. Every rank run is bounded: ``timeout=`` in
``init_process_group`` (per collective), and the launcher's whole session is killed when the test's own bound
expires; either way the failure says it was a timeout, and which rank was at which step (each rank records its
current step in ``rank<r>.step`` and its error in ``rank<r>.error``).

Ranks must issue the same collectives in the same order: an unpatched attack through DDP all-reduces in every
backward and an FSDP forward all-gathers, so where the number of attack steps matters the ranks attack one shared
batch (``xs, ys``): torchattacks' CW returns early when its loss rises, which depends on the data (with each rank's
own batch, one rank took 2 steps and the other 3, and every later collective paired with the wrong one).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
from helpers import free_port, run_bounded

# Sized for a loaded 2-core machine: the whole rank run takes ~5-10 s quiet and ~20-30 s beside two to four CPU hogs,
# and no rank ever waits for the other longer than the whole run, so a collective waiting COLLECTIVE_TIMEOUT_S is a
# mismatch (or a stuck rank), not slowness. RUN_TIMEOUT_S bounds the test and leaves a collective timeout the time
# to surface first, with its rank and step.
COLLECTIVE_TIMEOUT_S = 150
RUN_TIMEOUT_S = 240

DDP_RANKS = r'''
import contextlib, datetime, json, os, sys, time
import torch, torch.distributed as dist, torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP


def counted(ddp):
    """A comm hook that counts the gradient all-reduces (calls, bytes) and then does them."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    n = {"calls": 0, "bytes": 0}

    def hook(state, bucket):
        buf = bucket.buffer()
        n["calls"] += 1
        n["bytes"] += buf.numel() * buf.element_size()
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return n


def collect(fn):
    """(fn(), the names of the gloo collectives it issued), seen by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, sorted(e.name for e in prof.events() if e.name.startswith("gloo:"))


def collectives(fn):
    return collect(fn)[1]


def same_on_all_ranks(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


STEP = {"name": "starting", "path": None, "t0": time.monotonic()}


def step(name):
    """Record what this rank is doing now (the test reports it if the run fails or times out)."""
    STEP["name"] = name
    with open(STEP["path"], "w") as f:
        f.write(f"{name!r} (at {time.monotonic() - STEP['t0']:.1f} s)")


def main(rank, port, out, timeout):
    STEP["path"] = os.path.join(out, f"rank{rank}.step")
    step("starting")
    try:
        work(rank, port, out, timeout)
    except BaseException as exc:
        text = f"{type(exc).__name__}: {exc}"
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            json.dump({"step": STEP["name"], "timeout": "timed out" in text.lower(), "error": text[-3000:]}, f)
        raise


def work(rank, port, out, timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    step("init_process_group")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=timeout))
    torch.set_num_threads(1)
    import sbpatch, torchattacks
    from sbpatch.distributed import comm_free
    from helpers import data, tiny_cnn, tiny_vit

    sbpatch.enable("torchattacks")
    res = {}
    x, y = data(seed=10 + rank)  # each rank its own batch
    # one batch on every rank, for attacks whose number of steps must agree between the ranks (unpatched through
    # DDP, and FSDP): CW returns early when its loss rises, which depends on the data
    xs, ys = data(seed=10)

    # --- a transformer: nn.MultiheadAttention's in-projections stay live (kernel-preserving rule) -------------
    step("vit: DDP and training")
    vit = tiny_vit()
    ddp = DDP(vit)  # DDP's defaults: find_unused_parameters=False, broadcast_buffers=True
    n = counted(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

    def train_step(xb, yb):
        ddp.train()
        opt.zero_grad()
        F.cross_entropy(ddp(xb), yb).backward()
        opt.step()
        ddp.eval()

    train_step(x, y)
    train_step(x, y)  # DDP rebuilds its buckets (two broadcasts) in the first forward after the first backward
    kept = [m.in_proj_weight for m in vit.modules() if isinstance(m, nn.MultiheadAttention)]
    res["kept_live"] = len(kept) > 0 and all(p.requires_grad for p in kept)
    params = list(vit.parameters())
    grads0 = [p.grad for p in params]
    flags0 = (ddp.require_backward_grad_sync, ddp.require_forward_param_sync)

    # identical to unpatched (unpatched, each backward all-reduces: the same batch on both ranks, so the same steps)
    step("vit: CW unpatched (all-reduces)")
    attack = torchattacks.CW(ddp, steps=3)
    torch.manual_seed(0)
    with sbpatch.paused():
        expected = attack(xs, ys)
    res["vit_shipped_allreduce"] = n["calls"] - 2
    for p, g in zip(params, grads0):
        p.grad = None if g is None else g.clone()
    saved = [p.grad for p in params]
    ddp.require_backward_grad_sync, ddp.require_forward_param_sync = flags0
    n["calls"] = 0
    step("vit: CW patched")
    torch.manual_seed(0)
    got = attack(xs, ys)
    res["vit_identical"] = torch.equal(expected, got)

    # different numbers of attack steps per rank: backward() (CW) and autograd.grad (PGD) attacks
    def uneven():
        torchattacks.CW(ddp, steps=1 + 3 * rank)(x, y)
        torchattacks.PGD(ddp, steps=1 + 4 * rank)(x, y)
        torchattacks.CW(nn.Sequential(nn.Identity(), ddp), steps=1 + 2 * rank)(x, y)  # DDP inside a wrapper

    step("vit: uneven attacks (patched)")
    res["vit_collectives"] = collectives(uneven)

    # the user's own attack code under frozen()
    step("vit: own attack under frozen() (uneven)")
    with sbpatch.frozen(ddp):  # frozen() accepts the DDP wrapper itself
        res["live_inside"] = [name for name, p in vit.named_parameters() if p.requires_grad]
        xa = x.clone().requires_grad_(True)
        for _ in range(2 + 3 * rank):
            F.cross_entropy(ddp(xa), y).backward()
            xa = (xa + 0.01 * xa.grad.sign()).detach().requires_grad_(True)
    res["vit_attack_allreduce"] = n["calls"]
    res["grads_kept"] = all(p.grad is s and (s is None or torch.equal(s, g)) for p, s, g in zip(params, saved, grads0))
    res["flags_restored"] = (ddp.require_backward_grad_sync, ddp.require_forward_param_sync) == flags0
    res["requires_grad_restored"] = [p.requires_grad for p in params] == [p is not vit.heads.head.bias for p in params]

    before = flat(vit)
    step("vit: training after the attacks (all-reduces)")
    train_step(got, ys)
    train_step(xa, y)
    res["train_allreduce"] = n["calls"]
    res["params_changed"] = not torch.equal(before, flat(vit))
    step("vit: params_equal (all_gather)")
    res["params_equal"] = same_on_all_ranks(flat(vit))

    # --- a CNN with batch norm: DDP broadcasts rank 0's buffers in its forward --------------------------------
    step("cnn: DDP and training")
    cnn = tiny_cnn()
    ddp2 = DDP(cnn)
    n2 = counted(ddp2)
    opt2 = torch.optim.SGD(ddp2.parameters(), lr=0.1)
    ddp2.train()
    opt2.zero_grad()
    F.cross_entropy(ddp2(x), y).backward()  # running statistics now differ between the ranks
    opt2.step()
    with torch.no_grad():  # and far enough apart to change the attack's result
        cnn.bn.running_mean.add_(rank)
        cnn.bn.running_var.mul_(1 + 3 * rank)
    ddp2.eval()
    step("cnn: buffers_diverged (all_gather)")
    res["buffers_diverged"] = not same_on_all_ranks(cnn.bn.running_mean)
    buffers = [b.clone() for b in cnn.buffers()]
    grads = [None if p.grad is None else p.grad.clone() for p in cnn.parameters()]
    sync0 = ddp2.require_forward_param_sync
    step("cnn: PGD unpatched (fixed steps; broadcasts)")
    attack = torchattacks.PGD(ddp2, eps=0.1, alpha=0.02, steps=3)
    torch.manual_seed(0)
    with sbpatch.paused():
        expected = attack(x, y)  # its first forward gave every rank rank 0's buffers
    for b, b0 in zip(cnn.buffers(), buffers):
        b.copy_(b0)
    for p, g in zip(cnn.parameters(), grads):
        p.grad = g
    ddp2.require_forward_param_sync = sync0
    n2["calls"] = 0
    step("cnn: PGD patched, uneven CW (one broadcast each)")
    torch.manual_seed(0)
    res["cnn_identical"] = torch.equal(expected, attack(x, y))
    res["cnn_collectives"] = collectives(lambda: torchattacks.CW(ddp2, steps=1 + 3 * rank)(x, y))
    res["cnn_attack_allreduce"] = n2["calls"]
    res["cnn_sync_restored"] = ddp2.require_forward_param_sync == sync0

    # --- comm_free itself, around a model frozen by hand except an in-projection --------------------------------
    def partly_frozen_steps(model, context):
        for name, p in model.module.named_parameters():
            p.requires_grad_("in_proj_weight" in name)
        try:
            with context:
                for _ in range(2 + rank):
                    F.cross_entropy(model(x), y).backward()
            return ""
        except RuntimeError as exc:
            return str(exc)[:200]

    # nested and failing uses restore DDP's flags exactly once, at the outermost exit
    step("comm_free: nested and partly frozen")
    flags = (ddp.require_backward_grad_sync, ddp.require_forward_param_sync)
    inside = []
    try:
        with comm_free([ddp]):
            with comm_free([ddp, vit]):
                inside.append((ddp.require_backward_grad_sync, ddp.require_forward_param_sync))
            inside.append((ddp.require_backward_grad_sync, ddp.require_forward_param_sync))
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    res["nested_flags"] = [list(f) for f in inside] == [[False, False]] * 2
    res["nested_restored"] = (ddp.require_backward_grad_sync, ddp.require_forward_param_sync) == flags
    res["plain_module_null"] = type(comm_free([vit, cnn])).__name__ == "nullcontext"

    bare = DDP(tiny_vit())
    n3 = counted(bare)
    res["comm_free_error"] = partly_frozen_steps(bare, comm_free([bare]))
    res["comm_free_allreduce"] = n3["calls"]
    res["bare_error"] = partly_frozen_steps(DDP(tiny_vit()), contextlib.nullcontext())

    # --- FSDP2: fully_shard on CPU/gloo, the same transformer ---------------------------------------------------
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    step("fsdp: fully_shard and training")
    mesh = init_device_mesh("cpu", (2,))
    sharded = tiny_vit()
    for layer in sharded.encoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    opt3 = torch.optim.SGD(sharded.parameters(), lr=0.1)

    def fsdp_grads():
        opt3.zero_grad()
        sharded.train()
        F.cross_entropy(sharded(x), y).backward()
        sharded.eval()
        return [None if p.grad is None else p.grad.to_local().clone() for p in sharded.parameters()]

    reference = fsdp_grads()  # also FSDP's lazy initialisation
    opt3.zero_grad()
    res["fsdp_dtensor"] = type(next(sharded.parameters())).__name__
    flags3 = [p.requires_grad for p in sharded.parameters()]
    # each forward all-gathers: the same batch on both ranks, so the same number of CW steps
    step("fsdp: CW unpatched")
    attack = torchattacks.CW(sharded, steps=2)
    torch.manual_seed(0)
    with sbpatch.paused():
        expected = attack(xs, ys)
    opt3.zero_grad()
    calls = sbpatch.status()["torchattacks"].calls
    step("fsdp: CW patched")
    torch.manual_seed(0)
    got, res["fsdp_collectives"] = collect(lambda: attack(xs, ys))
    res["fsdp_identical"] = torch.equal(expected, got) and sbpatch.status()["torchattacks"].calls > calls
    res["fsdp_flags_restored"] = [p.requires_grad for p in sharded.parameters()] == flags3
    res["fsdp_grads_untouched"] = all(p.grad is None for p in sharded.parameters())
    step("fsdp: training after the attack")
    res["fsdp_train_collectives"] = collectives(lambda: res.setdefault("fsdp_after", fsdp_grads()))
    after = res.pop("fsdp_after")
    res["fsdp_same_training_grads"] = all(
        a is b if a is None or b is None else torch.equal(a, b) for a, b in zip(reference, after)
    )
    before = [p.detach().to_local().clone() for p in sharded.parameters()]
    opt3.step()
    res["fsdp_updated"] = any(not torch.equal(a, p.detach().to_local()) for a, p in zip(before, sharded.parameters()))

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    step("final barrier")
    dist.barrier()
    dist.destroy_process_group()
    step("done")


if __name__ == "__main__":
    mp.spawn(main, args=(int(sys.argv[1]), sys.argv[2], float(sys.argv[3])), nprocs=2)
'''


def _rank_report(tmp, rank: int) -> tuple[str, dict | None]:
    """(the step rank ``rank`` last recorded, its recorded error or None)."""
    step_file, error_file = tmp / f"rank{rank}.step", tmp / f"rank{rank}.error"
    step = step_file.read_text() if step_file.exists() else "never started"
    return step, json.loads(error_file.read_text()) if error_file.exists() else None


def _failure(tmp, killed: str | None, stderr: str) -> str:
    """The fixture's failure message: first whether it was a timeout, which rank and at which step."""
    reports = [_rank_report(tmp, r) for r in range(2)]
    timed_out = [r for r, (_, err) in enumerate(reports) if err and err["timeout"]]
    if killed is not None:
        head = f"TIMEOUT: the 2-rank run passed the test's {RUN_TIMEOUT_S} s bound and was killed"
    elif timed_out:
        r = timed_out[0]
        head = (
            f"TIMEOUT: rank {r} waited {COLLECTIVE_TIMEOUT_S} s for a collective at step {reports[r][1]['step']!r} "
            "(the ranks issued different collectives, or the other rank was stuck)"
        )
    else:
        head = "the 2-rank run failed (not a timeout)"
    lines = [head]
    for r, (step, err) in enumerate(reports):
        if err is None:
            lines.append(f"  rank {r}: last step {step}; no error of its own (stopped by the launcher)")
        else:
            kind = "TIMED OUT" if err["timeout"] else "failed"
            lines.append(f"  rank {r}: {kind} at step {step}: {err['error'][-800:]}")
    return "\n".join(lines) + "\n--- launcher output (tail) ---\n" + (killed or stderr)[-3000:]


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ranks.py"
    script.write_text(textwrap.dedent(DDP_RANKS))
    args = [sys.executable, str(script), str(free_port()), str(tmp), str(COLLECTIVE_TIMEOUT_S)]
    env = None  # gloo on loopback (Linux's lo), whatever the host name resolves to, unless the user chose
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.isdir("/sys/class/net/lo"):
        env = {"GLOO_SOCKET_IFNAME": "lo"}
    killed = None
    try:
        out = run_bounded(args, timeout=RUN_TIMEOUT_S, env=env)
    except AssertionError as exc:  # run_bounded: past the bound it killed the whole session
        killed = str(exc)
    if killed is not None or out.returncode != 0:
        pytest.fail(_failure(tmp, killed, "" if killed else out.stderr), pytrace=False)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_transformer_attack_identical_and_communication_free(ddp_ranks):
    for res in ddp_ranks:
        assert res["kept_live"]
        assert res["vit_shipped_allreduce"] > 0  # as shipped, every attack backward all-reduces
    # the same batch, the same CW steps: both ranks all-reduced equally often (else the collectives misalign)
    assert ddp_ranks[0]["vit_shipped_allreduce"] == ddp_ranks[1]["vit_shipped_allreduce"]
    for res in ddp_ranks:
        assert res["vit_identical"]
        assert res["vit_collectives"] == []  # uneven CW, PGD, CW through a wrapper: no collective of any kind
        assert res["vit_attack_allreduce"] == 0
        assert res["flags_restored"] and res["requires_grad_restored"]
        assert res["live_inside"] == ["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"]


def test_ddp_kept_weights_grads_set_aside(ddp_ranks):
    """Live (kept) weights accumulate gradients inside no_sync; the freeze ledger puts their .grad back."""
    for res in ddp_ranks:
        assert res["grads_kept"]


def test_ddp_training_after_attacks_still_all_reduces(ddp_ranks):
    for res in ddp_ranks:
        assert res["train_allreduce"] >= 2
        assert res["params_changed"] and res["params_equal"]


def test_ddp_buffers_broadcast_once_at_entry_keeps_results_identical(ddp_ranks):
    """With batch norm, every rank attacks with rank 0's buffers, as unpatched; the broadcast happens once per
    attack call, whatever the number of steps (rank 0: 1 step, rank 1: 4 steps)."""
    assert [(res["buffers_diverged"], res["cnn_identical"]) for res in ddp_ranks] == [(True, True)] * 2
    for res in ddp_ranks:
        assert res["cnn_collectives"] and set(res["cnn_collectives"]) == {"gloo:broadcast"}
        assert res["cnn_attack_allreduce"] == 0 and res["cnn_sync_restored"]
    assert ddp_ranks[0]["cnn_collectives"] == ddp_ranks[1]["cnn_collectives"]


def test_comm_free_lets_a_partly_frozen_ddp_model_run(ddp_ranks):
    """Why comm_free is needed: a DDP model frozen except some weights fails on its next forward unless built with
    find_unused_parameters=True; inside comm_free it runs (uneven steps) and reduces nothing."""
    for res in ddp_ranks:
        assert "Expected to have finished reduction" in res["bare_error"]
        assert res["comm_free_error"] == "" and res["comm_free_allreduce"] == 0
        assert res["nested_flags"] and res["nested_restored"] and res["plain_module_null"]


def test_fsdp2_attack_identical_without_gradient_reduction(ddp_ranks):
    """fully_shard on CPU/gloo: identical to unpatched; the attack only all-gathers (FSDP's way of getting the
    weights: ranks run the same number of forwards), never reduces; flags restored on the DTensor parameters; the
    next training step reduces exactly the gradients it would have without the attack, and updates."""
    for res in ddp_ranks:
        assert res["fsdp_dtensor"] == "DTensor"
        assert res["fsdp_identical"] and res["fsdp_flags_restored"] and res["fsdp_grads_untouched"]
        assert res["fsdp_collectives"] and set(res["fsdp_collectives"]) == {"gloo:all_gather"}
        assert any("reduce" in name for name in res["fsdp_train_collectives"])
        assert res["fsdp_same_training_grads"] and res["fsdp_updated"]
    assert ddp_ranks[0]["fsdp_collectives"] == ddp_ranks[1]["fsdp_collectives"]  # the same forwards on both ranks
