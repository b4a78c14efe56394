"""Structured output: what the grammar costs per token, and what its forced tokens save.

    python -m edgerun.bench.structured PACKAGE [--tokenizer tokenizer.json ...] [--rounds 2] [--json out.json]

For each schema-heavy extraction prompt (a WikiText-2 test paragraph and a JSON schema with long
field names), interleaved per prompt after a warm-up, `--rounds` times:
- constrained: greedy decoding under the schema, as `generate(response_format=...)` runs it (tokens
  the grammar forces enter a step together as free drafts);
- masked only: the same without the forced tokens (every token a step of its own, chosen from the
  masked logits): what the mask costs per token;
- plain: unconstrained greedy decoding of as many tokens as the constrained answer has (end of
  sequence ignored), the same prompt.
Reported: per-token decode time of masked-only over plain (the mask's overhead), and plain time
over constrained time for the same number of tokens (> 1: the schema's answer costs less than free
text of the same length). Times are from the call (prompt included) and decode-only (after the
first token), medians over rounds; the ratios are per prompt, and their median over prompts.

The grammar's own cost per token at other vocabularies (`--tokenizer`, e.g. Qwen2.5's 152k or
Gemma 3's 262k tokenizer.json) is timed apart from any model: each constrained answer, re-tokenized
with that tokenizer, is replayed through a fresh matcher (mask, forced tokens, consume per token).
No tuned setting is involved, so there is no held-out split.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from .. import data
from ..version import __version__
from . import command, parser
from .report import write_json

SCHEMAS = [
    {"type": "object", "additionalProperties": False,
     "required": ["article_title_guess", "main_subject_of_the_paragraph", "year_mentioned_first", "is_about_a_person"],
     "properties": {"article_title_guess": {"type": "string", "maxLength": 60},
                    "main_subject_of_the_paragraph": {"type": "string", "maxLength": 60},
                    "year_mentioned_first": {"type": "integer", "minimum": 0, "maximum": 2030},
                    "is_about_a_person": {"type": "boolean"}}},
    {"type": "object", "additionalProperties": False,
     "required": ["named_people_in_the_text", "named_places_in_the_text", "overall_sentiment_of_the_text"],
     "properties": {"named_people_in_the_text": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                 "maxItems": 3},
                    "named_places_in_the_text": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                 "maxItems": 3},
                    "overall_sentiment_of_the_text": {"enum": ["positive", "negative", "neutral"]}}},
    {"type": "object", "additionalProperties": False,
     "required": ["one_sentence_summary", "category_of_the_text", "confidence_of_the_category"],
     "properties": {"one_sentence_summary": {"type": "string", "maxLength": 120},
                    "category_of_the_text": {"enum": ["history", "science", "sports", "music", "film", "politics",
                                                      "geography", "other"]},
                    "confidence_of_the_category": {"type": "number", "minimum": 0, "maximum": 1}}},
]


def prompts(n: int) -> list[tuple[str, dict]]:
    """n extraction prompts: WikiText-2 test paragraphs, each with one of the schemas in turn."""
    paragraphs = [line.strip() for line in data.wikitext("test").splitlines()
                  if 60 <= len(line.split()) <= 140 and not line.strip().startswith("=") and "<unk>" not in line]
    return [(f"Read the text and fill in the JSON fields.\n\n{paragraphs[i]}", SCHEMAS[i % len(SCHEMAS)])
            for i in range(n)]


def _timed(responses) -> tuple[list[int], float, float]:
    start = time.perf_counter()
    first = None
    tokens = []
    for r in responses:
        tokens.append(r.token)
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return tokens, end - start, end - first


def _replay_cost(tokenizer_path: Path, answers: list[tuple[str, dict]]) -> dict:
    """Grammar µs per token for these (answer text, schema) pairs with another tokenizer."""
    from tokenizers import Tokenizer

    from ..runtime.constraints import Grammars

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    start = time.perf_counter()
    grammars = Grammars(tokenizer, vocab, [])
    grammars.ll_tokenizer  # noqa: B018 - built once per engine; timed apart
    build = time.perf_counter() - start
    total, count = 0.0, 0
    for text, schema in answers:
        grammar = grammars.compile({"type": "json_schema", "json_schema": {"schema": schema}})
        constraint = grammars.matcher(grammar)
        for token in tokenizer.encode(text, add_special_tokens=False).ids:
            t0 = time.perf_counter()
            constraint.allowed()
            constraint.forced()
            constraint.consume(token)
            total += time.perf_counter() - t0
            count += 1
    return {"tokenizer": str(tokenizer_path), "vocab": vocab, "tokenizer_build_s": round(build, 3),
            "tokens": count, "us_per_token": round(1e6 * total / max(count, 1), 1)}


def run(args) -> dict:
    from ..runtime import constraints
    from ..runtime.engine import Engine

    engine = Engine(args.package, threads=args.threads, max_context=1024)
    cases = prompts(args.prompts)
    encoded = [engine.encode(engine.apply_chat_template([{"role": "user", "content": text}]), add_special_tokens=False)
               for text, _ in cases]
    formats = [{"type": "json_schema", "json_schema": {"schema": schema}} for _, schema in cases]
    no_forced = constraints.RowConstraint.forced

    def constrained(i):
        return _timed(engine.generate(encoded[i], max_new_tokens=args.max_tokens, response_format=formats[i]))

    def masked_only(i):
        constraints.RowConstraint.forced = lambda self: []  # measurement only: every token a step
        try:
            return _timed(engine.generate(encoded[i], max_new_tokens=args.max_tokens, response_format=formats[i]))
        finally:
            constraints.RowConstraint.forced = no_forced

    rows = []
    constrained(0)  # warm-up: the grammar tokenizer, kernels
    for i in range(len(cases)):
        runs: dict[str, list[tuple[list[int], float, float]]] = {"constrained": [], "masked": [], "plain": []}
        for _ in range(args.rounds):
            runs["constrained"].append(constrained(i))
            runs["masked"].append(masked_only(i))
            n = len(runs["constrained"][-1][0])
            runs["plain"].append(_timed(engine.generate(encoded[i], max_new_tokens=n, ignore_eos=True)))
        answer = engine.decode(runs["constrained"][0][0])
        try:
            json.loads(answer)
            complete = True
        except json.JSONDecodeError:  # cut at --max-tokens
            complete = False
        rows.append({"prompt": i, "answer": answer, "complete": complete, **{
            k: {"tokens": len(v[0][0]), "total_s": statistics.median(r[1] for r in v),
                "decode_s": statistics.median(r[2] for r in v)} for k, v in runs.items()}})

    def per_token(row, kind):
        return row[kind]["decode_s"] / max(row[kind]["tokens"] - 1, 1)

    def median(values):  # over prompts: one prompt's noise spike does not move it
        return statistics.median(list(values))

    report = {
        "version": __version__, "package": str(args.package), "threads": args.threads, "rounds": args.rounds,
        "prompts": rows,
        "mask_overhead_per_token": median(per_token(r, "masked") / per_token(r, "plain") - 1 for r in rows),
        "plain_over_constrained_total": median(r["plain"]["total_s"] / r["constrained"]["total_s"] for r in rows),
        "plain_over_constrained_decode": median(r["plain"]["decode_s"] / r["constrained"]["decode_s"] for r in rows),
        "grammar_cost": [_replay_cost(Path(t), [(r["answer"], cases[r["prompt"]][1]) for r in rows])
                         for t in [engine.package_dir / engine.manifest.tokenizer, *args.tokenizer]],
    }
    print(f"package {args.package}: {len(rows)} prompts x {args.rounds} rounds, {args.threads} threads, "
          f"{sum(r['complete'] for r in rows)} answers complete JSON within --max-tokens")
    print(f"  mask overhead per decoded token (masked-only vs plain, median over prompts): "
          f"{100 * report['mask_overhead_per_token']:+.1f}%")
    print(f"  plain / constrained, same tokens: x{report['plain_over_constrained_total']:.2f} from the call, "
          f"x{report['plain_over_constrained_decode']:.2f} decode only")
    for g in report["grammar_cost"]:
        print(f"  grammar at {g['vocab']} tokens: {g['us_per_token']} us/token "
              f"(tokenizer built in {g['tokenizer_build_s']} s)")
    if args.json:
        write_json(Path(args.json), report)
    return report


def main(argv: list[str] | None = None) -> dict:
    p = parser("python -m edgerun.bench.structured", __doc__.split("\n\n")[0])
    p.add_argument("package", help="an edge-run package (e.g. the INT4 ONNX one)")
    p.add_argument("--tokenizer", action="append", default=[], metavar="tokenizer.json",
                   help="also time the grammar at this tokenizer's vocabulary (repeatable)")
    p.add_argument("--prompts", type=int, default=6, help="extraction prompts (default: 6)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds per prompt (default: 2)")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default: 256)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (default: 2)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    if args.prompts < 1 or args.rounds < 1 or args.max_tokens < 8:
        raise ValueError("--prompts and --rounds must be >= 1 and --max-tokens >= 8")
    return run(args)


if __name__ == "__main__":
    command(main, "python -m edgerun.bench.structured")
