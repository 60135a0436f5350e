"""Depth recurrence (issue 12): the record's layer loop switched on as a training stage and
PR #38's shared blocks with LoRA adapters; the training-stage machinery (tracks visit every
stage's graph in the untimed warmup) and its recompile counter."""

import math

import pytest
import torch

from underpar.errors import ConfigError
from underpar.model.gpt import num_params
from underpar.model.recurrence import Loop
from underpar.optim.build import OptimConfig, build_optimizers
from underpar.optim.groups import describe_param_table
from underpar.stages import Stages, Switch
from underpar.tracks import pretrain as track

from test_pretrain import data_dir, micro_config  # noqa: F401  (the module fixture)
from test_techniques_blocks import tiny

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD_LOOP = "recurrence={name = 'loop', start = 3, end = 5, extra_passes = 2, start_at = 0.35}"


def block_calls(model, tokens) -> list[int]:
    """The indices of the blocks in the order one forward calls them."""
    calls: list[int] = []
    hooks = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, block in enumerate(model.blocks)]
    with torch.no_grad():
        model(tokens)
    for hook in hooks:
        hook.remove()
    return calls


def test_record_loop_order_and_unet_split():
    """The record (11 blocks, loop 3-5 twice more): 17 virtual layers, encoder
    [0,1,2,3,4,5,3,4] and decoder [5,3,4,5,6,...,10], 8 skip weights; before the stage the
    plain 5/6 split uses the first 5 of them."""
    model = tiny("num_layers=11", RECORD_LOOP)
    assert Loop().order(11) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert model.layout.order[:8] == (0, 1, 2, 3, 4, 5, 3, 4) and model.layout.num_encoder_layers == 8
    assert model.layout.num_skips == 8 and model.plain_layout.num_skips == 5
    assert model.skip_weights.shape[0] == 8
    assert num_params(model) == num_params(tiny("num_layers=11")) + 3 * 64  # only the 3 extra skip rows
    tokens = torch.randint(0, 128, (1, 8))
    assert not model.looping and block_calls(model, tokens) == list(range(11))
    (switch,) = model.stage_switches()
    assert switch.at == 0.35
    switch.set(True)
    assert block_calls(model, tokens) == Loop().order(11)


def test_loop_from_the_start_has_no_stage():
    model = tiny("num_layers=4", "recurrence={name = 'loop', start = 1, end = 2, extra_passes = 1, start_at = 0.0}")
    assert model.looping and model.stage_switches() == []
    assert block_calls(model, torch.randint(0, 128, (1, 8))) == [0, 1, 2, 1, 2, 3]


def test_loop_combines_with_two_lanes_only_after_the_loop():
    model = tiny("num_layers=11", RECORD_LOOP, "residual.two_lane_start=8")
    assert model.layout.two_lane_pos == 14 and model.plain_layout.two_lane_pos == 8
    with pytest.raises(ConfigError, match="two_lane_start = 5.*every block after"):
        tiny("num_layers=11", RECORD_LOOP, "residual.two_lane_start=5")
    with pytest.raises(ConfigError, match=r"start = 3 and end = 11 must satisfy"):
        tiny("num_layers=11", "recurrence={name = 'loop', end = 11}")


def test_shared_blocks_with_adapters_start_as_the_plain_loop():
    """PR #38: 3 shared blocks x 3 loops; 9 rank-4 adapters (zero-init up): at init the model
    equals the same shared loop without adapters; its block matrices train with Muon at
    matrix_lr / sqrt(3), the adapters with Adam."""
    shared = "recurrence={name = 'shared', loops = 3, lora_rank = 4}"
    model = tiny("num_layers=3", "residual.encoder_layers=0", shared)
    assert block_calls(model, torch.randint(0, 128, (1, 8))) == [0, 1, 2] * 3
    assert len(model.adapters) == 9
    bare = tiny("num_layers=3", "residual.encoder_layers=0", "recurrence={name = 'shared', loops = 3, lora_rank = 0}")
    assert num_params(model) - num_params(bare) == 9 * 2 * 4 * 64
    for adapter in model.adapters:
        torch.nn.init.normal_(adapter.down.weight)  # down is random, up is zero: still the identity
    tokens = torch.randint(0, 128, (2, 8))
    bare.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(model(tokens), bare(tokens), rtol=0, atol=0)
    table = {name: (opt, lr) for name, _, opt, lr in describe_param_table(model, OptimConfig())}
    assert table["blocks.0.attn.c_q.weight"] == ("muon", pytest.approx(0.04 / math.sqrt(3)))
    assert table["adapters.0.up.weight"] == ("adam", 0.04)
    muon = build_optimizers(model, OptimConfig(), True)[0]
    assert [g["lr"] for g in muon.param_groups] == [pytest.approx(0.04 / math.sqrt(3))]
    with pytest.raises(ConfigError, match="two lanes do not combine"):
        tiny("num_layers=3", shared, "residual.two_lane_start=2")


def test_shared_recurrence_compiles_fullgraph_and_matches_eager():
    """(The staged loop compiles under fullgraph in every stage in the run-level test below.)"""
    torch._dynamo.reset()
    model = tiny("num_layers=2", "residual.encoder_layers=0", "recurrence=shared")
    for switch in model.stage_switches():
        switch.set(True)
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    tokens = torch.randint(0, 128, (2, 17))
    loss = compiled(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, model(tokens[:, :-1], tokens[:, 1:]), rtol=1e-5, atol=1e-5)


def test_stages_switch_by_progress_and_report_changes():
    seen: list[tuple[str, bool]] = []
    stages = Stages([Switch(0.8, "qat", lambda on: seen.append(("qat", on))),
                     Switch(0.35, "loop", lambda on: seen.append(("loop", on)))])
    assert stages.starts == [0.0, 0.35, 0.8] and len(stages) == 3
    assert stages.enter(0.0) == [] and seen == [("loop", False), ("qat", False)]
    assert stages.enter(0.2) == []
    assert stages.enter(0.35) == ["loop on"]
    assert stages.enter(0.9) == ["qat on"]
    assert stages.enter(0.1) == ["loop off", "qat off"]
    assert Stages([]).starts == [0.0] and Stages([]).describe() == "1 training stage"
    assert Stages([Switch(0.5, "x", print)]).enter(0.6) == ["x on"]  # a resume reports what is on


def aot_eager_compile(monkeypatch):
    """Compile as the trainer does, with a backend cheap enough for the CPU tests."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, **{**kw, "backend": "aot_eager", "options": None}))


def test_warmup_compiles_every_stage_so_the_timed_region_never_recompiles(data_dir, tmp_path, monkeypatch):
    """A loop switched on at half of training: the warmup compiles both graphs, the run logs
    the switch and 0 recompiles; a warmup that skips the second stage is caught (1)."""
    torch._dynamo.reset()
    aot_eager_compile(monkeypatch)
    sets = ["train.compile=true", "model.recurrence={name = 'loop', start = 0, end = 0, extra_passes = 1, start_at = 0.5}"]
    summary = track.run(micro_config(data_dir, tmp_path / "a", *sets))
    assert summary.compiled_graphs == 2 and summary.recompiles_in_timed_region == 0
    text = next((tmp_path / "a").glob("*/train.log")).read_text()
    assert "step 3 | depth recurrence on (50.0% of training)" in text
    assert "2 training stages: depth recurrence at 50%" in text
    torch._dynamo.reset()
    real_init = Stages.__init__

    def first_stage_only(self, switches):
        real_init(self, switches)
        self.starts = self.starts[:1]

    monkeypatch.setattr(Stages, "__init__", first_stage_only)
    summary = track.run(micro_config(data_dir, tmp_path / "b", *sets))
    assert summary.compiled_graphs == 1 and summary.recompiles_in_timed_region == 1


def test_seed_presets_have_their_sources_parameter_counts():
    """golf-pr38: "13.2M params" (PR #38: 3 shared blocks of width 768 + 9 rank-4 adapters);
    golf-pr1584: ~36M, the records' size (REFERENCE.md section 1); golf-log-h1 is the
    baseline's 9 x 512 with 2 KV heads, an untied head and no U-Net skips."""
    from underpar import config as cfglib
    from underpar.model.gpt import build

    counts = {name: num_params(build(cfglib.resolve("pretrain", name).model))
              for name in ("golf-pr38", "golf-pr1584", "golf-log-h1")}
    assert round(counts["golf-pr38"] / 1e6, 1) == 13.2
    assert 35e6 < counts["golf-pr1584"] < 37e6
    assert counts["golf-log-h1"] == 17_059_912 - 9 * 2 * 512 * 128 + 1024 * 512 - 4 * 512
