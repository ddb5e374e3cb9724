"""sbpatch under torch.distributed: 2 gloo ranks on 127.0.0.1, one process group shared by every check.

A patched attack through ``DistributedDataParallel`` must communicate nothing (no gradient all-reduce, counted by a
DDP comm hook; no collective at all, counted by the profiler's ``gloo:*`` events) and need no DDP option, whatever
the kernel-preserving rules keep live; ranks may take different numbers of attack steps; training afterwards still
all-reduces and keeps the ranks equal. FSDP2 (``fully_shard``) on the same ranks: no gradient reduction during an
attack, and the next training step reduces exactly what it would have. Every rank run is bounded: ``timeout=`` in
``init_process_group``, and the launcher's whole session is killed when the test's own timeout expires.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from helpers import free_port, run_bounded

DDP_RANKS = r'''
import contextlib, datetime, json, os, sys
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


def work(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    torch.set_num_threads(1)
    import sbpatch, torchattacks
    from sbpatch.distributed import comm_free
    from helpers import data, tiny_cnn, tiny_vit

    sbpatch.enable("torchattacks")
    res = {}
    x, y = data(seed=10 + rank)  # each rank its own batch

    # --- a transformer: nn.MultiheadAttention's in-projections stay live (kernel-preserving rule) -------------
    vit = tiny_vit()
    ddp = DDP(vit)  # DDP's defaults: find_unused_parameters=False, broadcast_buffers=True
    n = counted(ddp)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)

    def train_step(xb):
        ddp.train()
        opt.zero_grad()
        F.cross_entropy(ddp(xb), y).backward()
        opt.step()
        ddp.eval()

    train_step(x)
    train_step(x)  # DDP rebuilds its buckets (two broadcasts) in the first forward after the first backward
    kept = [m.in_proj_weight for m in vit.modules() if isinstance(m, nn.MultiheadAttention)]
    res["kept_live"] = len(kept) > 0 and all(p.requires_grad for p in kept)
    params = list(vit.parameters())
    grads0 = [p.grad for p in params]
    flags0 = (ddp.require_backward_grad_sync, ddp.require_forward_param_sync)

    # identical to unpatched (same steps on both ranks: unpatched, each backward all-reduces)
    attack = torchattacks.CW(ddp, steps=3)
    torch.manual_seed(0)
    with sbpatch.paused():
        expected = attack(x, y)
    res["vit_shipped_allreduce"] = n["calls"] - 2
    for p, g in zip(params, grads0):
        p.grad = None if g is None else g.clone()
    saved = [p.grad for p in params]
    ddp.require_backward_grad_sync, ddp.require_forward_param_sync = flags0
    n["calls"] = 0
    torch.manual_seed(0)
    got = attack(x, y)
    res["vit_identical"] = torch.equal(expected, got)

    # different numbers of attack steps per rank: backward() (CW) and autograd.grad (PGD) attacks
    def uneven():
        torchattacks.CW(ddp, steps=1 + 3 * rank)(x, y)
        torchattacks.PGD(ddp, steps=1 + 4 * rank)(x, y)
        torchattacks.CW(nn.Sequential(nn.Identity(), ddp), steps=1 + 2 * rank)(x, y)  # DDP inside a wrapper

    res["vit_collectives"] = collectives(uneven)

    # the user's own attack code under frozen()
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
    train_step(got)
    train_step(xa)
    res["train_allreduce"] = n["calls"]
    res["params_changed"] = not torch.equal(before, flat(vit))
    res["params_equal"] = same_on_all_ranks(flat(vit))

    # --- a CNN with batch norm: DDP broadcasts rank 0's buffers in its forward --------------------------------
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
    res["buffers_diverged"] = not same_on_all_ranks(cnn.bn.running_mean)
    buffers = [b.clone() for b in cnn.buffers()]
    grads = [None if p.grad is None else p.grad.clone() for p in cnn.parameters()]
    sync0 = ddp2.require_forward_param_sync
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
    attack = torchattacks.CW(sharded, steps=2)
    torch.manual_seed(0)
    with sbpatch.paused():
        expected = attack(x, y)
    opt3.zero_grad()
    calls = sbpatch.status()["torchattacks"].calls
    torch.manual_seed(0)
    got, res["fsdp_collectives"] = collect(lambda: attack(x, y))
    res["fsdp_identical"] = torch.equal(expected, got) and sbpatch.status()["torchattacks"].calls > calls
    res["fsdp_flags_restored"] = [p.requires_grad for p in sharded.parameters()] == flags3
    res["fsdp_grads_untouched"] = all(p.grad is None for p in sharded.parameters())
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
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
'''


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ranks.py"
    script.write_text(textwrap.dedent(DDP_RANKS))
    out = run_bounded([sys.executable, str(script), str(free_port()), str(tmp)], timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_ddp_transformer_attack_identical_and_communication_free(ddp_ranks):
    for res in ddp_ranks:
        assert res["kept_live"]
        assert res["vit_shipped_allreduce"] > 0  # as shipped, every attack backward all-reduces
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
