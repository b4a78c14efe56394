"""Reproduce the SmolLM2-135M quantization table (bench/QUANT.md) in one command.

    python -m edgerun.bench.quant_table --out /tmp/quant-table [--windows 40] [--no-speed]

Exports the fp32 reference and every variant below into --out (existing packages are kept),
scores them in one `bench.eval` run against the reference (so its distributions are computed
once), then times decoding side by side with `bench.decode_speed` (GPTQ packages have exactly
the layout of their RTN twins, so only one of each pair is timed). About 45 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"
# package name -> preset or recipe file (bench/recipes, read from the checkout)
VARIANTS = {
    "int8": "int8",
    "int8-b32": "int8-b32.json",
    "int8-head-fp32": "int8-head-fp32.json",
    "int8-tables-fp32": "int8-tables-fp32.json",
    "int4": "int4",
    "int4-gptq": "int4-gptq",
    "int4-pure": "int4-pure.json",
    "int4-pure-gptq": "int4-pure-gptq.json",
    "int4-source-grid": "int4-source-grid.toml",
    "ternary": "ternary",
    "ternary-gptq": "ternary-gptq.json",
}
TIMED = ["fp32", "int8", "int8-b32", "int8-head-fp32", "int8-tables-fp32", "int4", "int4-pure", "ternary"]


def main(argv: list[str] | None = None) -> int:
    from ..export.checkpoint import load_checkpoint
    from ..export.models import pull
    from ..export.package import write_package
    from ..export.quantize import export_quantized
    from . import decode_speed
    from .eval import evaluate, format_table

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the packages and results")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed run")
    args = p.parse_args(argv)

    ckpt = load_checkpoint(pull("smollm2-135m", progress=True))
    if not (args.out / "fp32" / "manifest.json").is_file():
        write_package(ckpt, args.out / "fp32", progress=True)
    for name, quant in VARIANTS.items():
        if not (args.out / name / "manifest.json").is_file():
            recipe = quant if "." not in quant else RECIPES / quant
            if isinstance(recipe, Path) and not recipe.is_file():
                raise FileNotFoundError(f"{recipe} is missing; run this from a checkout of edge-run")
            export_quantized(ckpt, args.out / name, recipe, progress=True)
    report = evaluate([str(args.out / n) for n in VARIANTS], reference=str(args.out / "fp32"),
                      windows=args.windows, threads=args.threads, progress=True)
    print(format_table(report))
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_speed:
        decode_speed.main([*(str(args.out / n) for n in TIMED), "--prompt-tokens", "512", "--new-tokens", "128",
                           "--threads", str(args.threads), "--json", str(args.out / "speed.json")])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
