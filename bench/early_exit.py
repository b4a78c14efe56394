"""Early-exit decoding against plain decoding of the same package: speed and agreement.

    python -m edgerun.bench.early_exit PACKAGE --quality 0.99 0.95 0.9 0.8 --new-tokens 64

PACKAGE needs exits (`edge-run export MODEL --exit-layers 10,15,20,25 -o PACKAGE`). Each MT-Bench
prompt (one per category) runs plain and at every quality level back to back; reported: speedup
(plain time / early-exit time, summed over prompts), mean layers per token, and top-1 agreement
with the full model on the generated sequence (teacher-forced: the full model's argmax at each
generated position given the same prefix).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .speculative import prompt_sets


def main(argv: list[str] | None = None) -> list[dict]:
    import edgerun

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("package")
    p.add_argument("--quality", type=float, nargs="+", default=[0.99, 0.95, 0.9, 0.8])
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    engine = edgerun.load(args.package, max_context=2048)
    engine.eos_token_ids = frozenset()  # equal lengths in every setting
    prompts = [engine.encode(engine.apply_chat_template([{"role": "user", "content": t}]), add_special_tokens=False)
               for t in prompt_sets(args.n)["mt_bench"]]
    settings = [("plain", {})] + [(f"q={q}", {"early_exit": q}) for q in args.quality]

    def run(tokens, kw):
        start = time.perf_counter()
        out = [r.token for r in engine.generate(tokens, max_new_tokens=args.new_tokens, **kw)]
        return out, time.perf_counter() - start

    for _, kw in settings:
        run(prompts[0], kw)  # warm-up
    totals = {name: {"s": 0.0, "layers": [], "agree": []} for name, _ in settings}
    for tokens in prompts:
        for name, kw in settings:
            out, seconds = run(tokens, kw)
            full = engine.logits(tokens + out)[len(tokens) - 1:-1].argmax(-1)
            row = totals[name]
            row["s"] += seconds
            row["layers"].append(np.mean(engine.exit_layers) if kw else engine.manifest.model.num_layers)
            row["agree"].append(float((full == np.asarray(out)).mean()))
    results = []
    for name, row in totals.items():
        results.append({"setting": name, "speedup": totals["plain"]["s"] / row["s"],
                        "layers_per_token": float(np.mean(row["layers"])), "top1_agreement": float(np.mean(row["agree"]))})
        print(f"{name:8} x{results[-1]['speedup']:.3f}  layers/token {results[-1]['layers_per_token']:.1f}  "
              f"top-1 agreement {results[-1]['top1_agreement']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
