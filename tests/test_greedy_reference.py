"""The teacher-forcing check of the real-model tests, on a stand-in model with known logits: it must
find a real disagreement, tell a near-tie from one, and line positions up with the generated tokens."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from greedy_reference import NEAR_TIE, teacher_forced

torch = pytest.importorskip("torch")


class Scripted:
    """Logits whose argmax at position i is `argmax[i]`, with the runner-up `gap` below it."""

    def __init__(self, argmax: list[int], runner_up: dict[int, tuple[int, float]], vocab: int = 8):
        self.argmax, self.runner_up, self.vocab = argmax, runner_up, vocab

    def __call__(self, ids):
        logits = torch.zeros(1, ids.shape[1], self.vocab)
        for i, best in enumerate(self.argmax[:ids.shape[1]]):
            logits[0, i, best] = 1.0
            if i in self.runner_up:
                token, gap = self.runner_up[i]
                logits[0, i, token] = 1.0 - gap
        return SimpleNamespace(logits=logits)


def test_agreement_flip_and_mismatch_are_told_apart():
    prompt = [1, 2, 3]
    # positions 2.. score the generated tokens: 4, 5, 6, 7
    model = Scripted(argmax=[0, 0, 4, 5, 1, 2], runner_up={4: (6, NEAR_TIE / 2), 5: (7, 0.5)})
    agreeing = teacher_forced(model, prompt, [4, 5])
    assert agreeing.checked == 2 and not agreeing.flips and not agreeing.mismatches
    result = teacher_forced(model, prompt, [4, 5, 6, 7])
    assert result.checked == 4
    assert [p for p, _ in result.flips] == [2] and [p for p, _ in result.mismatches] == [3]
    assert result.mismatches[0][1] == pytest.approx(0.5)
