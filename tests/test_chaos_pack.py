"""Deep Chaos strategy "slice" with `slice_form = "pack"`: each sliced projection trains a packed
copy of its kept rows / columns for one block. It must be the gather form's network (same loss,
same gradients of the kept entries), leave entries that are not kept exactly where they were,
carry the kept entries' AdamW moments across blocks, and put the trained values back into the
full model before it is measured, saved or handed back."""

import copy
import json
import os
import socket

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

from underpar import config as cfglib  # noqa: E402
from underpar.config import validate  # noqa: E402
from underpar.errors import ConfigError  # noqa: E402
from underpar.model import surgery  # noqa: E402
from underpar.model.sliced import PackedLinear, SlicedLayer, _gather  # noqa: E402
from underpar.tracks import finetune, finetune_heldout  # noqa: E402
from underpar.tracks.chaos import ChaosConfig, ChaosController  # noqa: E402
from test_chaos import ARCHS, SMALL_GROUPS, find_block, tiny, tokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WANTED = ["both", "attn", "mlp", "dead"]


def controller(model, form, **changes):
    cfg = ChaosConfig(strategy="slice", slice_form=form, seed=4, stub_std=0.0, **SMALL_GROUPS, **changes)
    return ChaosController(model, cfg)


def kept_mask(full, rows, cols):
    """True on the entries of `full` that a packed copy holds."""
    mask = torch.zeros(full.shape, dtype=torch.bool)
    r = torch.arange(full.shape[0]) if rows is None else rows
    if full.dim() == 1:
        mask[r] = True
    else:
        mask[r[:, None], torch.arange(full.shape[1]) if cols is None else cols] = True
    return mask


@pytest.mark.parametrize("arch", ARCHS)  # qwen2: q/k/v biases are packed too
def test_packed_forward_and_backward_equal_the_gather_form(arch):
    compare_packed_and_gathered(arch, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_gathered_on_cuda(arch):
    compare_packed_and_gathered(arch, "cuda")


def compare_packed_and_gathered(arch, device):
    base = tiny(arch, seed=5).train().to(device)
    x = tokens(seed=3, seq_len=12).to(device)
    names = [n for n, _ in base.named_parameters()]
    losses, grads = {}, {}
    for form in ("gather", "pack"):
        model = copy.deepcopy(base)
        ctl = controller(model, form)
        ctl.begin_block(find_block(ctl.scheduler, WANTED).block)
        loss = model(x, labels=x).loss
        loss.backward()
        losses[form] = loss.detach()
        grads[form] = {n: None if p.grad is None else p.grad.clone() for n, p in zip(names, ctl.params)}
        if form == "pack":
            packed = [m for m in model.model.layers if isinstance(m, SlicedLayer)]
            assert packed and all(m.packed is not None for m in packed)
            parts = [(names[[id(q) for q in ctl.params].index(id(full))], p.grad, rows, cols)
                     for p, full, rows, cols in ctl.packs.parts()]
            assert any(r is not None for _, _, r, _ in parts) and any(c is not None for _, _, _, c in parts)
            assert any(n.endswith("q_proj.bias") for n, *_ in parts) == (arch == "qwen2")
            trains = {id(p) for p in ctl.trainable_parameters()}
            assert all(id(p) in trains for p, *_ in ctl.packs.parts())
            assert not any(full.requires_grad for _, full, *_ in ctl.packs.parts())
        ctl.end()
    torch.testing.assert_close(losses["pack"], losses["gather"], rtol=1e-6, atol=0)
    for name, g, rows, cols in parts:  # the packed gradients are the kept entries of the gather form's
        assert grads["pack"][name] is None, name  # the full weight behind a copy gets none
        torch.testing.assert_close(g, _gather(grads["gather"][name], rows, cols), rtol=1e-5, atol=1e-7, msg=name)
    packed_names = {n for n, *_ in parts}
    others = [n for n in names if n not in packed_names and grads["gather"][n] is not None]
    assert len(others) > 10
    for name in others:  # norms, embeddings, sacred layers: the same gradients
        torch.testing.assert_close(grads["pack"][name], grads["gather"][name], rtol=1e-5, atol=1e-7, msg=name)


def train(model, ctl, steps, optimizer, on_block=None):
    """The finetune loop's calls: begin, forward, backward, clip, step; `on_block(step)` right
    after each new block begins."""
    for step in range(steps):
        if ctl.begin(step, optimizer) is not None and on_block is not None:
            on_block(step)
        x = tokens(seed=10 + step, seq_len=10)
        model(x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(ctl.trainable_parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_one_block_of_fresh_adamw_equals_the_gather_form():
    """Zero weight decay and fresh moments: zero gradients do not move the gather form's
    entries that are not kept, so after one block both forms hold the same full model; the
    pack form's entries that are not kept are bit-identical to their values before the block.
    (Llama: Qwen2's key bias has a zero gradient up to rounding, which Adam's normalization
    turns into rounding-driven steps that differ between any two summation orders.)"""
    base = tiny("llama", seed=2).train()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    after, parts = {}, []
    for form in ("gather", "pack"):
        model = copy.deepcopy(base)
        names = {id(p): n for n, p in model.named_parameters()}
        ctl = controller(model, form, sticky_interval=3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        train(model, ctl, 3, optimizer, on_block=lambda _: parts.extend(
            (names[id(full)], rows, cols) for _, full, rows, cols in ctl.packs.parts()))
        ctl.end(optimizer)
        assert len(optimizer.param_groups) == 1 and all(id(p) in names for p in optimizer.state)
        after[form] = {n: p.detach() for n, p in model.named_parameters()}
    assert len(parts) > 10  # pack's copies
    for name, p in after["pack"].items():
        torch.testing.assert_close(p, after["gather"][name], rtol=1e-5, atol=1e-6, msg=name)
    for name, rows, cols in parts:
        mask = kept_mask(before[name], rows, cols)
        changed = after["pack"][name] != before[name]
        assert not changed[~mask].any(), name
        assert changed[mask].any() or name.endswith("bias"), name


def test_entries_not_kept_never_move_and_moments_carry_across_blocks():
    """Three blocks with weight decay: the gather form's momentum and decay move entries it did
    not keep; the pack form leaves them bit-identical, and the kept entries' moments go to the
    full parameters' state at each block's end and come back at the next."""
    base = tiny("llama", seed=3).train()
    for form in ("gather", "pack"):
        model = copy.deepcopy(base)
        ctl = controller(model, form, sticky_interval=2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        blocks, carried = [], []  # (the block's sliced (full, rows, cols), full weights at its start)

        def on_block(step, ctl=ctl, optimizer=optimizer, blocks=blocks, model=model, carried=carried):
            if blocks:
                check_block(form, *blocks[-1])
            layers = [m for m in model.model.layers if isinstance(m, SlicedLayer)]
            sliced = [(lin, rows, cols) for m in layers for lin, rows, cols in m.projections().values()]
            if form == "pack":
                assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1] is ctl.packs.group
                for packed, full, rows, cols in ctl.packs.parts():
                    state = optimizer.state.get(packed)  # gathered from the full parameter's, where it has one
                    if optimizer.state.get(full):
                        assert torch.equal(state["exp_avg"], _gather(optimizer.state[full]["exp_avg"], rows, cols))
                        carried.append(full)
            blocks.append((sliced, {lin: lin.weight.detach().clone() for lin, _, _ in sliced}))

        train(model, ctl, 6, optimizer, on_block)
        if form == "pack":
            ends = [(packed, full, rows, cols, optimizer.state[packed]["exp_avg"].clone())
                    for packed, full, rows, cols in ctl.packs.parts()]
        ctl.end(optimizer)
        check_block(form, *blocks[-1])
        assert len(blocks) == 3 and (len(carried) > 0) == (form == "pack")
        if form == "pack":
            assert len(optimizer.param_groups) == 1
            for packed, full, rows, cols, exp_avg in ends:
                assert packed not in optimizer.state
                assert torch.equal(_gather(optimizer.state[full]["exp_avg"], rows, cols), exp_avg)


def check_block(form, sliced, start):
    unkept_moved = kept_moved = 0
    for lin, rows, cols in sliced:
        mask = kept_mask(lin.weight, rows, cols)
        changed = lin.weight.detach() != start[lin]
        kept_moved += int(changed[mask].sum())
        unkept_moved += int(changed[~mask].sum())
    assert kept_moved > 0
    if form == "pack":
        assert unkept_moved == 0
    else:  # zero gradients: weight decay (and momentum) still move them
        assert unkept_moved > 0


@pytest.mark.parametrize("mode", ["keep", "reset", "offload"])
def test_optimizer_state_modes_with_packed_copies(mode):
    """keep: the copies' moments land in the full parameters' state; offload: there too, on the
    host side (marked offloaded while the full weight sits out); reset: they last one block."""
    model = tiny("llama", seed=1).train()
    ctl = controller(model, "pack", sticky_interval=1, optimizer_state=mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ended, checked = [], []

    def on_block(step):
        if ended:
            for packed, full, rows, cols in ended[-1]:
                state = optimizer.state.get(full)
                if full.requires_grad:  # trains at full width in this block: not what is checked
                    continue
                checked.append(full)
                assert packed not in optimizer.state
                if mode == "reset":
                    assert not state
                else:
                    assert state and state["exp_avg"].abs().sum() > 0
                    assert (full in ctl._offloaded) == (mode == "offload")
        ended.append(ctl.packs.parts())

    train(model, ctl, 3, optimizer, on_block)
    ctl.end(optimizer)
    assert checked and not ctl._offloaded and len(optimizer.param_groups) == 1
    assert all(p.requires_grad for p in model.parameters())


def test_full_model_is_restored_before_measuring_and_at_the_end():
    """The held-out loss of the full model (inside `restored()`) sees the trained packed values,
    the block goes on with the same copies after it, and `end` writes them back too."""
    model = tiny("qwen2", seed=4).train()
    x = tokens(seed=2, seq_len=12)
    heldout = finetune_heldout.HeldOut([{"input_ids": x, "labels": x}], torch.device("cpu"))
    untrained = heldout.loss(model.eval())
    model.train()
    ctl = controller(model, "pack", sticky_interval=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, ctl, 3, optimizer)
    group, copies = ctl.packs.group, [p for p, *_ in ctl.packs.parts()]
    with torch.no_grad():
        trained_net = model(x).logits
    measured = heldout.measure(ctl)
    assert measured[finetune_heldout.FULL] != pytest.approx(untrained, rel=1e-4)
    assert ctl.packs.group is group and [p for p, *_ in ctl.packs.parts()] == copies
    with torch.no_grad():
        assert torch.equal(model(x).logits, trained_net)  # the same block, the same copies
        with ctl.restored():
            for packed, full, rows, cols in ctl.packs.parts():
                assert torch.equal(_gather(full, rows, cols), packed)
    train(model, ctl, 2, optimizer)  # steps 0, 1 of the same block: no new block
    finals = [(full, rows, cols, packed.detach().clone()) for packed, full, rows, cols in ctl.packs.parts()]
    ctl.end(optimizer)
    assert not surgery.is_hoisted(model) and not ctl.packs
    for full, rows, cols, packed in finals:
        assert torch.equal(_gather(full, rows, cols), packed)
    full_after = heldout.loss(model.eval())
    assert full_after != pytest.approx(measured[finetune_heldout.FULL], rel=1e-6)  # the last two steps count


def test_apply_and_undo_restore_exactly():
    model = tiny("qwen2").train()
    x = tokens()
    with torch.no_grad():
        ref = model(x).logits
    before = [p.detach().clone() for p in model.parameters()]
    ctl = controller(model, "pack")
    ctl.begin_block(find_block(ctl.scheduler, WANTED).block)
    assert any(isinstance(m, PackedLinear) for m in model.modules())
    with torch.no_grad():
        out = model(x).logits
        assert not torch.equal(out, ref)
        with ctl.restored():
            assert torch.equal(model(x).logits, ref)
        assert torch.equal(model(x).logits, out)
    ctl.end()
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_pack_needs_the_slice_strategy(tmp_path):
    validate(ChaosConfig(strategy="slice", slice_form="pack"))
    for strategy in ("hoist", "mask"):
        with pytest.raises(ConfigError, match=f"method.slice_form = 'pack' applies to method.strategy = 'slice' only "
                                              f"\\(strategy '{strategy}' slices no weights\\)"):
            validate(ChaosConfig(strategy=strategy, slice_form="pack"))
    with pytest.raises(ConfigError, match="slice_form"):
        validate(ChaosConfig(strategy="slice", slice_form="copy"))
    cfg = cfglib.resolve("finetune", "chaos-qwen2.5-3b", ["method=chaos", "method.strategy=slice",
                                                          "method.slice_form=pack", "method.hoist_identity=true",
                                                          "method.optimizer_state=reset"])
    assert cfg.method.slice_form == "pack" and cfg.method.optimizer_state == "reset"


def run_config(root, *sets):
    return cfglib.resolve("finetune", None, [
        "model.architecture=tiny-llama", "data.max_length=16", "train.steps=4", "train.micro_batch_size=1",
        "train.grad_accum_steps=2", "train.device=cpu", "optim.lr=3e-3", "method=chaos", "method.strategy=slice",
        "method.slice_form=pack", "method.sticky_interval=2", "method.mlp_group_size=32",
        "method.hidden_group_size=16", "method.sacred_layers=[0,-1]", f"train.runs_root={root}", *sets])


def test_finetune_run_with_packed_copies(tmp_path):
    """The loop end to end: the copies join AdamW each block, held-out rows are measured."""
    summary = finetune.run(run_config(tmp_path, "eval.heldout_examples=2"))
    assert summary.steps == 4 and summary.heldout_loss is not None and summary.heldout_loss_trained_net is not None


def _ddp_worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        finetune.run(run_config(root, "eval.heldout_examples=0"))
    finally:
        torch_dist.destroy_process_group()


def test_ddp_reduces_the_packed_copies(tmp_path):
    """Two gloo processes (DDP wraps what trains: the copies) give one process's losses; a copy
    that DDP did not reduce would train on half the batch and part from them at the next step."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, tmp_path / "two"), nprocs=2, start_method="fork")
    finetune.run(run_config(tmp_path / "one", "eval.heldout_examples=0"))
    losses = {}
    for name in ("one", "two"):
        (metrics,) = (tmp_path / name).glob("*/metrics.jsonl")
        losses[name] = [r["train_loss"] for r in map(json.loads, metrics.read_text().splitlines()) if "train_loss" in r]
    assert len(losses["one"]) == 4 and losses["two"] == pytest.approx(losses["one"], rel=1e-5)
