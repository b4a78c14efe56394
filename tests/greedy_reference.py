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


# -- checks shared by the real-model files of each family ------------------------------------------
GREEDY_TOKENS = 64  # per MT-Bench prompt, checked against transformers
BATCH_TOKENS = 32
GGUF_TOKENS = 32


def check_teacher_forced(mt_tokens, greedy, forced: list[TeacherForced]) -> None:
    """Every prompt's GREEDY_TOKENS tokens agree with the reference (near-ties warned, not failed)."""
    import warnings

    assert len({len(t) for t in mt_tokens}) > 1
    for i, result in enumerate(forced):
        assert result.checked == GREEDY_TOKENS == len(greedy[i])
        assert not result.mismatches, f"prompt {i}: (position, logit gap) {result.mismatches}"
    flips = {i: f.flips for i, f in enumerate(forced) if f.flips}
    if flips:
        warnings.warn(f"near-tie flips (prompt: [(position, gap)]): {flips}", stacklevel=2)


def check_batch4_equals_batch1(engine, mt_tokens, greedy) -> None:
    """Two batches of four prompts of unequal lengths decode as each prompt alone did."""
    for start in (0, 4):
        group = mt_tokens[start:start + 4]
        assert len({len(t) for t in group}) > 1, "prompts must differ in length"
        responses = list(engine.generate(group, max_new_tokens=BATCH_TOKENS, ignore_eos=True))
        for row in range(4):
            assert [r.token for r in responses if r.index == row] == greedy[start + row][:BATCH_TOKENS], row


def check_gguf_equals_onnx(package, mt_tokens, greedy) -> None:
    """The package's F32 GGUF (our writer, same weights) on llama.cpp: greedy identical to its ONNX
    graphs on the first four prompts."""
    import edgerun

    cpp = edgerun.Engine(package, max_context=512, backend="llamacpp")
    assert cpp.backend.name == "llamacpp"
    for i in range(4):
        theirs = [r.token for r in cpp.generate(mt_tokens[i], max_new_tokens=GGUF_TOKENS, ignore_eos=True)]
        assert theirs == greedy[i][:GGUF_TOKENS], (i, cpp.decode(theirs), cpp.decode(greedy[i][:GGUF_TOKENS]))
