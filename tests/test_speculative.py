"""Speculative decoding is lossless: greedy output identical, sampled distribution preserved."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import build_tiny_llama

import edgerun
from edgerun.export.package import export
from edgerun.runtime.sampling import Sampler, SamplingParams
from edgerun.runtime.speculative import (AdaptiveDraftLength, Draft, LookupDrafter, ModelDrafter,
                                         make_drafter, verify)

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 61], [12, 200, 33], [8, 9, 10, 8, 9, 10, 8, 9, 10, 8, 9]]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Target and a different draft (other random weights, same tokenizer)."""
    root = tmp_path_factory.mktemp("spec")
    export(build_tiny_llama(root / "hf_target", seed=1), root / "target", stage_boundaries=[2], separate_head=True)
    export(build_tiny_llama(root / "hf_draft", seed=2, num_hidden_layers=2), root / "draft")
    target = edgerun.Engine(root / "target", max_context=96)
    target.eos_token_ids = frozenset()  # random weights: always compare full lengths
    return target, root / "draft"


def _tokens(engine, prompts, **kw):
    responses = list(engine.generate(prompts, max_new_tokens=40, **kw))
    return [[r.token for r in responses if r.index == i] for i in range(len(prompts))]


@pytest.mark.parametrize("draft_tokens", ["auto", 1, 3, 7])
def test_greedy_draft_model_equals_plain(tiny_pair, draft_tokens):
    target, draft = tiny_pair
    plain = _tokens(target, PROMPTS)
    spec = _tokens(target, PROMPTS, speculative=f"draft:{draft}", draft_tokens=draft_tokens)
    assert spec == plain
    assert target.stats.proposed > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_confident_drafts_equal_plain(tiny_pair, batch):
    """A drafter that stops at unsure drafts proposes fewer, and stays lossless."""
    target, draft = tiny_pair
    prompts = PROMPTS[-batch:]
    drafter = ModelDrafter(edgerun.Engine(draft, max_context=96), min_confidence=0.5)
    plain = _tokens(target, prompts)
    assert _tokens(target, prompts, speculative=drafter, draft_tokens=6) == plain
    assert 0 < target.stats.proposed < 6 * target.stats.rounds


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_self_speculation_equals_plain(tiny_pair, batch):
    target, _ = tiny_pair
    prompts = PROMPTS[-batch:]
    plain = _tokens(target, prompts)
    assert _tokens(target, prompts, speculative="self:2", draft_tokens=3) == plain
    assert target.stats.proposed > 0


def test_self_speculation_needs_an_exit_boundary(tiny_pair):
    target, _ = tiny_pair
    with pytest.raises(ValueError, match="--exit-layers 3"):
        make_drafter("self:3", target)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_lookup_equals_plain(tiny_pair, batch):
    target, _ = tiny_pair
    prompts = PROMPTS[-batch:]
    assert _tokens(target, prompts, speculative="lookup", draft_tokens=4) == _tokens(target, prompts)


def test_draft_with_other_vocabulary_is_refused(tiny_pair, tmp_path):
    from tokenizers import Tokenizer

    target, draft = tiny_pair
    export(build_tiny_llama(tmp_path / "hf", seed=3), tmp_path / "pkg")
    tokenizer = Tokenizer.from_file(str(tmp_path / "pkg" / "tokenizer.json"))
    tokenizer.add_special_tokens(["<extra_token>"])
    tokenizer.save(str(tmp_path / "pkg" / "tokenizer.json"))
    with pytest.raises(ValueError, match="different vocabulary"):
        make_drafter(f"draft:{tmp_path / 'pkg'}", target)


def test_unknown_mode_and_bad_draft_tokens(tiny_pair):
    target, _ = tiny_pair
    with pytest.raises(ValueError, match="unknown speculative mode"):
        target.generate(PROMPTS[0], speculative="magic")
    with pytest.raises(ValueError, match="draft_tokens"):
        target.generate(PROMPTS[0], speculative="lookup", draft_tokens=0)


def test_lookup_copies_after_latest_match():
    drafter = LookupDrafter(max_ngram=2)
    context = [1, 2, 3, 4, 9, 1, 2, 5, 6, 7, 1, 2]
    assert drafter.propose([context], [3])[0].tokens == [5, 6, 7]  # most recent "1 2" -> 5 6 7
    assert drafter.propose([[1, 2, 3]], [3])[0].tokens == []  # no earlier occurrence


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0, "a token outside the target's support was produced"
    return float(((counts[mask] - expected[mask]) ** 2 / expected[mask]).sum())


@pytest.mark.parametrize("deterministic_draft", [False, True], ids=["model-q", "lookup-q"])
def test_sampled_verification_preserves_target_distribution(deterministic_draft):
    """First emitted token ~ p regardless of q: chi-square over 20k draws (fixed seeds)."""
    rng = np.random.default_rng(0)
    vocab, k = 8, 3
    target_logits = rng.normal(size=(k + 1, vocab)) * 1.5
    draft_logits = rng.normal(size=(k, vocab)) * 1.5
    params = SamplingParams(temperature=1.0, seed=0)
    p0 = Sampler(params, vocab).dense(target_logits[0])
    counts = np.zeros(vocab)
    draft_rng = np.random.default_rng(1)
    sampler = Sampler(params, vocab, np.random.default_rng(2))
    for _ in range(20000):
        q = [Sampler(params, vocab).dense(row) for row in draft_logits]
        tokens = [int(draft_rng.choice(vocab, p=qi)) for qi in q]
        draft = Draft(tokens, None if deterministic_draft else q)
        sampler.seen[:] = False
        counts[verify(sampler, draft, target_logits)[0]] += 1
    # 7 degrees of freedom: the 0.999 quantile is 24.3
    assert _chi_square(counts, p0) < 24.3


@pytest.mark.parametrize("mode", ["draft", "self:2", "lookup"])
def test_sampled_speculative_generation_is_seeded(tiny_pair, mode):
    target, draft = tiny_pair
    mode = f"draft:{draft}" if mode == "draft" else mode
    kw = dict(temperature=0.9, top_p=0.95, seed=5, speculative=mode, draft_tokens=3)
    assert _tokens(target, PROMPTS[:2], **kw) == _tokens(target, PROMPTS[:2], **kw)


def test_adaptive_policy_stops_drafting_when_it_does_not_pay():
    policy = AdaptiveDraftLength(max_tokens=8, warmup=3)
    assert policy.length() == 0  # plain steps are timed first
    for _ in range(3):
        policy.update(0, 0, 0.0, 0.010)  # plain step: 10 ms
    for _ in range(20):  # drafts cost as much as a step and are never accepted
        policy.update(4, 0, 0.040, 0.012)
    lengths = [policy.length() for _ in range(32)]
    assert lengths.count(0) >= 30 and 2 in lengths  # off, with occasional probes
    good = AdaptiveDraftLength(max_tokens=8, warmup=3)
    for step_s in (0.010, 0.011, 0.200):  # one step descheduled by another process
        good.update(0, 0, 0.0, step_s)
    for _ in range(20):  # cheap drafts, almost always accepted
        good.update(6, 6, 0.0006, 0.011)
    good.update(6, 6, 0.05, 0.3)  # a slow outlier round does not switch drafting off
    assert good.length() >= 6


def test_adaptive_policy_counts_only_tried_positions():
    """A round accepting 1 of 4 drafts tried 2 positions: the rate is 1/2, not 1/4."""
    policy = AdaptiveDraftLength(window=4)
    for _ in range(4):
        policy.update(4, 1, 0.001, 0.01)
    assert policy.rate == 0.5
    policy.update(4, 4, 0.001, 0.01)  # every draft accepted: 4 of 4 tried
    assert policy.rate == (3 * 1 + 4) / (3 * 2 + 4)


def test_model_drafter_cache_follows_accepted_tokens(tiny_pair):
    target, draft = tiny_pair
    drafter = make_drafter(f"draft:{draft}", target)
    assert isinstance(drafter, ModelDrafter)
    drafter.start([PROMPTS[0]], SamplingParams())
    first = drafter.propose([PROMPTS[0]], [3])[0].tokens
    # the target accepted one draft and corrected the next: the drafter must resume from there
    context = PROMPTS[0] + first[:1] + [77]
    resumed = drafter.propose([context], [3])[0].tokens
    fresh = make_drafter(f"draft:{draft}", target)
    fresh.start([context], SamplingParams())
    assert resumed == fresh.propose([context], [3])[0].tokens


def test_quantized_types_are_named_as_shape_dependent():
    from edgerun.runtime.engine import inexact_verification_types

    assert inexact_verification_types({"mlp": "Q4_1+Q8_0", "norms": "float32"}) == ["Q4_1", "Q8_0"]
    assert inexact_verification_types({"mlp": "float32", "embedding": "float32", "lm_head": "tied"}) == []
    assert inexact_verification_types({"mlp": "int4_asym(b32)"}) == ["int4_asym(b32)"]


def test_model_drafter_reuses_its_cache_and_refuses_the_target_itself(tiny_pair):
    target, draft = tiny_pair
    drafter = make_drafter(f"draft:{draft}", target)
    _tokens(target, PROMPTS[:1], speculative=drafter, draft_tokens=2)
    first = drafter.cache
    _tokens(target, PROMPTS[1:2], speculative=drafter, draft_tokens=2)
    assert drafter.cache is first  # same batch size: no new KV allocation per generation
    with pytest.raises(ValueError, match="cannot draft for itself"):
        list(target.generate(PROMPTS[0], max_new_tokens=4, speculative=ModelDrafter(target)))
