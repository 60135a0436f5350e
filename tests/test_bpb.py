"""Exact byte accounting (LUTs, target_bytes) and bits-per-byte evaluation."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from underpar.data.byte_count import target_bytes
from underpar.data.tokenizer import ByteLUTs, Tokenizer, build_byte_luts, train_tokenizer
from underpar.errors import DataError
from underpar.eval.bpb import (
    BpbMeter,
    count_tokens,
    evaluate_bpb,
    uniform_logits_fn,
    unigram_logits_fn,
)

VOCAB = 512
PAD, BOS, EOS, UNK = 0, 1, 2, 3

WORDS = (
    "the of and to in is was for on that with as by at from his her it an are were which this be "
    "or has had not but have they one all their also new first been after who two its other more "
    "time years would when can into there only most some about river city music garden market "
    "winter station history science paper window morning evening village teacher doctor letter "
    "mountain island bridge summer library kitchen council report season family company water "
    "light story north south early later small large old young great little long short"
).split()
ACCENTED = ["café", "résumé", "naïve", "déjà", "fiancée", "café", "café"]
ODD_BITS = ["—", "“quoted”", "(aside)", "3.14", "1999", "2024", "42%", "$17", "e.g.", "O'Neil"]


def make_document(rng: random.Random) -> str:
    """One English-like paragraph: single spaces, no newlines, so it survives normalization."""
    sentences = []
    for _ in range(rng.randint(2, 8)):
        words = []
        for _ in range(rng.randint(4, 18)):
            roll = rng.random()
            if roll < 0.08:
                words.append(rng.choice(ACCENTED))
            elif roll < 0.13:
                words.append(rng.choice(ODD_BITS))
            else:
                words.append(rng.choice(WORDS))
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice([".", ".", ".", "!", "?", ";"]))
    return " ".join(sentences)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(1234)
    return [make_document(rng) for _ in range(600)]  # about 300 KB


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, corpus) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tiny.model"
    return train_tokenizer(corpus, VOCAB, path)


@pytest.fixture(scope="module")
def tok(model_path) -> Tokenizer:
    return Tokenizer.load(model_path)


@pytest.fixture(scope="module")
def luts(tok) -> ByteLUTs:
    return build_byte_luts(tok, tok.vocab_size)


def doc_bytes(tok: Tokenizer, luts: ByteLUTs, ids: list[int]) -> int:
    """Total target bytes of one document scored as [BOS] + ids."""
    seq = torch.tensor([BOS] + ids)
    return int(target_bytes(seq[:-1], seq[1:], luts).sum())


# ---- tokenizer training and loading -------------------------------------------------------


def test_trained_tokenizer_has_golf_layout(tok, model_path):
    assert tok.vocab_size == VOCAB
    assert tok.bos_id == BOS and tok.eos_id == EOS
    assert [tok.piece(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert sum(tok.sp.is_byte(i) for i in range(VOCAB)) == 256
    assert model_path.with_suffix(".vocab").is_file()
    names = sorted(p.name for p in model_path.parent.iterdir())
    assert names == ["tiny.model", "tiny.vocab"]  # no temp files left behind


def test_encode_documents_matches_encode(tok, corpus):
    assert tok.encode_documents(corpus[:20]) == [tok.encode(t) for t in corpus[:20]]
    assert tok.encode_documents([]) == []


def test_vocab_too_large_is_a_data_error_and_writes_nothing(tmp_path):
    path = tmp_path / "big.model"
    with pytest.raises(DataError, match="lower --vocab to at most"):
        train_tokenizer(["tiny corpus of few words", "a few words more"], 4000, path)
    assert list(tmp_path.iterdir()) == []


def test_too_many_characters_or_too_long_documents_are_data_errors(tmp_path, corpus):
    many_chars = corpus[:50] + ["".join(chr(0x4E00 + i) for i in range(2000))]
    with pytest.raises(DataError, match="raise --vocab above"):
        train_tokenizer(many_chars, 280, tmp_path / "t.model")
    with pytest.raises(DataError, match="longer than max_sentence_length=64"):
        train_tokenizer(corpus[:20], 300, tmp_path / "t.model", max_sentence_length=64)
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer([], 512, tmp_path / "t.model")
    with pytest.raises(DataError, match="no documents"):
        train_tokenizer(["", "   ", "\x00"], 512, tmp_path / "t.model")
    assert list(tmp_path.iterdir()) == []


def test_load_missing_or_corrupt_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.model"):
        Tokenizer.load(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(DataError, match="bad.model"):
        Tokenizer.load(bad)


# ---- the byte tables --------------------------------------------------------------------------


def test_lut_rules_for_special_byte_and_space_pieces(tok, luts):
    for special in (PAD, BOS, EOS, UNK):
        assert luts.bytes_per_token[special] == 0 and luts.is_boundary[special]
        assert not luts.has_leading_space[special]
    byte_ids = [i for i in range(VOCAB) if tok.sp.is_byte(i)]
    assert tok.piece(byte_ids[0]) == "<0x00>"
    assert all(luts.bytes_per_token[i] == 1 for i in byte_ids)  # not len("<0x00>") == 6
    assert not luts.is_boundary[byte_ids].any() and not luts.has_leading_space[byte_ids].any()
    space = tok.sp.piece_to_id("\u2581")
    assert tok.piece(space) == "\u2581"
    assert luts.bytes_per_token[space] == 0 and luts.has_leading_space[space]


def test_luts_pad_to_a_larger_embedding_table(tok):
    padded = build_byte_luts(tok.sp, VOCAB + 64)
    assert padded.vocab_size == VOCAB + 64
    assert padded.is_boundary[VOCAB:].all() and (padded.bytes_per_token[VOCAB:] == 0).all()
    assert not padded.has_leading_space[VOCAB:].any()
    assert torch.equal(padded.bytes_per_token[:VOCAB], build_byte_luts(tok, VOCAB).bytes_per_token)
    with pytest.raises(DataError, match="smaller than the tokenizer"):
        build_byte_luts(tok, VOCAB - 1)


def test_leading_space_counts_only_after_a_normal_token(tok, luts):
    the = tok.sp.piece_to_id("\u2581the")
    a = tok.sp.piece_to_id("a")
    assert tok.piece(the) == "\u2581the" and tok.piece(a) == "a"
    prev = torch.tensor([BOS, a, EOS, PAD])
    tgt = torch.tensor([the, the, the, the])
    # "the" = 3 bytes; + the space only after "a" (BOS/EOS/PAD are boundaries).
    assert target_bytes(prev, tgt, luts).tolist() == [3, 4, 3, 3]
    assert tok.decode([the]) == "the" and tok.decode([a, the]) == "a the"


def test_byte_fallback_tokens_count_one_byte_each(tok, luts):
    for text in ("中", "🙂", "ж"):
        ids = tok.encode(text)
        assert all(tok.sp.is_byte(i) for i in ids), [tok.piece(i) for i in ids]
        assert len(ids) == len(text.encode("utf-8"))  # 3, 4, 2 byte tokens
        assert doc_bytes(tok, luts, ids) == len(text.encode("utf-8"))
    # A mix: "a 中" = a, ▁, <0xE4>, <0xB8>, <0xAD> -> 1 + 1 + 3 = 5 bytes, not 1 + 1 + 9.
    ids = tok.encode("a 中")
    assert doc_bytes(tok, luts, ids) == 5


def test_control_and_unknown_targets_count_zero(tok, luts):
    a = tok.sp.piece_to_id("a")
    prev = torch.tensor([a, a, a, a, BOS])
    tgt = torch.tensor([PAD, BOS, EOS, UNK, BOS])
    assert target_bytes(prev, tgt, luts).tolist() == [0, 0, 0, 0, 0]


def test_multibyte_utf8_pieces_count_their_utf8_length(tok, luts):
    accented = [
        i for i in range(VOCAB) if "é" in tok.piece(i) and len(tok.piece(i).lstrip("\u2581")) >= 3
    ]
    assert accented, "expected a learned piece like '▁café'"
    for i in accented:
        piece = tok.piece(i)
        # UTF-8 by its rule: 1 byte below U+0080, 2 below U+0800 (é, à, ï), else 3.
        text = piece.lstrip("\u2581")
        by_hand = sum(1 if ord(ch) < 0x80 else 2 if ord(ch) < 0x800 else 3 for ch in text)
        assert luts.bytes_per_token[i] == by_hand, piece
    dash = tok.sp.piece_to_id("—")
    assert tok.piece(dash) == "—" and luts.bytes_per_token[dash] == 3
    cafe = tok.encode("a café")
    assert doc_bytes(tok, luts, cafe) == len("a café".encode("utf-8")) == 7


def test_standalone_space_piece_is_counted_once(tok, luts):
    text = "in 1999"
    ids = tok.encode(text)
    space = tok.sp.piece_to_id("\u2581")
    assert space in ids  # split_digits leaves "▁" on its own before the digits
    prev = torch.tensor([BOS] + ids)[:-1]
    per_target = target_bytes(prev, torch.tensor(ids), luts).tolist()
    assert per_target[ids.index(space)] == 1
    assert sum(per_target) == 7


# ---- the invariant: target bytes == UTF-8 bytes of the decoded text ----------------------------


def test_invariant_on_many_documents(tok, luts):
    rng = random.Random(99)
    texts = [make_document(rng) for _ in range(150)]
    texts += ["Plain ascii only.", "中文 and 🙂 mixed — naïve café.", "x"]
    texts += ["Ünïcødé ØÆ ß 1234567890"]
    encoded = tok.encode_documents(texts)
    for text, ids in zip(texts, encoded):
        assert tok.decode(ids) == text
        assert doc_bytes(tok, luts, ids) == len(text.encode("utf-8")), text
    # The validation stream layout: [BOS] doc [BOS] doc ...; scoring every token after the first.
    stream = torch.tensor([t for ids in encoded for t in [BOS, *ids]])
    total = int(target_bytes(stream[:-1], stream[1:], luts).sum())
    assert total == sum(len(t.encode("utf-8")) for t in texts)


def test_invariant_holds_against_decoded_text_when_nfkc_changes_it(tok, luts):
    for raw, normalized in [("ﬁnd １２ things", "find 12 things"), ("a  b\nc", "a b c")]:
        ids = tok.encode(raw)
        decoded = tok.decode(ids)
        assert decoded == normalized and decoded != raw
        assert doc_bytes(tok, luts, ids) == len(decoded.encode("utf-8"))
        assert doc_bytes(tok, luts, ids) != len(raw.encode("utf-8"))


# ---- BpbMeter ---------------------------------------------------------------------------------


def hand_luts() -> ByteLUTs:
    # ids: 0 <pad>, 1 <s>, 2 "▁ab", 3 "c", 4 <0x41>, 5 "▁"
    return ByteLUTs(
        bytes_per_token=torch.tensor([0, 0, 2, 1, 1, 0], dtype=torch.int16),
        has_leading_space=torch.tensor([False, False, True, False, False, True]),
        is_boundary=torch.tensor([True, True, False, False, False, False]),
    )


def test_meter_bpb_from_known_nlls_and_bytes():
    meter = BpbMeter(hand_luts())
    prev = torch.tensor([1, 2, 3, 4, 5, 1])
    tgt = torch.tensor([2, 3, 4, 5, 2, 0])
    # bytes: "ab" after <s> = 2; "c" = 1; <0x41> = 1; "▁" after a byte = 1;
    # "▁ab" after "▁" = 3; <pad> = 0
    assert target_bytes(prev, tgt, meter.luts).tolist() == [2, 1, 1, 1, 3, 0]
    nll = torch.tensor([0.5, 1.25, 2.0, 0.75, 3.0, 0.5], dtype=torch.bfloat16)
    meter.update(nll, prev, tgt)
    assert meter.tokens == 6 and meter.bytes == 8
    assert meter.loss == pytest.approx(8.0 / 6)
    assert meter.bpb == pytest.approx((8.0 / math.log(2)) / 8)
    assert meter.all_reduce() is meter  # no process group: a no-op


def test_meter_accumulates_in_float64():
    meter = BpbMeter(hand_luts())
    one = torch.ones(1, dtype=torch.float32)
    ids = torch.tensor([3])
    meter.update(torch.tensor([2.0**24]), ids, ids)
    for _ in range(1000):
        meter.update(one, ids, ids)
    assert meter.nll_sum == 2.0**24 + 1000  # a float32 sum would stay at 2**24
    assert torch.tensor(2.0**24, dtype=torch.float32) + 1 == 2.0**24


def test_meter_with_zero_bytes_is_a_clear_error():
    meter = BpbMeter(hand_luts())
    with pytest.raises(DataError, match="0 bytes"):
        meter.bpb
    meter.update(torch.tensor([1.0]), torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(DataError, match="0 bytes"):
        meter.bpb


# ---- evaluate_bpb and the baselines -----------------------------------------------------------


@pytest.fixture(scope="module")
def streams(tok, corpus):
    def stream(texts):
        return torch.tensor([t for ids in tok.encode_documents(texts) for t in [BOS, *ids]])

    rng = random.Random(7)
    return stream(corpus), stream([make_document(rng) for _ in range(60)])


def test_uniform_model_bpb_is_log2_vocab_per_byte(streams, luts):
    _, val = streams
    meter = evaluate_bpb(uniform_logits_fn(VOCAB), val, luts, seq_len=128, batch_seqs=4)
    scored = (val.numel() - 1) // 128 * 128
    assert meter.tokens == scored
    assert meter.loss == pytest.approx(math.log(VOCAB), rel=1e-6)
    assert meter.bpb == pytest.approx(math.log2(VOCAB) * meter.tokens / meter.bytes, rel=1e-6)


def test_unigram_beats_uniform(streams, luts):
    train, val = streams
    counts = count_tokens(train, VOCAB)
    assert counts.sum() == train.numel() and counts[BOS] == 600
    unigram = evaluate_bpb(unigram_logits_fn(counts), val, luts, seq_len=128, batch_seqs=4)
    uniform = evaluate_bpb(uniform_logits_fn(VOCAB), val, luts, seq_len=128, batch_seqs=4)
    assert unigram.bytes == uniform.bytes
    assert unigram.bpb < 0.8 * uniform.bpb
    with pytest.raises(DataError, match="outside a vocabulary"):
        count_tokens(torch.tensor([0, VOCAB]), VOCAB)


def test_two_ranks_sum_to_one_rank_and_tail_is_dropped(streams, luts):
    _, val = streams
    torch.manual_seed(0)
    table = torch.randn(VOCAB, VOCAB)

    def bigram_logits(x_bt):  # depends on context, so window boundaries matter
        return table[x_bt]

    seq_len = 100
    assert (val.numel() - 1) % seq_len != 0  # there is a tail to drop
    advanced = []
    single = evaluate_bpb(bigram_logits, val, luts, seq_len, batch_seqs=3, progress=advanced.append)
    total_seqs = (val.numel() - 1) // seq_len
    assert single.tokens == sum(advanced) == total_seqs * seq_len
    combined = BpbMeter(luts)
    for rank in range(2):
        combined.add(evaluate_bpb(bigram_logits, val, luts, seq_len, 3, rank=rank, world_size=2))
    assert combined.tokens == single.tokens and combined.bytes == single.bytes
    assert combined.nll_sum == pytest.approx(single.nll_sum, rel=1e-12)
    assert combined.bpb == pytest.approx(single.bpb, rel=1e-12)
    # The tail is ignored: appending tokens that do not complete a window changes nothing.
    longer = torch.cat([val[: total_seqs * seq_len + 1], val[:50]])
    again = evaluate_bpb(bigram_logits, longer, luts, seq_len, 3)
    assert again.nll_sum == pytest.approx(single.nll_sum)


def test_too_short_validation_set_is_a_data_error(luts):
    with pytest.raises(DataError, match="too few for one window"):
        short = torch.tensor([BOS, 5, 6])
        evaluate_bpb(uniform_logits_fn(VOCAB), short, luts, seq_len=8, batch_seqs=1)
