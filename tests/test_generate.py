"""Batched greedy decoding: the loop and static engines against `model.generate`, padding,
EOS and stop strings, ordering, batching and stats, on tiny random Llama / Qwen2 models."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from underpar.errors import ConfigError, UnderparError  # noqa: E402
from underpar.eval.generate import DecodeConfig, GenerationStats, eos_ids_of, generate  # noqa: E402

VOCAB = 128
# Different lengths, not sorted, so batching reorders them and left padding is needed.
PROMPTS = [[5, 17, 33], [9, 4, 81, 22, 60, 7, 101], [44], [12, 90, 3, 71, 8],
           [30, 31, 32, 33, 34, 35]]


def word(i: int) -> str:
    return f"w{i:03d}"  # fixed width: no token's text is a substring across token boundaries


def make_tokenizer(eos: int | None = None):
    vocab = {word(i): i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=word(1)))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=word(0), eos_token=None if eos is None else word(eos)
    )


def make_model(arch: str):
    torch.manual_seed(0)
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    model.generation_config.eos_token_id = None  # EOS comes from the tokenizer in each test
    return model.float().eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest's: tiny matmuls, one thread


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    return make_model(request.param)


def ids_of(completions):
    return [c.token_ids for c in completions]


def first_new(tokens: list[int], start: int) -> int:
    """Index >= start of a token that does not occur earlier (so EOS there stops exactly there)."""
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k])


def test_engines_match_model_generate(model):
    tokenizer = make_tokenizer()
    base = generate(model, tokenizer, PROMPTS, DecodeConfig(max_new_tokens=20, engine="hf"))
    # An EOS that ends prompt 1 early while the others run on: rows finish at different steps.
    eos = base[1].token_ids[first_new(base[1].token_ids, 3)]
    tokenizer = make_tokenizer(eos=eos)
    cfg = DecodeConfig(max_new_tokens=20, batch_size=8, engine="hf", check_every=4)
    ref = generate(model, tokenizer, PROMPTS, cfg)
    # The reference path is model.generate itself on the left-padded batch.
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = (torch.arange(width) >= width - torch.tensor([[len(p)] for p in PROMPTS])).long()
    raw = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)[:, width:].tolist()
    for c, r in zip(ref, raw):
        assert c.token_ids == (r[: r.index(eos) + 1] if eos in r else r)
    assert ref[1].finished and ref[1].token_ids[-1] == eos
    assert any(not c.finished and len(c.token_ids) == 20 for c in ref)
    for engine in ("loop", "static"):
        got = generate(model, tokenizer, PROMPTS, DecodeConfig(max_new_tokens=20, engine=engine,
                                                              check_every=4))
        assert ids_of(got) == ids_of(ref), engine
        assert [c.finished for c in got] == [c.finished for c in ref]
        assert [c.text for c in got] == [c.text for c in ref]


@pytest.mark.parametrize("engine", ["loop", "static", "hf"])
def test_padded_prompt_matches_prompt_alone(model, engine):
    tokenizer = make_tokenizer()
    cfg = DecodeConfig(max_new_tokens=12, engine=engine)
    batched = generate(model, tokenizer, PROMPTS, cfg)
    for prompt, c in zip(PROMPTS, batched):
        assert generate(model, tokenizer, [prompt], cfg)[0].token_ids == c.token_ids


@pytest.mark.parametrize("engine", ["loop", "static", "hf"])
def test_eos_stops_a_sequence(model, engine):
    cfg = DecodeConfig(max_new_tokens=16, engine=engine, check_every=3)
    free = generate(model, make_tokenizer(), PROMPTS, cfg)
    gen = free[3].token_ids
    k = first_new(gen, 3)
    got = generate(model, make_tokenizer(eos=gen[k]), PROMPTS, cfg)
    assert got[3].token_ids == gen[: k + 1] and got[3].finished
    assert got[3].text == " ".join(word(t) for t in gen[:k])  # EOS is not in the text
    for f, g in zip(free, got):  # other rows are only cut where they emit that token too
        cut = f.token_ids.index(gen[k]) + 1 if gen[k] in f.token_ids else len(f.token_ids)
        assert g.token_ids == f.token_ids[:cut]


@pytest.mark.parametrize("engine", ["loop", "static"])
def test_generation_config_eos_ids_all_count(model, engine):
    cfg = DecodeConfig(max_new_tokens=16, engine=engine)
    free = generate(model, make_tokenizer(), PROMPTS, cfg)
    a = free[0].token_ids[first_new(free[0].token_ids, 2)]
    b = free[4].token_ids[first_new(free[4].token_ids, 4)]
    tokenizer = make_tokenizer(eos=a)
    model.generation_config.eos_token_id = [b, a]
    try:
        assert eos_ids_of(model, tokenizer) == sorted({a, b})
        got = generate(model, tokenizer, PROMPTS, cfg)
    finally:
        model.generation_config.eos_token_id = None
    for f, g in zip(free, got):
        cut = next((n + 1 for n, t in enumerate(f.token_ids) if t in (a, b)), len(f.token_ids))
        assert g.token_ids == f.token_ids[:cut] and g.finished == (cut < len(f.token_ids) or
                                                                   f.token_ids[-1] in (a, b))


@pytest.mark.parametrize("engine", ["loop", "static", "hf"])
def test_stop_strings(model, engine):
    tokenizer = make_tokenizer()
    free = generate(model, tokenizer, PROMPTS, DecodeConfig(max_new_tokens=16, engine=engine))
    gen = free[2].token_ids
    pairs = list(zip(gen, gen[1:]))
    k = next(k for k in range(3, len(pairs)) if pairs[k] not in pairs[:k])
    stop = f"{word(gen[k])} {word(gen[k + 1])}"
    cfg = DecodeConfig(max_new_tokens=16, engine=engine, stop_strings=[stop, "never"],
                       check_every=2)
    got = generate(model, tokenizer, PROMPTS, cfg)
    assert got[2].token_ids == gen[: k + 2] and got[2].finished
    assert got[2].text == " ".join(word(t) for t in gen[:k]) + " "  # text ends before the stop
    for f, g in zip(free, got):  # other rows: unchanged unless they contain the stop string
        if stop not in f.text:
            assert g.token_ids == f.token_ids and g.text == f.text and not g.finished


@pytest.mark.parametrize("engine", ["loop", "static", "hf"])
def test_order_batching_and_string_prompts(model, engine):
    tokenizer = make_tokenizer()
    cfg = DecodeConfig(max_new_tokens=8, engine=engine, batch_size=len(PROMPTS))
    whole = generate(model, tokenizer, PROMPTS, cfg)
    # Each prompt alone gives the same tokens, so the order is the input order.
    alone = [generate(model, tokenizer, [p], cfg)[0].token_ids for p in PROMPTS]
    assert ids_of(whole) == alone
    stats = GenerationStats()
    small = generate(model, tokenizer, PROMPTS, DecodeConfig(max_new_tokens=8, engine=engine,
                                                             batch_size=2), stats=stats)
    assert ids_of(small) == alone
    assert stats.batches == 3 and stats.prompts == 5 and stats.seconds > 0
    assert stats.generated_tokens == sum(len(c.token_ids) for c in small) == 40
    assert stats.tokens_per_second > 0
    texts = [" ".join(word(t) for t in p) for p in PROMPTS]
    assert ids_of(generate(model, tokenizer, texts, cfg)) == alone


def test_static_decoder_is_reused_and_copies_drop_it(model):
    tokenizer = make_tokenizer()
    cfg = DecodeConfig(max_new_tokens=10, batch_size=4, engine="static")
    first = generate(model, tokenizer, PROMPTS, cfg)
    decoder = model._underpar_static_decoder
    assert generate(model, tokenizer, PROMPTS, cfg) == first
    assert model._underpar_static_decoder is decoder
    clone = copy.deepcopy(model)
    assert clone._underpar_static_decoder is None
    assert generate(clone, tokenizer, PROMPTS, cfg) == first


def test_config_validation_and_empty_prompt():
    model, tokenizer = make_model("llama"), make_tokenizer()
    with pytest.raises(ConfigError, match="engine"):
        generate(model, tokenizer, PROMPTS, DecodeConfig(engine="beam"))
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(model, tokenizer, PROMPTS, DecodeConfig(max_new_tokens=0))
    with pytest.raises(ConfigError, match="stop_strings"):
        generate(model, tokenizer, PROMPTS, DecodeConfig(stop_strings=["ok", ""]))
    with pytest.raises(UnderparError, match="empty prompt"):
        generate(model, tokenizer, [[1, 2], []], DecodeConfig(max_new_tokens=2))
    assert generate(model, tokenizer, [], DecodeConfig()) == []


@pytest.mark.parametrize("engine", ["loop", "static", "hf"])
def test_batch_ends_when_all_rows_finish(model, engine):
    cfg = DecodeConfig(max_new_tokens=40, engine=engine, batch_size=8, check_every=4)
    free = generate(model, make_tokenizer(), PROMPTS, cfg)
    firsts = sorted({c.token_ids[0] for c in free})  # every row ends at its first token
    model.generation_config.eos_token_id = firsts
    stats = GenerationStats()
    try:
        got = generate(model, make_tokenizer(), PROMPTS, cfg, stats=stats)
    finally:
        model.generation_config.eos_token_id = None
    assert [c.token_ids for c in got] == [c.token_ids[:1] for c in free]
    assert all(c.finished and c.text == "" for c in got)
    # hf stops after the first token; the others notice at the first check (3 steps later).
    assert stats.decode_steps == (0 if engine == "hf" else 3)


def test_static_falls_back_to_eager_when_compiled_step_fails(model):
    tokenizer = make_tokenizer()
    cfg = DecodeConfig(max_new_tokens=10, batch_size=4, engine="static")
    want = generate(model, tokenizer, PROMPTS, cfg)
    decoder = model._underpar_static_decoder

    def broken(*args):
        raise RuntimeError("no compiler here")

    decoder.compiled, decoder._compiled_step = True, broken  # as if torch.compile had failed
    with pytest.warns(UserWarning, match="running eagerly"):
        assert generate(model, tokenizer, PROMPTS, cfg) == want
    assert not decoder.compiled


@pytest.mark.parametrize("engine", ["loop", "static"])
def test_decoding_raises_no_deprecation_warning(model, engine):
    """The KV cache goes in under the name the installed transformers takes (`cache` since 5.24,
    where `past_key_values` warns on every run: issue 10's noisy output)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generate(model, make_tokenizer(), PROMPTS[:2], DecodeConfig(max_new_tokens=3, engine=engine))
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
