"""Tests for edgerun.runtime.sampling, against the definitions (brute-force references), not the code.

Definitions (Hugging Face's logits processors, in their order): repetition penalty, temperature,
top-k, then top-p over the renormalised top-k distribution, then a draw from what survives.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from edgerun.runtime import sampling
from edgerun.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, distribution

SMALL_V = 50
LARGE_V = 49152  # SmolLM2's vocabulary: large enough that the nucleus outgrows the first 64 candidates


def small_logits(seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, scale, SMALL_V).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x.astype(np.float64) - np.max(x))
    return e / e.sum()


def reference(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> dict[int, float]:
    """Brute force: softmax(logits / T); keep the k largest; then the smallest highest-probability set
    whose (renormalised top-k) mass reaches top_p; renormalise. Returns {token: probability}."""
    probs = softmax(logits.astype(np.float64) / temperature)
    order = np.argsort(-probs, kind="stable")
    if 0 < top_k < probs.size:
        kth = np.sort(probs)[::-1][top_k - 1]
        survives = probs >= kth
        assert np.count_nonzero(survives) == top_k, "test logits must not tie at the top-k boundary"
        probs = np.where(survives, probs, 0.0) / probs[survives].sum()
        order = order[:top_k]
    if top_p < 1.0:
        mass = np.cumsum(np.sort(probs)[::-1])
        n = int(np.argmax(mass >= top_p)) + 1  # first prefix whose mass reaches top_p
        # the set is only well defined if top_p is not within rounding of a prefix mass
        assert np.min(np.abs(mass - top_p)) > 1e-9, "test top_p too close to a prefix mass"
        order = order[:n]
    kept = probs[order] / probs[order].sum()
    return dict(zip(order.tolist(), kept.tolist()))


def as_dict(ids: np.ndarray, probs: np.ndarray) -> dict[int, float]:
    assert ids.shape == probs.shape
    assert len(set(ids.tolist())) == ids.size, "duplicate token ids in the distribution"
    in_id_order = np.array_equal(ids, np.arange(ids.size))  # no cut: the whole vocabulary, unsorted
    assert in_id_order or np.all(np.diff(probs) <= 1e-15), "a cut distribution must be sorted by descending probability"
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    return dict(zip(ids.tolist(), probs.tolist()))


def assert_same_distribution(got: dict[int, float], want: dict[int, float]) -> None:
    assert set(got) == set(want), (sorted(set(got) ^ set(want)), len(got), len(want))
    for token, p in want.items():
        assert got[token] == pytest.approx(p, rel=1e-9, abs=1e-300), token


def draw(params: SamplingParams, logits: np.ndarray, n: int) -> np.ndarray:
    sampler = Sampler(params, logits.size)
    return np.array([sampler(logits) for _ in range(n)])


# chi-square goodness of fit, without scipy: Wilson-Hilferty critical value at alpha = 1e-4
_Z_1E4 = 3.719


def chi2_critical(df: int) -> float:
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + _Z_1E4 * math.sqrt(h)) ** 3


def chi2_statistic(samples: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic, pooling categories whose expected count is below 5 into one."""
    n = samples.size
    observed = np.bincount(samples, minlength=probs.size).astype(np.float64)
    expected = probs * n
    big = expected >= 5
    assert observed[probs == 0].sum() == 0, "a zero-probability token was drawn"
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < 5:  # the pooled bin itself is too small: merge it into the smallest kept one
        j = int(np.argmin(exp[:-1]))
        obs[j] += obs[-1]
        exp[j] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    return float(((obs - exp) ** 2 / exp).sum()), obs.size - 1


def dense(dist: dict[int, float], size: int) -> np.ndarray:
    out = np.zeros(size)
    out[list(dist)] = list(dist.values())
    return out


# ---------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("seed", range(5))
def test_greedy_returns_argmax(seed):
    logits = small_logits(seed)
    sampler = Sampler(SamplingParams(temperature=0.0, seed=seed), SMALL_V)
    for _ in range(5):  # a greedy sampler has nothing random: always the argmax
        assert sampler(logits) == int(np.argmax(logits))
    big = np.random.default_rng(seed).normal(size=LARGE_V).astype(np.float32)
    assert Sampler(SamplingParams(), LARGE_V)(big) == int(np.argmax(big))


@pytest.mark.parametrize("temperature", [0.1, 1.0, 5.0, 1000.0])
def test_top_k_1_returns_argmax_at_any_temperature(temperature):
    for seed in range(5):
        logits = small_logits(seed, scale=0.01)  # nearly flat: any sampling would show
        ids, probs = distribution(logits, SamplingParams(temperature=temperature, top_k=1))
        assert ids.tolist() == [int(np.argmax(logits))] and probs.tolist() == [1.0]
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=1, seed=seed), SMALL_V)
        assert {sampler(logits) for _ in range(50)} == {int(np.argmax(logits))}


# ----------------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("temperature", [0.5, 1.5])
def test_temperature_frequencies_match_softmax(temperature):
    logits = small_logits(1, scale=1.0)
    want = softmax(logits.astype(np.float64) / temperature)
    assert_same_distribution(as_dict(*distribution(logits, SamplingParams(temperature=temperature))),
                             dict(enumerate(want.tolist())))
    samples = draw(SamplingParams(temperature=temperature, seed=1234), logits, 30_000)
    stat, df = chi2_statistic(samples, want)
    assert df >= 10
    assert stat < chi2_critical(df), (stat, df, chi2_critical(df))
    # the test has power: the same draws clearly reject the untempered softmax
    wrong, df_wrong = chi2_statistic(samples, softmax(logits))
    assert wrong > 10 * chi2_critical(df_wrong), (wrong, df_wrong)


# ----------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("top_k", [1, 2, 5, 17, 49])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_top_k_distribution_is_renormalised_softmax_of_k_largest(top_k, temperature):
    logits = small_logits(top_k)
    got = as_dict(*distribution(logits, SamplingParams(temperature=temperature, top_k=top_k)))
    assert len(got) == top_k
    assert set(got) == set(np.argsort(logits)[::-1][:top_k].tolist())
    assert_same_distribution(got, reference(logits, temperature, top_k=top_k))


@pytest.mark.parametrize("top_k", [0, SMALL_V, SMALL_V + 10])
def test_top_k_off_or_at_least_vocab_keeps_everything(top_k):
    logits = small_logits(3)
    got = as_dict(*distribution(logits, SamplingParams(temperature=1.0, top_k=top_k)))
    assert_same_distribution(got, reference(logits, 1.0))


def test_top_k_sampling_only_draws_the_k_largest():
    logits = small_logits(4)
    top5 = set(np.argsort(logits)[::-1][:5].tolist())
    samples = draw(SamplingParams(temperature=3.0, top_k=5, seed=7), logits, 20_000)
    assert set(samples.tolist()) == top5  # never anything else, and each of the five does appear
    want = dense(reference(logits, 3.0, top_k=5), SMALL_V)
    stat, df = chi2_statistic(samples, want)
    assert stat < chi2_critical(df), (stat, df)


# ----------------------------------------------------------------------------------------- top-p


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.55, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.7])
def test_top_p_keeps_smallest_set_reaching_p(top_p, temperature):
    logits = small_logits(11)
    got = as_dict(*distribution(logits, SamplingParams(temperature=temperature, top_p=top_p)))
    want = reference(logits, temperature, top_p=top_p)
    assert_same_distribution(got, want)
    # the definition, spelled out: the kept set reaches p, dropping its least likely member does not
    full = softmax(logits / temperature)
    kept = np.sort(full[list(got)])
    assert kept.sum() >= top_p > kept[1:].sum()
    if len(got) < SMALL_V:  # and it is made of the most likely tokens
        assert full[list(got)].min() >= np.delete(full, list(got)).max()


@pytest.mark.parametrize("top_k,top_p", [(10, 0.5), (10, 0.9), (3, 0.7), (25, 0.6), (40, 0.97)])
def test_top_p_applies_to_renormalised_top_k(top_k, top_p):
    logits = small_logits(5)
    params = SamplingParams(temperature=1.3, top_k=top_k, top_p=top_p)
    assert_same_distribution(as_dict(*distribution(logits, params)),
                             reference(logits, 1.3, top_k=top_k, top_p=top_p))


def test_top_k_then_top_p_order_matters():
    # probabilities 0.4, 0.3, 0.2, 0.1: top_k=2 renormalises to 4/7, 3/7, so top_p=0.5 keeps one token;
    # top-p on the full distribution (0.4 < 0.5) would keep two
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    ids, probs = distribution(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.5))
    assert ids.tolist() == [0] and probs.tolist() == [1.0]
    ids, _ = distribution(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert sorted(ids.tolist()) == [0, 1]
    # temperature comes first: at T=1 top_p=0.65 needs two tokens (0.4 + 0.3); at T=0.25 the
    # probabilities are p**4 renormalised and the top token alone holds 0.723
    ids, _ = distribution(logits, SamplingParams(temperature=1.0, top_p=0.65))
    assert sorted(ids.tolist()) == [0, 1]
    ids, _ = distribution(logits, SamplingParams(temperature=0.25, top_p=0.65))
    assert ids.tolist() == [0]
    assert ids.tolist() == list(reference(logits, 0.25, top_p=0.65))


def test_top_p_one_keeps_all():
    logits = small_logits(6)
    got = as_dict(*distribution(logits, SamplingParams(temperature=1.0, top_p=1.0)))
    assert len(got) == SMALL_V
    assert_same_distribution(got, reference(logits, 1.0))


def test_top_p_nucleus_larger_than_64_flat_logits():
    """Flat logits over 49152 tokens: the nucleus is n tokens for p just under n / V."""
    logits = np.zeros(LARGE_V, dtype=np.float32)
    for n in (1, 65, 1000, 30_000, LARGE_V):
        ids, probs = distribution(logits, SamplingParams(temperature=1.0, top_p=(n - 0.5) / LARGE_V))
        assert ids.size == n and len(set(ids.tolist())) == n
        np.testing.assert_allclose(probs, 1.0 / n, rtol=1e-12)


@pytest.mark.parametrize("top_p", [0.2, 0.5, 0.9])
def test_top_p_nucleus_larger_than_64_random_logits(top_p):
    logits = np.random.default_rng(8).normal(0.0, 0.5, LARGE_V).astype(np.float32)
    got = as_dict(*distribution(logits, SamplingParams(temperature=1.0, top_p=top_p)))
    assert len(got) > 64
    assert_same_distribution(got, reference(logits, 1.0, top_p=top_p))


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.85, 0.9, 0.95])
def test_top_p_peaked_large_vocab(top_p):
    """A peaked distribution over 49152 tokens: the top 64 already hold ~0.88 of the mass, so the
    nucleus is settled within the first candidates; its mass is still that of the whole vocabulary."""
    logits = np.full(LARGE_V, -5.0, dtype=np.float32)
    logits[:100] = np.linspace(6.0, 3.0, 100)
    logits = logits[np.random.default_rng(9).permutation(LARGE_V)]
    got = as_dict(*distribution(logits, SamplingParams(temperature=1.0, top_p=top_p)))
    assert_same_distribution(got, reference(logits, 1.0, top_p=top_p))


@pytest.mark.parametrize("top_k,top_p", [(100, 0.5), (100, 0.95), (5000, 0.3), (5000, 0.9), (40_000, 0.7)])
def test_top_k_and_top_p_large_vocab(top_k, top_p):
    rng = np.random.default_rng(top_k)
    logits = rng.normal(0.0, 0.5, LARGE_V).astype(np.float32)
    logits[rng.choice(LARGE_V, 50, replace=False)] += 4.0  # some mass in a few tokens
    got = as_dict(*distribution(logits, SamplingParams(temperature=0.8, top_k=top_k, top_p=top_p)))
    assert_same_distribution(got, reference(logits, 0.8, top_k=top_k, top_p=top_p))


def test_top_k_top_p_sampling_frequencies():
    logits = small_logits(12, scale=1.0)
    params = SamplingParams(temperature=1.2, top_k=20, top_p=0.8, seed=99)
    want = dense(reference(logits, 1.2, top_k=20, top_p=0.8), SMALL_V)
    samples = draw(params, logits, 20_000)
    assert set(samples.tolist()) == set(np.flatnonzero(want).tolist())
    stat, df = chi2_statistic(samples, want)
    assert stat < chi2_critical(df), (stat, df)


# ---------------------------------------------------------------------------- repetition penalty


def hf_penalty(logits: np.ndarray, seen: set[int], penalty: float) -> np.ndarray:
    out = logits.astype(np.float64).copy()
    for t in seen:
        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_apply_repetition_penalty_definition(penalty):
    logits = np.array([3.0, -2.0, 0.0, 1.5, -0.5, 4.0, -3.0], dtype=np.float32)
    seen = np.array([0, 1, 2, 4, 4])  # positive, negative, zero, a repeated id
    before = logits.copy()
    out = apply_repetition_penalty(logits, seen, penalty)
    np.testing.assert_allclose(out, hf_penalty(logits, {0, 1, 2, 4}, penalty), rtol=1e-6)
    assert out[0] == pytest.approx(3.0 / penalty) and out[1] == pytest.approx(-2.0 * penalty)
    assert out[4] == pytest.approx(-0.5 * penalty)  # a repeated id is penalised once
    assert out[2] == 0.0
    for unseen in (3, 5, 6):
        assert out[unseen] == logits[unseen]
    np.testing.assert_array_equal(logits, before)  # the caller's logits are untouched


def test_apply_repetition_penalty_noop_cases():
    logits = small_logits(2)
    np.testing.assert_array_equal(apply_repetition_penalty(logits, np.array([1, 2, 3]), 1.0), logits)
    np.testing.assert_array_equal(apply_repetition_penalty(logits, np.array([], dtype=np.int64), 2.0), logits)


def test_sampler_penalty_only_touches_seen_tokens(monkeypatch):
    captured = []
    real = sampling.distribution

    def spy(logits, params):
        captured.append(np.array(logits, copy=True))
        return real(logits, params)

    monkeypatch.setattr(sampling, "distribution", spy)
    logits = small_logits(13)
    original = logits.copy()
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.7, seed=3), SMALL_V)
    prompt = [0, 5, 7, 7, 20]
    sampler.observe(prompt)
    seen = set(prompt)
    for _ in range(30):
        token = sampler(logits)
        penalised = captured[-1]
        np.testing.assert_allclose(penalised, hf_penalty(logits, seen, 1.7), rtol=1e-6)
        unseen = np.array(sorted(set(range(SMALL_V)) - seen))
        np.testing.assert_array_equal(penalised[unseen], logits[unseen])  # bit for bit
        seen.add(token)  # a sampled token counts as seen for the next step
    np.testing.assert_array_equal(logits, original)


def test_greedy_sampler_applies_penalty_to_seen_tokens():
    logits = np.array([5.0, 4.0, -1.0, 3.0], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), 4)
    sampler.observe([0])
    assert sampler(logits) == 1  # 5 / 2 = 2.5 < 4: the unseen runner-up wins
    assert sampler(logits) == 3  # now 1 is seen too: 4 / 2 = 2 < 3
    assert sampler(logits) == 0  # 0: 2.5, 1: 2, 3: 1.5, 2 (unseen, negative): -1


# ----------------------------------------------------------------------------------- reproducibility


def _sequence(seed, params_kwargs, steps=200):
    rng = np.random.default_rng(2024)  # the logits, not the sampler's draws
    logits = rng.normal(0.0, 1.0, (steps, SMALL_V)).astype(np.float32)
    sampler = Sampler(SamplingParams(seed=seed, **params_kwargs), SMALL_V)
    sampler.observe([1, 2, 3])
    return [sampler(row) for row in logits]


@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.8, top_k=20, top_p=0.9,
                                                                 repetition_penalty=1.2)])
def test_same_seed_same_sequence_different_seed_different(kwargs):
    a, b = _sequence(42, kwargs), _sequence(42, kwargs)
    assert a == b
    others = [_sequence(s, kwargs) for s in (0, 1, 43)]
    for other in others:
        assert other != a
        assert sum(x != y for x, y in zip(a, other)) > 50  # not a near-copy either


# ------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.2), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
])
def test_invalid_params_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
    with pytest.raises(ValueError, match=name):
        SamplingParams.from_dict(kwargs)


def test_valid_params_and_from_dict():
    params = SamplingParams.from_dict(dict(temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.1, seed=3))
    assert params == SamplingParams(0.7, 40, 0.95, 1.1, 3)
    assert not params.greedy and SamplingParams().greedy
    for kwargs in (dict(temperature=0), dict(top_k=0), dict(top_p=1), dict(repetition_penalty=1)):
        SamplingParams(**kwargs)  # the "off" values are valid


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="top_kk"):
        SamplingParams.from_dict({"temperature": 1.0, "top_kk": 5})
    with pytest.raises(ValueError, match="min_p"):
        SamplingParams.from_dict({"min_p": 0.1})
