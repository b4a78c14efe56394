"""Greedy identity against transformers by teacher forcing: one forward per sequence instead of a
token-by-token `generate`, for the real-model tests of the larger families."""
from __future__ import annotations

from dataclasses import dataclass, field

NEAR_TIE = 1e-3  # logit gap under which two fp32 implementations may order the top two either way


@dataclass
class TeacherForced:
    """Where transformers' argmax, given our prefix, differs from the token we generated.

    Attributes:
        checked: positions compared (one per generated token).
        flips: (position, gap) where the reference's top logit beats our token's by <= NEAR_TIE.
        mismatches: (position, gap) where it beats it by more: a real disagreement.
    """

    checked: int = 0
    flips: list[tuple[int, float]] = field(default_factory=list)
    mismatches: list[tuple[int, float]] = field(default_factory=list)


def teacher_forced(model, prompt: list[int], generated: list[int]) -> TeacherForced:
    """Score prompt + generated[:-1] in one transformers forward and compare, at every generated
    position, the reference's argmax with our next token. When all agree, transformers' greedy
    decoding of `prompt` yields `generated` (by induction over the positions), so this checks greedy
    identity exactly at the cost of one forward.

    Args:
        model: a transformers causal LM in eval mode; prompt, generated: token ids.
    Returns:
        the comparison; `mismatches` empty means identical up to near-ties.
    """
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated[:-1]])).logits[0, len(prompt) - 1:].numpy()
    result = TeacherForced(checked=len(generated))
    for position, (row, token) in enumerate(zip(logits, generated)):
        best = int(row.argmax())
        if best != token:
            gap = float(row[best] - row[token])
            (result.flips if gap <= NEAR_TIE else result.mismatches).append((position, gap))
    return result
