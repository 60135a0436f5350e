"""Population-batched decoding (tracks/randopt_population.py): P candidates decoded in one forward
give, in fp32 on a CPU, the same tokens as one candidate at a time through `generate` (switched
with the flat PerturbSpace), on tiny random Llama and Qwen2 models; a candidate's tokens do not
depend on its slot or its neighbours; EOS and stop strings; refused models say what to do."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_generate import PROMPTS, make_model, make_tokenizer, model  # noqa: E402,F401  (model: the llama/qwen2 fixture)
from underpar.errors import ConfigError  # noqa: E402
from underpar.eval.generate import DecodeConfig, GenerationStats, generate  # noqa: E402
from underpar.kernels.perturb_space import PerturbSpace  # noqa: E402
from underpar.tracks.randopt_population import PopulationDecoder, generate_population  # noqa: E402

POPULATION = [[(11, 0.05)], None, [(7, 0.08)], [(3, 0.05), (9, 0.05)]]  # None: the base model


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's


def one_at_a_time(model, space, tokenizer, population, cfg):
    """The reference: switch the live weights to each candidate, decode with `generate`."""
    out = []
    for terms in population:
        if terms:
            space.apply_combination(terms)
        else:
            space.restore()
        out.append([c.token_ids for c in generate(model, tokenizer, PROMPTS, cfg)])
    space.restore()
    return out


def test_population_equals_one_candidate_at_a_time(model):
    tokenizer = make_tokenizer(eos=None)
    space = PerturbSpace(model)
    cfg = DecodeConfig(max_new_tokens=12, batch_size=len(PROMPTS), engine="static")
    reference = one_at_a_time(model, space, tokenizer, POPULATION, cfg)
    assert len({str(r) for r in reference}) == len(POPULATION)  # the candidates do differ
    decoder = PopulationDecoder(model, space, size=4, rows=3, max_len=64 + 12)
    stats = GenerationStats()
    got = generate_population(decoder, tokenizer, POPULATION, PROMPTS, cfg, stats=stats)
    assert [[c.token_ids for c in row] for row in got] == reference  # 2 batches of 3 rows, the last padded
    assert stats.prompts == 4 * len(PROMPTS) and stats.batches == 2
    assert stats.generated_tokens == 4 * len(PROMPTS) * 12
    # the live weights were never touched
    assert torch.equal(space.live_flat, space.base_flat)


def test_tokens_do_not_depend_on_slot_or_neighbours(model):
    tokenizer = make_tokenizer(eos=None)
    space = PerturbSpace(model)
    cfg = DecodeConfig(max_new_tokens=10, engine="static")
    decoder = PopulationDecoder(model, space, size=3, rows=len(PROMPTS), max_len=64 + 10)
    first = generate_population(decoder, tokenizer, POPULATION[:3], PROMPTS, cfg)
    # other slots, other neighbours, a short population (the free slot repeats the last one)
    second = generate_population(decoder, tokenizer, [POPULATION[2], POPULATION[0]], PROMPTS, cfg)
    assert second[0] == first[2] and second[1] == first[0]


def test_eos_and_stop_strings_end_rows_like_generate(model):
    space = PerturbSpace(model)
    probe = generate(model, make_tokenizer(eos=None), PROMPTS, DecodeConfig(max_new_tokens=12))
    eos = probe[1].token_ids[4]  # a token the base model emits: it ends that row there
    tokenizer = make_tokenizer(eos=eos)
    stop = tokenizer.decode(probe[3].token_ids[2:4])
    cfg = DecodeConfig(max_new_tokens=12, stop_strings=[stop], check_every=2)
    population = [None, [(5, 0.05)]]
    reference = one_at_a_time(model, space, tokenizer, population, cfg)
    decoder = PopulationDecoder(model, space, size=2, rows=len(PROMPTS), max_len=64 + 12)
    got = generate_population(decoder, tokenizer, population, PROMPTS, cfg)
    assert [[c.token_ids for c in row] for row in got] == reference
    texts = [c.text for c in generate(model, tokenizer, PROMPTS, cfg)]
    assert [c.text for c in got[0]] == texts and any(c.finished for c in got[0])


def test_refusals_name_the_way_out(model):
    space = PerturbSpace(model)
    decoder = PopulationDecoder(model, space, size=2, rows=2, max_len=64)
    with pytest.raises(ValueError, match="does not fit 2 slots"):
        decoder.load([None, None, None])
    other = make_model("llama")
    with pytest.raises(ConfigError, match="one dtype on one device"):
        PopulationDecoder(other, PerturbSpace(other, flat=False), 2, 2, 64)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ConfigError, match="decode.population=1"):
        PopulationDecoder(gpt2, PerturbSpace(gpt2), 2, 2, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_equal_one_candidate_at_a_time_in_fp32():
    model = make_model("llama").cuda()
    tokenizer = make_tokenizer(eos=None)
    space = PerturbSpace(model)
    cfg = DecodeConfig(max_new_tokens=70, engine="static")  # past one 64-slot bucket: two graphs
    reference = one_at_a_time(model, space, tokenizer, POPULATION, cfg)
    decoder = PopulationDecoder(model, space, size=4, rows=len(PROMPTS), max_len=64 + 70)
    assert decoder.graphs_on
    got = generate_population(decoder, tokenizer, POPULATION, PROMPTS, cfg)
    assert [[c.token_ids for c in row] for row in got] == reference
    again = generate_population(decoder, tokenizer, POPULATION[::-1], PROMPTS, cfg)  # replays
    assert again[::-1] == got and len(decoder._graphs) == 2
