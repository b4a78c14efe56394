"""Speculative decoding is lossless: greedy output identical, sampled distribution preserved."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export.pipeline import ExportOptions, export
from edgerun.runtime.draft_policy import AdaptiveDraftLength
from edgerun.runtime.drafters import Draft, Drafter, LookupDrafter, ModelDrafter
from edgerun.runtime.sampling import Sampler, SamplingParams
from edgerun.runtime.speculative import SpeculativeSpec, make_drafter, parse_speculative, verify

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 61], [12, 200, 33], [8, 9, 10, 8, 9, 10, 8, 9, 10, 8, 9]]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """Target and a different draft (other random weights, same tokenizer)."""
    root = tmp_path_factory.mktemp("spec")
    export(build_tiny_llama(root / "hf_target", seed=1), root / "target",
           ExportOptions(stage_boundaries=(2,), separate_head=True))
    export(build_tiny_llama(root / "hf_draft", seed=2, num_hidden_layers=2), root / "draft")
    return edgerun.Engine(root / "target", max_context=96), root / "draft"


def _tokens(engine, prompts, **kw):
    # random weights: ignore_eos always compares full lengths
    responses = list(engine.generate(prompts, max_new_tokens=40, ignore_eos=True, **kw))
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


class _RowLengths:
    """A policy of one's own: row classes from the lookup drafter pick fixed lengths."""

    def __init__(self):
        self.seen: list[tuple[list[int], list[tuple[int, int]]]] = []

    def lengths(self, classes):
        return [{0: 0, 1: 1, 2: 5}[c] for c in classes]

    def update(self, rows, draft_s, verify_s, classes=None):
        self.seen.append((list(classes), list(rows)))


def test_a_draft_policy_object_replaces_the_default(tiny_pair):
    target, _ = tiny_pair
    policy = _RowLengths()
    plain = _tokens(target, PROMPTS)
    assert _tokens(target, PROMPTS, speculative="lookup", draft_tokens=policy) == plain
    assert policy.seen and any(proposed for _, rows in policy.seen for proposed, _ in rows)
    for classes, rows in policy.seen:  # one (proposed, accepted) per active row, within its class's length
        assert len(classes) == len(rows)
        assert all(proposed <= {0: 0, 1: 1, 2: 5}[c] and accepted <= proposed
                   for c, (proposed, accepted) in zip(classes, rows))
    with pytest.raises(ValueError, match="DraftPolicy"):
        target.generate(PROMPTS[0], speculative="lookup", draft_tokens=object())


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
    import json

    target, draft = tiny_pair
    export(build_tiny_llama(tmp_path / "hf", seed=3), tmp_path / "pkg")
    path = tmp_path / "pkg" / "tokenizer.json"  # two tokens swap ids (an extra token would not fit the model)
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="different vocabulary"):
        make_drafter(f"draft:{tmp_path / 'pkg'}", target)


def test_unknown_mode_and_bad_draft_tokens(tiny_pair):
    target, _ = tiny_pair
    with pytest.raises(ValueError, match="unknown speculative mode"):
        target.generate(PROMPTS[0], speculative="magic")
    with pytest.raises(ValueError, match="draft_tokens"):
        target.generate(PROMPTS[0], speculative="lookup", draft_tokens=0)


@pytest.mark.parametrize("text, spec", [
    ("lookup", SpeculativeSpec("lookup", ())), ("lookup:4", SpeculativeSpec("lookup", (4,))),
    ("lookup:4,2", SpeculativeSpec("lookup", (4, 2))), ("self:3", SpeculativeSpec("self", 3)),
    ("draft:C:/models/x", SpeculativeSpec("draft", "C:/models/x")),
])
def test_speculative_modes_parse(text, spec):
    assert parse_speculative(text) == spec


@pytest.mark.parametrize("text, expected", [
    ("magic", "unknown speculative mode 'magic'"), ("lookup:", "lookup takes MAX_NGRAM"),
    ("lookup:2,3", "1 <= MIN_NGRAM <= MAX_NGRAM"), ("lookup:0", "lookup takes"), ("lookup:3,1,1", "lookup takes"),
    ("lookup:x", "lookup takes"), ("self:", "self:K needs"), ("self:0", "K >= 1"), ("self:two", "self:K needs"),
    ("draft:", "draft:PATH needs"), ("Lookup", "unknown speculative mode"),
])
def test_bad_speculative_modes_name_the_value_and_the_forms(text, expected):
    with pytest.raises(ValueError, match="auto or auto:PATH") as info:
        parse_speculative(text)
    assert expected in str(info.value) and repr(text) in str(info.value) and "\n" not in str(info.value)


def test_cli_rejects_a_bad_speculative_mode_before_loading(capsys, tmp_path):
    from edgerun.cli import main

    assert main(["run", str(tmp_path / "no-such-model"), "hi", "--speculative", "self:x"]) != 0
    err = capsys.readouterr().err
    assert "bad speculative mode 'self:x'" in err and "no-such-model" not in err


class _Repeat(Drafter):
    """A drafter of one's own: proposes the last token again; only `propose` is written."""

    def propose(self, contexts, lengths):
        return [Draft([context[-1]] * k) for context, k in zip(contexts, lengths)]


def test_a_drafter_subclass_uses_the_defaults(tiny_pair):
    target, _ = tiny_pair
    drafter = _Repeat()
    assert drafter.classes([[1], [2, 3]]) == [0, 0] and drafter.target_forward is None
    plain = _tokens(target, PROMPTS)
    assert _tokens(target, PROMPTS, speculative=drafter, draft_tokens=2) == plain
    assert target.stats.proposed > 0
    with pytest.raises(TypeError, match="Drafter subclass"):
        target.generate(PROMPTS[0], speculative=object())
    with pytest.raises(NotImplementedError, match="propose"):
        Drafter().propose([[1]], [1])


def test_lookup_copies_after_latest_match():
    drafter = LookupDrafter(max_ngram=2)
    context = [1, 2, 3, 4, 9, 1, 2, 5, 6, 7, 1, 2]
    assert drafter.propose([context], [3])[0].tokens == [5, 6, 7]  # most recent "1 2" -> 5 6 7
    assert drafter.propose([[1, 2, 3]], [3])[0].tokens == []  # no earlier occurrence


def test_lookup_prefers_the_longest_match_and_classifies_it():
    """Among occurrences of the suffix, the one agreeing furthest back wins (latest on a tie);
    classes say how long the match is: 0 none, 1 a single token, 2 longer."""
    context = [4, 5, 6, 7, 1, 2, 9, 8, 6, 7, 3, 3, 5, 6, 7]
    # "6 7" occurs at 2 (preceded by 5, like the end) and at 8 (preceded by 8): 2 reaches further back
    assert LookupDrafter(max_ngram=2).propose([context], [2])[0].tokens == [1, 2]
    assert LookupDrafter(max_ngram=2).match(context) == (4, 3)  # copy from 4; "5 6 7" agrees
    drafter = LookupDrafter()
    assert drafter.classes([[1, 2, 3], [5, 1, 9, 1], context]) == [0, 1, 2]
    assert drafter.propose([[5, 1, 9, 1]], [4])[0].tokens == [9, 1]  # a single-token match drafts too
    assert LookupDrafter(min_ngram=2).propose([[5, 1, 9, 1]], [4])[0].tokens == []


def test_lookup_drafts_at_most_slack_beyond_the_match():
    """A 2-token match drafts at most 2 + slack tokens; a copy that already ran 8 tokens drafts more."""
    text = list(range(10, 40))
    short = [7, 8] + text + [5, 7, 8]  # "7 8" matched, preceded by 5 vs 40: length 2
    assert LookupDrafter(slack=3).propose([short], [16])[0].tokens == text[:5]
    assert LookupDrafter(slack=None).propose([short], [16])[0].tokens == text[:16]
    long = text + [99] + text[:8]  # the last 8 tokens repeat the start
    assert LookupDrafter(slack=3).propose([long], [16])[0].tokens == text[8:19]
    with pytest.raises(ValueError, match="slack"):
        LookupDrafter(slack=0)


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


def _rounds(policy, n, outcomes, draft_s, verify_s):
    """Feed n rounds at the lengths the policy asks for; outcomes(k) -> (proposed, accepted)."""
    lengths = []
    for _ in range(n):
        k = policy.length()
        lengths.append(k)
        proposed, accepted = outcomes(k)
        policy.update([(proposed, accepted)] if k else [], draft_s(k), verify_s(k))
    return lengths


def test_adaptive_policy_stops_drafting_when_it_does_not_pay():
    policy = AdaptiveDraftLength(max_tokens=8)
    assert policy.length() == 4  # no warm-up: the first round probes
    # drafts cost as much as a step each and are never accepted
    _rounds(policy, 40, lambda k: (k, 0), lambda k: 0.010 * k, lambda k: 0.010 + 0.001 * k)
    lengths = _rounds(policy, 400, lambda k: (k, 0), lambda k: 0.010 * k, lambda k: 0.010 + 0.001 * k)
    probes = [i for i, k in enumerate(lengths) if k]
    assert lengths.count(0) >= 390 and set(lengths) == {0, 2}  # off, with occasional probes
    gaps = np.diff(probes)
    assert len(probes) >= 2 and all(gaps[1:] >= 2 * gaps[:-1] - 1)  # each failed probe doubles the wait


def test_adaptive_policy_drafts_long_when_drafts_are_cheap_and_accepted():
    good = AdaptiveDraftLength(max_tokens=8)
    slow = iter([0.3] + [0.0] * 1000)  # one round descheduled by another process
    lengths = _rounds(good, 40, lambda k: (k, k), lambda k: 0.0001 * k,
                      lambda k: 0.010 + 0.0005 * k + next(slow))
    assert lengths[:4] == [4, 2, 4, 2]  # two probe lengths in turn until both widths are timed twice
    assert min(lengths[-30:]) >= 6 and good.length() >= 6


def test_adaptive_policy_costs_are_fitted_robustly():
    policy = AdaptiveDraftLength()
    rounds = [(k, 0.020 + 0.002 * k, 0.001 + 0.010 * k) for _ in range(3) for k in (0, 1, 3, 5)]
    rounds[4:4] = [(3, 0.4, 0.5), (0, 0.3, 0.0)]  # descheduled: slower, never faster
    for k, verify_s, draft_s in rounds:
        policy.update([(k, 0)] if k else [], draft_s, verify_s)
    t_step, t_extra, t_round, t_draft = policy.costs()
    assert t_step == pytest.approx(0.020) and t_extra == pytest.approx(0.002)
    assert t_round == pytest.approx(0.001) and t_draft == pytest.approx(0.010)


def test_adaptive_policy_survival_counts_only_tried_positions():
    """A round accepting 1 of 4 drafts tested positions 1 and 2; a round accepting all 4 tells
    nothing about position 5. Hazard is fitted non-increasing: runs make deep positions easier."""
    policy = AdaptiveDraftLength(max_tokens=6, prior_weight=0.0)
    for _ in range(4):
        policy.update([(4, 1)], 0.001, 0.01)
    # position 1 always passed, 2 always failed: a hazard rising with depth is pooled (4 of 8),
    # and positions never tried take the deepest estimate
    np.testing.assert_allclose(policy.survival(), 0.5 ** np.arange(1, 7))
    policy = AdaptiveDraftLength(max_tokens=6, prior_weight=0.0)
    policy.update([(4, 0)], 0.001, 0.01)  # fails at 1
    policy.update([(4, 4)], 0.001, 0.01)
    policy.update([(4, 4), (2, 1)], 0.001, 0.01)  # batch: one observation per row
    # position 1: 1 failure in 4 tries, 2: 1 in 3, 3-4: 0 in 2; non-increasing: 1-2 pooled 2/7;
    # 5-6 never tried: the deepest estimate (0), but at least untried_hazard
    s = policy.survival()
    np.testing.assert_allclose(s, np.cumprod([5 / 7, 5 / 7, 1, 1, 0.9, 0.9]))


def test_adaptive_policy_keeps_one_curve_per_class():
    """Rows of a class whose drafts always fail stop drafting; another class's keep their length,
    and a batch round records each row under its own class."""
    policy = AdaptiveDraftLength(max_tokens=8)
    for _ in range(60):
        ks = policy.lengths([1, 2])
        rows = [(ks[0], 0), (ks[1], ks[1])]
        policy.update(rows, 0.0001, 0.010 + 0.0005 * max(ks), classes=[1, 2])
    assert policy.lengths([1, 2, 2]) == [0, 8, 8]
    assert policy.survival(2)[-1] > 0.9 > 0.1 > policy.survival(1)[0]
    assert policy.length(3) > 0  # an unseen class starts from the prior: it drafts


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
