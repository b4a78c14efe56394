"""Suffix lookup with an output pool, the windowed draft model and the `auto` mode: all lossless."""
from __future__ import annotations

import random

import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export.pipeline import export
from edgerun.runtime.auto_speculation import MODEL_CLASS, AutoDrafter
from edgerun.runtime.draft_policy import AdaptiveDraftLength
from edgerun.runtime.drafters import ModelDrafter
from edgerun.runtime.sampling import SamplingParams
from edgerun.runtime.speculative import SpeculativeSpec, make_drafter, parse_speculative
from edgerun.runtime.suffix_lookup import SuffixAutomaton, SuffixDrafter

PROMPTS = [[5, 17, 42, 99, 3, 250, 7, 61], [12, 200, 33], [8, 9, 10, 8, 9, 10, 8, 9, 10, 8, 9]]


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    export(build_tiny_llama(root / "hf_target", seed=1), root / "target")
    export(build_tiny_llama(root / "hf_draft", seed=2, num_hidden_layers=2), root / "draft")
    return edgerun.Engine(root / "target", max_context=96), root / "draft"


def _tokens(engine, prompts, **kw):
    responses = list(engine.generate(prompts, max_new_tokens=40, ignore_eos=True, **kw))
    return [[r.token for r in responses if r.index == i] for i in range(len(prompts))]


def _brute_repeat(text):
    """(position after the first earlier occurrence, length) of the longest repeated suffix."""
    best = (0, 0)
    for length in range(1, len(text)):
        found = [i for i in range(len(text) - length) if text[i:i + length] == text[-length:]]
        if not found:
            break
        best = (found[0] + length, length)
    return best


def test_suffix_automaton_finds_the_longest_repeated_suffix():
    rng = random.Random(0)
    for _ in range(200):
        text = [rng.randint(0, 3) for _ in range(rng.randint(1, 40))]
        automaton = SuffixAutomaton()
        for i, token in enumerate(text):
            automaton.extend(token)
            assert automaton.repeat() == _brute_repeat(text[:i + 1])


def test_suffix_drafter_copies_long_matches_and_from_its_pool():
    drafter = SuffixDrafter(slack=4)
    context = [1, 2, 3, 4, 5, 6, 7, 8, 9, 50, 1, 2, 3]
    drafter.start([context[:9]], SamplingParams())
    assert drafter.classes([context]) == [2]
    assert drafter.propose([context], [16])[0].tokens == [4, 5, 6, 7, 8, 9, 50]  # match 3 + slack 4
    # that generation's output (50, 1, 2, 3 after the prompt) is in the pool for the next one
    drafter.start([[70, 71]], SamplingParams())
    assert drafter.pool_text == [50, 1, 2, 3, -1]
    assert drafter.classes([[70, 71, 50, 1, 2]]) == [4]
    assert drafter.propose([[70, 71, 50, 1, 2]], [8])[0].tokens == [3]  # never past the end of an output


@pytest.mark.parametrize("mode", ["suffix", "auto", "auto:DRAFT"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_suffix_and_auto_equal_plain(tiny_pair, mode, batch):
    target, draft = tiny_pair
    prompts = PROMPTS[-batch:]
    plain = _tokens(target, prompts)
    mode = mode.replace("DRAFT", str(draft))
    assert _tokens(target, prompts, speculative=mode) == plain
    assert _tokens(target, prompts, speculative=mode, draft_tokens=5) == plain
    if mode.startswith("auto:"):
        assert target.stats.proposed > 0


@pytest.mark.parametrize("batch", [1, 3])
def test_windowed_draft_equals_plain_and_slides(tiny_pair, batch):
    target, draft = tiny_pair
    prompts = PROMPTS[-batch:]
    drafter = ModelDrafter(edgerun.Engine(draft, max_context=96), window=4, sink=2)
    plain = _tokens(target, prompts)
    assert _tokens(target, prompts, speculative=drafter, draft_tokens=3) == plain
    assert target.stats.proposed > 0
    # 40 new tokens on windows of 4: every row slid, and the draft's cache never held more than
    # twice the window plus the drafts of a round
    assert all(offset > 0 for offset in drafter.offset)
    assert all(len(cached) <= 2 * 4 + 2 + 3 for cached in drafter.cached)


def test_windowed_draft_cache_after_a_slide_equals_a_fresh_window(tiny_pair):
    _, draft = tiny_pair
    drafter = ModelDrafter(edgerun.Engine(draft, max_context=96), window=4, sink=2)
    prompt = PROMPTS[0]
    drafter.start([prompt], SamplingParams())  # the sink (2 tokens) and the last 4
    assert drafter.cached == [prompt[:2] + prompt[-4:]] and drafter.cache.lengths[0] == 6
    context = prompt + [11, 12, 13, 14, 15]  # the view has now 2 + 9 >= 2 + 2 x 4 tokens: it slides
    slid = drafter.propose([context], [3])[0].tokens
    assert drafter.offset == [len(context) - 4]
    fresh = ModelDrafter(edgerun.Engine(draft, max_context=96), window=4, sink=2)
    fresh.start([context], SamplingParams())
    assert slid == fresh.propose([context], [3])[0].tokens


def test_window_must_fit_the_draft(tiny_pair):
    _, draft = tiny_pair
    with pytest.raises(ValueError, match="window must be in"):
        ModelDrafter(edgerun.Engine(draft, max_context=96), window=40)


def test_modes_parse():
    assert parse_speculative("suffix") == SpeculativeSpec("suffix")
    assert parse_speculative("auto") == SpeculativeSpec("auto")
    assert parse_speculative("auto:C:/m/x") == SpeculativeSpec("auto", "C:/m/x")
    for bad in ("auto:", "suffix:3"):
        with pytest.raises(ValueError, match="auto or auto:PATH"):
            parse_speculative(bad)


def test_auto_sends_rows_without_a_lookup_match_to_the_model(tiny_pair):
    target, draft = tiny_pair
    drafter = make_drafter(f"auto:{draft}", target)
    assert isinstance(drafter, AutoDrafter) and drafter.model is not None
    repeating, fresh = [8, 9, 10, 8, 9, 10, 8, 9], [5, 17, 42, 99]
    drafter.start([repeating, fresh], SamplingParams())
    assert drafter.classes([repeating, fresh]) == [2, MODEL_CLASS]
    drafts = drafter.propose([repeating, fresh], [3, 3])
    assert drafts[0].tokens == [10, 8, 9] and len(drafts[1].tokens) == 3


def test_a_draft_no_lighter_than_its_target_is_left_out_by_auto_and_warned_of(tiny_pair, caplog):
    """A draft that reads as many weight bytes per token as its target cannot pay: `auto` drafts by
    lookup alone, and an explicit `draft:` runs (exact) with a warning that says why it will not pay."""
    target, draft = tiny_pair
    heavy = target.package_dir  # the target's own package: the same bytes per token
    with caplog.at_level("WARNING", logger="edgerun.runtime.speculative"):
        auto = make_drafter(f"auto:{heavy}", target)
        assert isinstance(auto, AutoDrafter) and auto.model is None
        assert "auto leaves draft" in caplog.text and "by lookup only" in caplog.text
        caplog.clear()
        explicit = make_drafter(f"draft:{heavy}", target)
        assert isinstance(explicit, ModelDrafter)
        assert "cannot make decoding faster" in caplog.text and "MB of weights per token" in caplog.text
        caplog.clear()
        assert make_drafter(f"auto:{draft}", target).model is not None  # the 2-layer draft is lighter
        assert caplog.text == ""


def test_a_draft_that_cannot_pay_is_left_out_of_adaptive_generations_and_run_when_forced(tiny_pair):
    """With the default adaptive draft length, an explicit draft no lighter than its target is not
    run at all (its prefill and probe rounds would be pure loss): the generation is plain decoding.
    A fixed draft length runs it as asked, and both outputs equal plain greedy."""
    target, _ = tiny_pair
    heavy = f"draft:{target.package_dir}"
    prompts = [[5, 17, 42, 99, 3], [8, 9, 10, 8, 9, 10]]
    plain = _tokens(target, prompts)
    assert _tokens(target, prompts, speculative=heavy) == plain
    assert target.stats.rounds == 0 and target.stats.proposed == 0
    drafter = target._drafters[parse_speculative(heavy)]
    assert drafter.cannot_pay and drafter.cache is None  # never started: no draft prefill
    assert _tokens(target, prompts, speculative=heavy, draft_tokens=2) == plain
    assert target.stats.rounds > 0 and drafter.cache is not None
    use = target.memory()  # the draft's load and KV cache are its own line, not "activations"
    assert use.drafts != 0 and drafter.engine._kv.nbytes > 0 and "draft model" in use.summary()
    parts = use.weights_resident + use.kv_cache + use.runtime + use.activations + use.process + use.drafts
    assert parts == use.rss


def test_auto_starts_the_model_lazily_and_leaves_it_out_after_a_generation_it_did_not_pay(tiny_pair):
    target, draft = tiny_pair
    drafter = make_drafter(f"auto:{draft}", target)
    fresh = [5, 17, 42, 99]
    drafter.start([fresh], SamplingParams())
    assert drafter.classes([fresh]) == [MODEL_CLASS] and not drafter.model_started
    drafter.propose([fresh], [0])
    assert not drafter.model_started  # no drafts asked of it: no prefill paid
    drafter.propose([fresh], [2])
    assert drafter.model_started
    drafter.model_rounds = [1, 10]  # the policy gave it drafts in 1 of its 10 rounds: it did not pay
    used = []
    for _ in range(4):
        drafter.start([fresh], SamplingParams())
        used.append(drafter.classes([fresh]) == [MODEL_CLASS])
    # left out of two generations, tried in the third, whose one model round drafted nothing: out again, longer
    assert used == [False, False, True, False] and drafter.skip == 4
    paying = make_drafter(f"auto:{draft}", target)
    paying.start([fresh], SamplingParams())
    paying.model_rounds = [9, 10]  # drafts in 9 of its 10 rounds, no slower than plain rounds
    paying.start([fresh], SamplingParams())
    assert paying.use_model and paying.skip == 0


def test_policy_turns_off_an_unpaying_model_draft_but_keeps_the_lookup():
    """Costs are kept per cost group: a model draft that costs a step per token and is never
    accepted is switched off after its probes while a free, accepted lookup keeps drafting."""
    policy = AdaptiveDraftLength()
    for _ in range(12):
        k = policy.length(MODEL_CLASS)
        if k:
            policy.update([(k, 0)], 0.010 * k, 0.010 + 0.002 * k, [MODEL_CLASS])
        else:
            policy.update([(0, 0)], 0.0, 0.010, [MODEL_CLASS])
        k = policy.length(2)
        policy.update([(k, k)], 0.0001, 0.010 + 0.002 * k, [2])
    assert policy.length(MODEL_CLASS) == 0
    assert policy.length(2) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 3])
def test_real_model_suffix_and_auto_equal_plain(smollm2_engine, smollm2_package, chat_prompts, batch):
    """The real model: suffix lookup and auto with a windowed draft (the same package, its own
    engine) give plain greedy's tokens."""
    engine = smollm2_engine
    model = ModelDrafter(edgerun.Engine(smollm2_package, max_context=512), window=16, sink=8)
    prompts = chat_prompts[:batch] if batch > 1 else chat_prompts[0]
    plain = list(engine.generate(prompts, max_new_tokens=48))
    for drafter in ("suffix", AutoDrafter(SuffixDrafter(), model)):
        spec = list(engine.generate(prompts, max_new_tokens=48, speculative=drafter))
        for row in range(batch):  # a speculative round yields several tokens of a row at once
            assert [r.token for r in spec if r.index == row] == [r.token for r in plain if r.index == row]
