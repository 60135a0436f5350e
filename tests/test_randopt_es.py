"""ES on RandOpt's seeded perturbations (tracks/randopt_es.py): the base update equals the explicit
sum over materialized sign matrices, the z-scored antithetic coefficients by hand, ES improving a
toy reward, a killed run resumed from es.jsonl reaching the uninterrupted run's weights bit for
bit, and the result saved as a plain Hugging Face model."""

from __future__ import annotations

import json

import pytest
import torch

from test_perturb import Tiny, bits, snapshot
from underpar.errors import ConfigError
from underpar.kernels import perturb as P
from underpar.kernels.perturb_space import PerturbSpace
from underpar.tracks import randopt_es as es


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_equals_the_sum_over_materialized_perturbations(dtype):
    model = Tiny(dtype)
    base = snapshot(model)
    space = PerturbSpace(model)
    steps = [[(3, 2e-2), (8, -1e-2), (5, 4e-3)], [(3, 1e-4), (11, -3e-4)]]
    for terms in steps:
        space.update_base(terms)
    for name, p in model.named_parameters():
        acc = base[name].float()
        for terms in steps:  # every term added in fp32, left to right; one rounding at the end
            for seed, c in terms:
                r = P.signs_torch(seed, space.offsets[name], p.numel()).view(p.shape)  # materialized
                acc = acc + torch.tensor(c, dtype=torch.float32) * r
        assert torch.equal(bits(p.data), bits(acc.to(dtype))), name
    assert torch.equal(space.live_flat, space.base_flat)  # the live weights are the new base
    space.apply(1, 1e-2)
    space.restore()  # restores the updated base
    assert torch.equal(space.live_flat, space.base_flat)


def test_bf16_updates_below_the_spacing_add_up_in_the_master():
    model = Tiny(torch.bfloat16)
    space = PerturbSpace(model)
    before = space.base_flat.clone()
    for _ in range(64):
        space.update_base([(7, 1e-4)])  # each alone rounds away for |w| >~ 0.05
    moved = (space.base_flat.float() - before.float()).abs()
    assert moved.max() > 0.005 and torch.allclose(space.master, before.float() + 64 * 1e-4 *
                                                  P.signs_torch(7, 0, before.numel()), atol=1e-5)


def test_update_terms_by_hand():
    terms = es.update_terms([10, 20], plus=[1.0, 0.0], minus=[0.0, 1.0], sigma=0.5, lr=2.0)
    # rewards [1, 0, 0, 1]: mean 0.5, std 0.5, z = [1, -1, -1, 1]; scale = 2 / (4 * 0.5) = 1
    assert terms == [(10, 2.0), (20, -2.0)]
    assert es.update_terms([1, 2], [0.3, 0.3], [0.3, 0.3], 1e-3, 1e-3) == []
    with pytest.raises(ConfigError, match="es.sigma"):
        es.run_es(PerturbSpace(Tiny()), lambda pop: [0.0] * len(pop), es.ESConfig(sigma=0.0), None)


def toy_scorer(space: PerturbSpace, target: torch.Tensor, calls: list):
    """Reward of a candidate = -mean squared distance of its weights to `target`."""
    def score(population):
        calls.append(len(population))
        rewards = []
        for seed, sigma in population:
            space.apply(seed, sigma)
            rewards.append(-float((space.live_flat - target).pow(2).mean()))
        space.restore()
        return rewards
    return score


def test_es_improves_a_toy_reward_and_resumes_bit_for_bit(tmp_path):
    cfg = es.ESConfig(iterations=6, pairs=8, sigma=1e-2, lr=5e-4, seed=3)
    target = PerturbSpace(Tiny()).base_flat + 0.3 * P.signs_torch(99, 0, PerturbSpace(Tiny()).numel)
    whole = PerturbSpace(Tiny())
    history = es.run_es(whole, toy_scorer(whole, target, []), cfg, tmp_path / "a.jsonl", say=lambda _: None)
    rewards = [row["mean_reward"] for row in history]
    assert rewards == sorted(rewards) and rewards[-1] > rewards[0]  # closer to the target at every step
    assert len(history) == 6 and all(len(row["terms"]) == 8 for row in history)

    killed, calls = PerturbSpace(Tiny()), []
    score = toy_scorer(killed, target, calls)

    def dies_in_third(population):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(population)

    log = tmp_path / "b.jsonl"
    with pytest.raises(KeyboardInterrupt):
        es.run_es(killed, dies_in_third, cfg, log, say=lambda _: None)
    assert len(log.read_text().splitlines()) == 2
    with open(log, "a") as f:
        f.write('{"iteration": 2, "se')  # torn by the kill
    resumed, calls = PerturbSpace(Tiny()), []  # a fresh process: the starting weights again
    said = []
    again = es.run_es(resumed, toy_scorer(resumed, target, calls), cfg, log, say=said.append)
    assert calls == [16] * 4 and said[0] == "es: resumed after 2 of 6 iterations (updates replayed)"
    as_json = lambda rows: json.loads(json.dumps(rows))  # noqa: E731 - replayed rows hold lists, not tuples
    assert torch.equal(resumed.base_flat, whole.base_flat) and as_json(again) == as_json(history)
    assert [json.loads(line) for line in log.read_text().splitlines()] == as_json(history)
    with pytest.raises(ConfigError, match="another ES config"):
        es.run_es(PerturbSpace(Tiny()), score, es.ESConfig(iterations=6, pairs=8, sigma=1e-2, lr=0.1, seed=3), log)


def test_result_saves_as_a_plain_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_generate import make_model

    model = make_model("llama")
    space = PerturbSpace(model)
    space.update_base([(4, 1e-2), (6, -1e-2)])
    es.save_model(model, None, tmp_path / "es-model")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "es-model")
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and P.triton_available()), reason="needs CUDA and Triton")
def test_update_triton_equals_torch():
    fast, ref = PerturbSpace(Tiny(torch.bfloat16).cuda()), PerturbSpace(Tiny(torch.bfloat16).cuda())
    terms = [(3, 2e-3), (8, -1e-3), (5, 4e-4)]  # an odd count: two launches, the second with one seed
    fast.update_base(terms, backend="triton")
    ref.update_base(terms, backend="torch")
    assert torch.equal(fast.master, ref.master) and torch.equal(bits(fast.base_flat), bits(ref.base_flat))
