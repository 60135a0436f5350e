"""The population engine's speed paths (tracks/randopt_population_forward.py): every registered
attention kernel, row groups that skip the left padding of shorter prompts and fine length
buckets give, in fp32 on a CPU, the same tokens as one candidate at a time through `generate`."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_generate import make_model, make_tokenizer  # noqa: E402
from underpar.errors import ConfigError  # noqa: E402
from underpar.eval.generate import DecodeConfig, generate  # noqa: E402
from underpar.kernels.perturb_space import PerturbSpace  # noqa: E402
from underpar.tracks.randopt_population import PopulationDecoder, generate_population  # noqa: E402
from underpar.tracks.randopt_population_forward import ATTENTION  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's

# lengths 40, 3, 35, 2 (unsorted): sorted longest first into 2 groups of 2, the second group's
# prompts start at slot 37 of 40, so it reads the cache from slot 32
PROMPTS = [[(7 * i + 3) % 120 + 1 for i in range(40)], [5, 17, 33], [(5 * i + 2) % 120 + 1 for i in range(35)],
           [44, 9]]
POPULATION = [[(11, 0.05)], None, [(3, 0.05), (9, 0.05)]]
NEW = 21  # past the first 16-slot bucket of the decode steps


@pytest.fixture(scope="module")
def setup():
    model = make_model("qwen2")  # q/k/v biases
    space = PerturbSpace(model)
    tokenizer = make_tokenizer(eos=None)
    cfg = DecodeConfig(max_new_tokens=NEW, batch_size=len(PROMPTS), engine="static")
    reference = []
    for terms in POPULATION:  # one candidate at a time: switch the live weights, decode
        space.apply_combination(terms) if terms else space.restore()
        reference.append([c.token_ids for c in generate(model, tokenizer, PROMPTS, cfg)])
    space.restore()
    assert len({str(r) for r in reference}) == len(POPULATION)  # the candidates do differ
    return model, space, tokenizer, cfg, reference


@pytest.mark.parametrize("attention", sorted(ATTENTION))
@pytest.mark.parametrize("groups,bucket", [(1, 64), (2, 16)])
def test_attention_groups_and_buckets_equal_one_candidate_at_a_time(setup, attention, groups, bucket):
    model, space, tokenizer, cfg, reference = setup
    decoder = PopulationDecoder(model, space, size=3, rows=4, max_len=64 + 16, attention=attention,
                                groups=groups, bucket=bucket)
    got = generate_population(decoder, tokenizer, POPULATION, PROMPTS, cfg)
    assert [[c.token_ids for c in row] for row in got] == reference
    # the second group really skipped its padding (slots 0..31); one group reads from slot 0
    assert decoder._starts == ((0, 32) if groups == 2 else (0,))


def test_compiled_layers_and_a_prefill_kernel_equal_one_candidate_at_a_time(setup):
    """The layer pieces traced by torch.compile (backend "eager" on a CPU: the graph capture
    Inductor takes, without code generation) and SDPA in the prefill change no token."""
    model, space, tokenizer, cfg, reference = setup
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # a process-wide count
    decoder = PopulationDecoder(model, space, size=3, rows=4, max_len=64 + 16, attention="fused_decode",
                                prefill_attention="sdpa", fuse="eager")
    got = generate_population(decoder, tokenizer, POPULATION, PROMPTS, cfg)
    assert [[c.token_ids for c in row] for row in got] == reference
    # layer_in and layer_out, for the decode steps and for the prefill
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 4


def test_compiled_layers_take_more_prompt_widths_than_dynamos_recompile_limit(setup):
    """Ten batches of one prompt, each of another width: past dynamo's limit of 8 compiled
    shapes the prefill runs eager, with the same tokens as eager throughout."""
    model, space, tokenizer = setup[0], setup[1], setup[2]
    prompts = [PROMPTS[0][:n] for n in range(2, 12)]
    cfg = DecodeConfig(max_new_tokens=3, batch_size=1)
    runs = []
    for fuse in (None, "eager"):
        torch._dynamo.reset()
        decoder = PopulationDecoder(model, space, size=2, rows=1, max_len=32, fuse=fuse)
        runs.append([[c.token_ids for c in row] for row in
                     generate_population(decoder, tokenizer, POPULATION[:2], prompts, cfg)])
    assert runs[0] == runs[1]


def test_bad_settings_name_the_choices(setup):
    model, space = setup[0], setup[1]
    with pytest.raises(ConfigError, match="matmul, sdpa"):
        PopulationDecoder(model, space, 2, 2, 64, attention="flash3")
    with pytest.raises(ConfigError, match="matmul, sdpa"):
        PopulationDecoder(model, space, 2, 2, 64, prefill_attention="flash3")
    with pytest.raises(ConfigError, match="multiple of 16"):
        PopulationDecoder(model, space, 2, 2, 64, bucket=24)
    with pytest.raises(ConfigError, match="groups"):
        PopulationDecoder(model, space, 2, 2, 64, groups=0)
    assert torch.equal(space.live_flat, space.base_flat)


def early_eos(model, space, population) -> list[int]:
    """EOS ids (one token, else two) such that every candidate emits one early (in its first
    NEW - 6 tokens) on at least two prompts while on another prompt some candidate emits none:
    half the rows then finish early for all candidates, so compaction has rows to drop, and a
    row runs to the end."""
    runs = []
    for terms in population:
        space.apply_combination(terms) if terms else space.restore()
        runs.append([c.token_ids for c in generate(model, make_tokenizer(eos=None), PROMPTS,
                                                   DecodeConfig(max_new_tokens=NEW))])
    space.restore()
    tokens = sorted({t for run in runs for ids in run for t in ids})
    for eos in [[t] for t in tokens] + [[a, b] for a in tokens for b in tokens if a < b]:
        early = [all(any(t in run[r][:NEW - 6] for t in eos) for run in runs) for r in range(len(PROMPTS))]
        never = [any(not set(eos) & set(run[r]) for run in runs) for r in range(len(PROMPTS))]
        if sum(early) >= 2 and any(never):
            return eos
    raise AssertionError("no token ends half the prompts early: change the test's prompts or population")


def eos_tokenizer(model, eos: list[int]):
    """The test tokenizer with eos[0] as its EOS, and the rest as the model's other EOS ids."""
    model.generation_config.eos_token_id = eos[1:] or None
    return make_tokenizer(eos=eos[0])


def test_compaction_keeps_tokens_when_rows_finish(setup):
    """With EOS a token that some rows emit early, the running rows move onto fewer rows (4 -> 2
    -> 1) and every completion still equals one candidate at a time."""
    model, space = setup[0], setup[1]
    population = [None, [(5, 0.002)]]
    tokenizer = eos_tokenizer(model, early_eos(model, space, population))
    cfg = DecodeConfig(max_new_tokens=NEW, batch_size=len(PROMPTS), check_every=2)
    reference = []
    for terms in population:
        space.apply_combination(terms) if terms else space.restore()
        reference.append([c.token_ids for c in generate(model, tokenizer, PROMPTS, cfg)])
    space.restore()
    lengths = sorted(len(t) for row in reference for t in row)
    assert lengths[0] < NEW - 4 and lengths[-1] == NEW  # some rows end early, some run to the end
    decoder = PopulationDecoder(model, space, size=2, rows=4, max_len=64 + 16, groups=2, compact=True)
    got = generate_population(decoder, tokenizer, population, PROMPTS, cfg)
    model.generation_config.eos_token_id = None  # the module's model, as the other tests take it
    assert [[c.token_ids for c in row] for row in got] == reference
    assert decoder.compactions >= 1 and decoder._n < 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attention,fuse", [(a, None) for a in sorted(ATTENTION)] + [("fused_decode", "inductor")])
def test_cuda_graphs_with_groups_and_compaction_equal_one_candidate_at_a_time(attention, fuse):
    model = make_model("qwen2").cuda()
    space = PerturbSpace(model)
    population = [None, [(5, 0.002)], [(7, 0.002)]]
    tokenizer = eos_tokenizer(model, early_eos(model, space, population))
    cfg = DecodeConfig(max_new_tokens=NEW, batch_size=len(PROMPTS), check_every=2)
    reference = []
    for terms in population:
        space.apply_combination(terms) if terms else space.restore()
        reference.append([c.token_ids for c in generate(model, tokenizer, PROMPTS, cfg)])
    space.restore()
    decoder = PopulationDecoder(model, space, size=3, rows=4, max_len=64 + 16, attention=attention, groups=2,
                                compact=True, fuse=fuse)
    assert decoder.graphs_on
    got = generate_population(decoder, tokenizer, population, PROMPTS, cfg)
    assert [[c.token_ids for c in row] for row in got] == reference
    assert decoder.compactions >= 1 and len(decoder._graphs) >= 2  # a graph per row count
    again = generate_population(decoder, tokenizer, population[::-1], PROMPTS, cfg)  # replays
    assert again[::-1] == got


def test_randopt_config_names_the_kernels():
    from underpar.config import validate
    from underpar.tracks.randopt_search import RODecodeConfig

    cfg = RODecodeConfig(population=4, population_attention="matmul", population_prefill_attention="sdpa",
                         population_fuse=True, population_compact=True)
    validate(cfg)
    assert not hasattr(cfg.engine_config(), "population_attention")  # the one-candidate engine takes none of them
    with pytest.raises(ConfigError, match="sdpa_efficient"):
        validate(RODecodeConfig(population_attention="flash3"))
