"""Reproduce the SmolLM2-135M quantization table (bench/QUANT.md) in one command.

    python bench/experiments/quant_table.py --out /tmp/quant-table [--windows 40] [--no-speed]
    python bench/experiments/quant_table.py --format gguf --out /tmp/quant-gguf   # llama.cpp files
    python bench/experiments/quant_table.py --model gemma3-270m --variants int8 int4 int4-gptq --out DIR

--model takes any registry name or checkpoint path (the per-family tables in the README);
--variants picks rows of the table below (default: all of them).

Exports the fp32 reference and every variant below into --out (existing packages are kept),
scores them in one `bench.eval` run against the reference (so its distributions are computed
once), then times decoding side by side with decode_speed.py (GPTQ packages have exactly
the layout of their RTN twins, so only one of each pair is timed). About 45 minutes on 2 cores.
With --format gguf the variants are GGUF files run by llama.cpp: our Q8_0 / Q4_1 / TQ2_0 packing
(RTN and GPTQ) next to files made by llama.cpp's own quantizer, against an F32 GGUF reference.
"""
from __future__ import annotations

from pathlib import Path

from edgerun.bench import command, parser

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
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
# GGUF presets (Q8_0, Q4_1 + Q8_0, TQ2_0 + Q4_0 fallback) and llama.cpp's own quantizer for comparison
GGUF_VARIANTS = {"int8": "int8", "int4": "int4", "int4-gptq": "int4-gptq", "ternary": "ternary",
                 "llama-q8_0": "q8_0", "llama-q4_1": "q4_1", "llama-q4_k_m": "q4_k_m"}
GGUF_TIMED = ["fp32", "int8", "int4", "ternary", "llama-q8_0", "llama-q4_1", "llama-q4_k_m"]


def main(argv: list[str] | None = None) -> int:
    import decode_speed  # bench/experiments/decode_speed.py, beside this script

    from edgerun.bench.eval import evaluate, format_table
    from edgerun.bench.report import write_json
    from edgerun.export.checkpoint import load_checkpoint
    from edgerun.export.pipeline import ExportOptions, export
    from edgerun.hub import pull

    p = parser("python bench/experiments/quant_table.py", __doc__)
    p.add_argument("--out", type=Path, required=True, help="folder for the packages and results")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-speed", action="store_true", help="skip the decode-speed run")
    p.add_argument("--model", default="smollm2-135m", help="registry name or checkpoint path")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="rows to build and score (default: every preset and recipe of the format)")
    p.add_argument("--format", choices=("onnx", "gguf"), default="onnx",
                   help="ONNX packages (onnxruntime) or GGUF files (llama.cpp)")
    args = p.parse_args(argv)

    variants, timed = (VARIANTS, TIMED) if args.format == "onnx" else (GGUF_VARIANTS, GGUF_TIMED)
    if args.variants:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            p.error(f"unknown variant(s) {', '.join(unknown)}; {args.format} has: {', '.join(variants)}")
        variants = {n: variants[n] for n in args.variants}
        timed = [n for n in timed if n == "fp32" or n in variants]
    model = Path(args.model) if Path(args.model).exists() else pull(args.model, progress=True)
    ckpt = load_checkpoint(model)
    if not (args.out / "fp32" / "manifest.json").is_file():
        export(ckpt, args.out / "fp32", ExportOptions(formats=(args.format,)), progress=True)
    for name, quant in variants.items():
        if not (args.out / name / "manifest.json").is_file():
            recipe = quant if "." not in quant else RECIPES / quant
            if isinstance(recipe, Path) and not recipe.is_file():
                raise FileNotFoundError(f"{recipe} is missing; run this from a checkout of edge-run")
            export(ckpt, args.out / name, ExportOptions(formats=(args.format,), quant=recipe), progress=True)
    report = evaluate([str(args.out / n) for n in variants], reference=str(args.out / "fp32"),
                      windows=args.windows, threads=args.threads, progress=True)
    print(format_table(report))
    write_json(args.out / "quality.json", report)
    if not args.no_speed:
        decode_speed.main([*(str(args.out / n) for n in timed), "--prompt-tokens", "512", "--new-tokens", "128",
                           "--threads", str(args.threads), "--json", str(args.out / "speed.json")])
    return 0


if __name__ == "__main__":
    command(main, "python bench/experiments/quant_table.py")
