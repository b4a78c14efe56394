"""Early-exit decoding against plain decoding of the same package: speed and agreement.

    python bench/experiments/early_exit.py PACKAGE --quality 0.99 0.95 0.9 0.8 --new-tokens 64
    python bench/experiments/early_exit.py PACKAGE --quality 0.95 --prompts heldout-qa --n 3 --rounds 2 --unguarded

With --prompts heldout-qa the prompts are the held-out open-QA and chat prompts of
bench/prompt_sets.py (--n of each), never used to fit exits or tune the guard; --rounds repeats
every setting in interleaved rounds (times summed); --unguarded adds, per quality level, a row that
tries the exits on every token at that level's lowest exit threshold (`exit_threshold`, no
ExitGuard): what the guard saves.

PACKAGE needs exits (`edge-run export MODEL --exit-layers 10,15,20,25 -o PACKAGE`). Each MT-Bench
prompt (one per category) runs plain and at every quality level back to back; reported: speedup
(plain time / early-exit time, summed over prompts), mean layers per token, and top-1 agreement
with the full model on the generated sequence (teacher-forced: the full model's argmax at each
generated position given the same prefix). An oracle row bounds what any confidence rule could
reach with these exits: each generated position exits at the first exit whose top-1 equals the
full model's (at 100% agreement, and at --quality's lowest level by also letting that share of the
remaining positions leave at the first exit), with exits costing nothing: speedup bound = layers /
mean layers used.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from edgerun.bench import command, parser
from edgerun.bench.speculative_runs import prompt_sets


def exit_top1(engine, tokens: list[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Teacher-forced top-1 of every exit (adapter + head) and of the full model, per position."""
    from edgerun.runtime.early_exit import apply_adapter, exit_points

    backend, n = engine.backend, len(tokens)
    points = {p.stage: p for p in exit_points(engine.package_dir, engine.manifest, threshold=1.0)}
    stages = len(engine.manifest.stages)
    cache = backend.new_cache(1, n + 1)
    counts, start = np.array([n], np.int32), np.zeros(1, np.int32)
    every = np.arange(n, dtype=np.int64)[None]
    head = range(stages - 1, stages)
    hidden = backend.forward(np.asarray([tokens], np.int64), cache, counts, None, range(0, 1), start)
    exits = {}
    for stage in range(1, stages - 1):
        if stage in points:
            adapted = apply_adapter(hidden.numpy(), points[stage].adapter)
            exits[points[stage].layer] = backend.forward(adapted, cache, counts, every, head, start)[0].argmax(-1)
        hidden = backend.forward(hidden, cache, counts, None, range(stage, stage + 1), start)
    return exits, backend.forward(hidden, cache, counts, every, head, start)[0].argmax(-1)


def oracle_layers(exits: dict[int, np.ndarray], full: np.ndarray, num_layers: int, quality: float = 1.0) -> np.ndarray:
    """Layers each position would use if it left at the first exit that agrees with the full model;
    below quality 1 the remaining positions leave at the first exit, as many as the level allows."""
    layers = np.full(len(full), num_layers)
    for layer in sorted(exits, reverse=True):
        layers[exits[layer] == full] = layer
    wrong = np.flatnonzero(layers == num_layers)[:int((1 - quality) * len(full) + 1e-9)]
    layers[wrong] = min(exits)
    return layers


def main(argv: list[str] | None = None) -> list[dict]:
    from edgerun.hub import load

    p = parser("python bench/experiments/early_exit.py", __doc__)
    p.add_argument("package")
    p.add_argument("--quality", type=float, nargs="+", default=[0.99, 0.95, 0.9, 0.8])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", choices=("mt_bench", "heldout-qa"), default="mt_bench",
                   help="MT-Bench (one per category) or the held-out open-QA + chat prompts")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds over every prompt and setting")
    p.add_argument("--unguarded", action="store_true",
                   help="also run each quality's lowest exit threshold on every token, without the guard")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    engine = load(args.package, max_context=2048)
    if args.prompts == "heldout-qa":
        from edgerun.bench.prompt_sets import prompt_set

        texts = prompt_set("open_qa", "heldout", args.n) + prompt_set("chat", "heldout", args.n)
    else:
        texts = prompt_sets(args.n)["mt_bench"]
    prompts = [engine.encode(engine.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               for t in texts]
    settings = [("plain", {})] + [(f"q={q}", {"early_exit": q}) for q in args.quality]
    if args.unguarded:
        from edgerun.runtime.early_exit import exit_points

        settings += [(f"q={q} unguarded", {"exit_threshold": min(
            p.threshold for p in exit_points(engine.package_dir, engine.manifest, q))}) for q in args.quality]

    def run(tokens, kw):
        start = time.perf_counter()
        # ignore_eos: equal lengths in every setting
        out = [r.token for r in engine.generate(tokens, max_new_tokens=args.new_tokens, ignore_eos=True, **kw)]
        return out, time.perf_counter() - start

    for _, kw in settings:
        run(prompts[0], kw)  # warm-up
    totals = {name: {"s": 0.0, "layers": [], "agree": []} for name, _ in settings}
    num_layers = engine.manifest.model.num_layers
    oracle = {1.0: [], min(args.quality): []}
    for tokens in [t for _ in range(args.rounds) for t in prompts]:
        for name, kw in settings:
            out, seconds = run(tokens, kw)
            generated = slice(len(tokens) - 1, -1)
            if kw:
                full = engine.logits(tokens + out)[generated].argmax(-1)
            else:  # one staged pass gives the full model's top-1 and every exit's (the oracle)
                exits, top1 = exit_top1(engine, tokens + out)
                full = top1[generated]
                for q in oracle:
                    oracle[q].append(oracle_layers({k: v[generated] for k, v in exits.items()}, full,
                                                   num_layers, q).mean())
            row = totals[name]
            row["s"] += seconds
            row["layers"].append(np.mean(engine.exit_layers) if kw else num_layers)
            row["agree"].append(float((full == np.asarray(out)).mean()))
    results = []
    for name, row in totals.items():
        results.append({"setting": name, "speedup": totals["plain"]["s"] / row["s"],
                        "layers_per_token": float(np.mean(row["layers"])),
                        "top1_agreement": float(np.mean(row["agree"]))})
        print(f"{name:8} x{results[-1]['speedup']:.3f}  layers/token {results[-1]['layers_per_token']:.1f}  "
              f"top-1 agreement {results[-1]['top1_agreement']:.3f}")
    for q, used in oracle.items():
        layers = float(np.mean(used))
        results.append({"setting": f"oracle q={q}", "speedup_bound": num_layers / layers, "layers_per_token": layers,
                        "top1_agreement": q})
        print(f"oracle at q={q}: layers/token {layers:.1f}, speedup bound x{num_layers / layers:.2f} "
              f"(perfect confidence, exits free)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    command(main, "python bench/experiments/early_exit.py")
