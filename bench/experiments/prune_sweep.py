"""Perplexity of depth-pruned packages against layers removed, with and without healing.

    python bench/experiments/prune_sweep.py MODEL --remove 0 2 4 6 8 --out DIR [--json out.json]

Each pruned package drops the contiguous run the angular-distance score picks
(`export.prune.best_run`), is exported as fp32 ONNX, and is scored with `bench.eval` (WikiText-2
test protocol in that module) against the unpruned package as reference.
"""
from __future__ import annotations

from pathlib import Path

from edgerun.bench import command, parser
from edgerun.bench.eval import evaluate, format_table
from edgerun.bench.report import write_json
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.pipeline import ExportOptions, export
from edgerun.hub import known_models, pull


def main(argv: list[str] | None = None) -> dict:
    p = parser("python bench/experiments/prune_sweep.py", __doc__)
    p.add_argument("model", help="checkpoint path or known model name")
    p.add_argument("--remove", type=int, nargs="+", default=[0, 2, 4, 6, 8])
    p.add_argument("--out", type=Path, required=True, help="folder for the packages")
    p.add_argument("--windows", type=int, default=40)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    source = pull(args.model) if args.model in known_models() and not Path(args.model).exists() else args.model
    ckpt = load_checkpoint(source)
    packages = {}
    for n in args.remove:
        for heal in ([False, True] if n else [False]):
            name = args.out / f"remove{n}{'-healed' if heal else ''}"
            if not (name / "manifest.json").is_file():
                export(ckpt, name, ExportOptions(prune_layers=n, heal=heal, force=True))
            packages[(n, heal)] = str(name)
    reference = packages.pop((0, False)) if (0, False) in packages else None
    report = evaluate(list(packages.values()), reference=reference, windows=args.windows, progress=True)
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
    return report


if __name__ == "__main__":
    command(main, "python bench/experiments/prune_sweep.py")
