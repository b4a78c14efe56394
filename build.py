"""`edge-run build RECIPE -o OUT`: every variant of a build recipe (see `build_recipe`) built,
scored against the float reference, timed against a baseline variant, gated and reported.

    edge-run build recipes/smollm2-135m.toml -o out [--only NAME] [--force] [--eval-windows N]

Packages come from a content-addressed cache ($EDGE_RUN_HOME/builds): a variant's key hashes its
build record (the source's sha256, the variant's recipe section with its quant recipe resolved, the
calibration data's sha256 and settings when it calibrates, the tool version), and the same record
goes into the package's manifest (`extra.build`). A complete entry is reused; `--force` rebuilds it.
Entries (and OUT/<variant> copies) appear under their final name only by a rename once complete, so
a killed build leaves nothing that looks finished, and the next run resumes from what was.

OUT gets one package folder per variant, report.json, report.md (the table a CI job summary shows)
and report.png (quality against size and against decode speed). Exit status 3: a variant missed a gate.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .bench.report import write_json
from .build_recipe import GATES, BuildRecipe, Variant, load_build_recipe
from .export.checkpoint import Checkpoint, load_checkpoint, sha256_file
from .files import save_figure_atomic, write_text_atomic
from .runtime.manifest import MANIFEST_NAME, PackageError, read_manifest
from .version import __version__

log = logging.getLogger(__name__)
GATE_FAILURE = 3  # exit status when a variant misses a gate (1: an error, 2: a bad option)
MARKER = ".edge-run-build"  # marks OUT as a build's folder (the only kind a build writes into)
REFERENCE = "reference"  # the implicit fp32 reference (a name no variant may take: build_recipe.RESERVED)
WIKITEXT_VALID = "WikiText-2 validation (edgerun.data)"


def digest(data: Any) -> str:
    """sha256 of plain data in canonical JSON (sorted keys): the cache key's hash."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# -- what a variant is built from ------------------------------------------------------------------
def resolve_source(recipe: BuildRecipe, progress: bool = False) -> tuple[Path, dict[str, Any]]:
    """The source checkpoint's path (a known model is pulled) and its record for the build.

    Raises:
        RecipeError: the source's sha256 differs from the recipe's.
    """
    from .export.checkpoint import checkpoint_kind
    from .hub import pull

    src = recipe.source
    path = pull(src.model, progress=progress) if src.model else src.path
    record: dict[str, Any] = {"name": src.spelled}
    if checkpoint_kind(path) == "gguf":
        record |= {"format": "gguf", "sha256": sha256_file(path)}
    else:  # sha256 as the manifest records it (its safetensors files); every file's for the key
        files = {f.name: sha256_file(f) for f in sorted(path.iterdir()) if f.is_file()}
        weights = hashlib.sha256("".join(files[n] for n in sorted(files) if n.endswith(".safetensors")).encode())
        record |= {"format": "safetensors", "sha256": weights.hexdigest(), "files_sha256": digest(files)}
    if src.sha256 and src.sha256 != record["sha256"]:
        raise recipe.error(("source", "sha256"), f"{path} has sha256 {record['sha256']}, not the recipe's "
                                                 f"{src.sha256}; update the recipe or restore the file")
    return path, record


def calibration_record(recipe: BuildRecipe, variant: Variant) -> dict[str, Any] | None:
    """The calibration texts (sha256) and settings `variant` is built from; None when it reads none."""
    from . import data

    if not variant.calibration:
        return None
    valid = None

    def wikitext_valid() -> dict[str, str]:
        nonlocal valid
        valid = valid or hashlib.sha256(data.wikitext("valid").encode()).hexdigest()
        return {"data": WIKITEXT_VALID, "sha256": valid}

    record: dict[str, Any] = {}
    if "gptq" in variant.calibration:
        cal = dataclasses.asdict(recipe.calibration)
        text = {"data": recipe.calibration_file, "sha256": sha256_file(Path(cal["data"]))} if cal["data"] \
            else wikitext_valid()
        record["gptq"] = cal | text
    if "layers" in variant.calibration:  # pruning scores, healing and exits sample WikiText-2 validation
        record["layers"] = wikitext_valid()
    return record


def portable(quant_recipe: dict[str, Any], calibration_file: str | None) -> dict[str, Any]:
    """A quant recipe's plain data with its calibration file as the build recipe writes it (not this
    machine's absolute path), so that manifests and keys do not depend on where the files sit."""
    calibration = quant_recipe.get("calibration") or {}
    if not calibration.get("data"):
        return quant_recipe
    return quant_recipe | {"calibration": calibration | {"data": calibration_file}}


def build_record(variant: Variant, source: dict[str, Any], calibration: dict[str, Any] | None,
                 calibration_file: str | None = None) -> dict[str, Any]:
    """What the package is made from (recorded in its manifest); its digest is the cache key."""
    recipe = variant.options.recipe
    quant = recipe if isinstance(recipe, str) or recipe is None else portable(recipe.to_dict(), calibration_file)
    return {"variant": variant.name, "recipe": variant.section, "quant": quant, "source": source,
            "calibration": calibration, "tool_version": __version__}


def cache_key(record: dict[str, Any]) -> str:
    return f"{record['variant']}-{digest(record)[:24]}"


def reference_variant() -> Variant:
    """The implicit float reference: the source as an fp32 ONNX package."""
    from .export.pipeline import ExportOptions

    return Variant(name=REFERENCE, section={"format": "onnx"}, options=ExportOptions(), quant="float32")


# -- the cache -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (released when the process dies, however it dies)."""
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): builds of one key must not run concurrently there
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stale(folder: Path, name: str) -> None:
    """Remove what a killed run left of `name` in `folder` (hidden .partial / .old siblings)."""
    for leftover in folder.glob(f".{name}.*"):
        if leftover.is_dir() and leftover.name.endswith((".partial", ".old")):
            shutil.rmtree(leftover, ignore_errors=True)


def entry_key(folder: Path) -> str | None:
    """The build key recorded in a package's manifest, or None (no package, or not built here)."""
    try:
        return read_manifest(folder).extra.get("build", {}).get("key")
    except PackageError:
        return None


def cached_entry(cache: Path, key: str, make: Callable[[Path], None], force: bool = False) -> tuple[Path, bool]:
    """The cache entry for `key`, made by `make(folder)` unless complete already (or `force`).

    Returns:
        (entry folder, whether it was reused).
    """
    cache.mkdir(parents=True, exist_ok=True)
    entry = cache / key
    with _locked(cache / f".{key}.lock"):
        if not force and entry_key(entry) == key:
            return entry, True
        _stale(cache, key)  # this key's lock is held: whatever partial is left is a killed run's
        stage = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".partial", dir=cache))
        try:
            make(stage / "package")
            if entry.exists():
                old = cache / f".{key}.{os.getpid()}.old"
                entry.rename(old)
                (stage / "package").rename(entry)
                shutil.rmtree(old)
            else:
                (stage / "package").rename(entry)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return entry, False


def stamp(folder: Path, record: dict[str, Any], key: str, calibration_file: str | None = None) -> None:
    """Add the build record (and its key) to the package's manifest as `extra.build`.

    `extra` is the manifest's open field, so readers that know nothing of builds still read it. The
    quantization recipe's calibration file is written as the build recipe names it (see `portable`)."""
    manifest = read_manifest(folder)
    quantization = manifest.quantization
    if "recipe" in quantization:
        quantization = quantization | {"recipe": portable(quantization["recipe"], calibration_file)}
    dataclasses.replace(manifest, extra={**manifest.extra, "build": {**record, "key": key}},
                        quantization=quantization).write(folder)


def export_variant(ckpt: Checkpoint, variant: Variant, recipe: BuildRecipe, folder: Path, record: dict[str, Any],
                   key: str, progress: bool = False) -> None:
    """Export `variant` of `ckpt` into `folder` and stamp its build record."""
    from .export.pipeline import export

    spec = ckpt.spec
    if variant.context_length is not None:
        if variant.context_length > spec.context_length:
            raise recipe.error(("variants", variant.name, "context_length"),
                               f"{variant.context_length} exceeds the source's context of {spec.context_length}")
        spec = dataclasses.replace(spec, context_length=variant.context_length)
    # the source as the recipe names it, not this machine's path: the same bytes wherever it is built
    ckpt = dataclasses.replace(ckpt, spec=spec, source={**ckpt.source, "path": recipe.source.spelled})
    export(ckpt, folder, variant.options, progress=progress)
    stamp(folder, record, key, recipe.calibration_file)


def publish(entry: Path, target: Path) -> None:
    """Copy a cache entry to `target` atomically (unless the same build is there already)."""
    from .export.package import atomic_dir

    key = entry_key(entry)
    if entry_key(target) == key and _sizes(target) == _sizes(entry):
        return
    _stale(target.parent, target.name)
    with atomic_dir(target, force=True) as tmp:
        for file in sorted(entry.rglob("*"), key=lambda f: f.name == MANIFEST_NAME):  # the manifest last
            if file.is_file():
                (tmp / file.relative_to(entry)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, tmp / file.relative_to(entry))


def _sizes(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in folder.rglob("*") if f.is_file()}


# -- measuring -------------------------------------------------------------------------------------
def quality(packages: dict[str, tuple[Path, str]], reference: tuple[Path, str], recipe: BuildRecipe,
            cache: Path, force: bool = False, progress: bool = False) -> dict[str, dict[str, Any]]:
    """`edge-run eval`'s figures of every package and the reference ("reference" key), each cached
    under its package's key, the reference's key and the protocol (they are deterministic).

    Args:
        packages: name -> (package folder, cache key).
        reference: (package folder, cache key) of the float reference.
        force: score everything again (cached figures are ignored and replaced).
    """
    from . import data
    from .bench.eval import evaluate

    ev = recipe.evaluation
    protocol = {"windows": ev.windows, "window_tokens": ev.window_tokens,
                "text_sha256": hashlib.sha256(data.wikitext("test").encode()).hexdigest()}
    ref_path, ref_key = reference
    files = {name: cache / "evals" / f"{digest({'package': key, 'reference': ref_key, **protocol})}.json"
             for name, (_, key) in packages.items()}
    files[REFERENCE] = cache / "evals" / f"{digest({'package': ref_key, 'reference': None, **protocol})}.json"
    todo = [name for name in packages if force or not files[name].is_file()]
    if todo or force or not files[REFERENCE].is_file():
        report = evaluate([str(packages[n][0]) for n in todo], str(ref_path), ev.windows, ev.window_tokens,
                          ev.threads, progress=progress)
        files[REFERENCE].parent.mkdir(parents=True, exist_ok=True)
        for name, result in zip([REFERENCE, *todo], [report["reference"], *report["results"]]):
            write_json(files[name], result | {"protocol": report["protocol"]})
    return {name: json.loads(file.read_text()) for name, file in files.items()}


def decode_speeds(packages: dict[str, Path], baseline: str | None, recipe: BuildRecipe,
                  progress: bool = False) -> dict[str, dict[str, Any]]:
    """Decode tokens/s of every package, and its ratio to the baseline's, measured side by side.

    Every round decodes `decode_tokens` greedy tokens after the same WikiText-2 prompt on each
    package in turn, the order rotated per round, after one warm-up each; the ratio is the median
    of per-round ratios, so machine noise shared by a round cancels.
    """
    from .bench.prompts import make_prompts
    from .bench.stats import TimingRecord, summarize
    from .hub import load

    ev = recipe.evaluation
    engines = {name: load(path, threads=ev.threads, max_context=ev.prompt_tokens + ev.decode_tokens + 1)
               for name, path in packages.items()}
    prompt = make_prompts(next(iter(engines.values())).tokenizer, "wikitext", ev.prompt_tokens, 1)[0]

    def timed(engine, tokens: int) -> float:
        start, stamps = time.perf_counter(), []
        for _ in engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True):
            stamps.append(time.perf_counter() - start)
        return TimingRecord(len(prompt), 1, tuple(stamps)).decode_tok_s

    for engine in engines.values():
        timed(engine, 8)
    names = list(engines)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(ev.rounds), desc="decode speed", unit="round", disable=not progress):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(timed(engines[name], ev.decode_tokens))
    out = {}
    for name, speeds in runs.items():
        out[name] = {"decode_tok_s": summarize(speeds), "backend": engines[name].backend.name}
        if baseline is not None:
            out[name]["decode_ratio"] = summarize([s / b for s, b in zip(speeds, runs[baseline])])
    return out


def check_gates(gates: dict[str, float], figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Every gate of a variant with its measured value, pass/fail and by how much it missed."""
    measured = {"max_ppl_increase": figures.get("ppl_increase"), "min_top1": figures.get("top1"),
                "max_kl": figures.get("kl"), "max_size_mb": figures.get("size_mb"),
                "min_decode_ratio": figures.get("decode_ratio")}
    out = []
    for gate, limit in gates.items():
        value = measured[gate]
        passed = value is not None and (value <= limit if gate.startswith("max_") else value >= limit)
        missed = None if passed or value is None else abs(value - limit)
        out.append({"gate": gate, "limit": limit, "value": value, "passed": passed, "missed_by": missed})
    return out


# -- the build -------------------------------------------------------------------------------------
def check_out(out: Path) -> None:
    """OUT must be new, empty, or a build's folder (never a folder of other files)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise PackageError(f"{out} exists and is not an edge-run build folder (no {MARKER}); choose a new or "
                           f"empty -o folder")


def run_build(recipe: BuildRecipe, out: str | Path, only: tuple[str, ...] = (), force: bool = False,
              plot: bool = True, progress: bool = False) -> dict[str, Any]:
    """Build, evaluate and gate the recipe's variants (those in `only`, plus the reference and
    baseline they are measured against); write OUT's packages and reports.

    Returns:
        The report (also OUT/report.json); its "passed" is False when a variant missed a gate.
    Raises:
        RecipeError, PackageError, ValueError: a recipe, source or output folder that cannot be built.
    """
    from .hub import cache_home

    started = time.perf_counter()
    out = Path(out)
    names = [v.name for v in recipe.variants]
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ValueError(f"--only {unknown[0]!r} names no variant of {recipe.file}; variants: {', '.join(names)}")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("report.png needs matplotlib: pip install 'edge-run[bench]' (or pass --no-plot)")
    check_out(out)
    ev = recipe.evaluation
    chosen = [n for n in names if not only or n in only or n in (ev.reference, ev.baseline)]
    variants = [recipe.variant(n) for n in chosen]
    cache = cache_home() / "builds"
    source_path, source = resolve_source(recipe, progress)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    builds = [(v, build_record(v, source, calibration_record(recipe, v), recipe.calibration_file)) for v in variants]
    if ev.reference is None:
        builds.append((reference_variant(), build_record(reference_variant(), source, None)))
    ckpt: list[Checkpoint] = []  # loaded once, when a variant needs building
    entries: dict[str, tuple[Path, str]] = {}
    rows: dict[str, dict[str, Any]] = {}
    bar = tqdm(builds, desc="build", unit="variant", disable=not progress)
    for variant, record in bar:
        bar.set_postfix_str(variant.name)
        key = cache_key(record)

        def make(folder: Path, variant=variant, record=record, key=key) -> None:
            ckpt[:] = ckpt or [load_checkpoint(source_path)]
            export_variant(ckpt[0], variant, recipe, folder, record, key, progress)

        t0 = time.perf_counter()
        entry, reused = cached_entry(cache, key, make, force)
        entries[variant.name] = (entry, key)
        rows[variant.name] = {"name": variant.name, "key": key, "cached": reused,
                              "build_s": 0.0 if reused else round(time.perf_counter() - t0, 1)}
    ckpt.clear()  # the float weights are not needed to measure
    for variant in variants:
        publish(entries[variant.name][0], out / variant.name)
    build_s = time.perf_counter() - started

    reference = ev.reference or REFERENCE
    scores = quality({v.name: entries[v.name] for v in variants if v.name != reference}, entries[reference],
                     recipe, cache, force, progress)
    eval_s = time.perf_counter() - started - build_s
    speeds = decode_speeds({v.name: entries[v.name][0] for v in variants}, ev.baseline, recipe, progress)
    report = _report(recipe, variants, rows, scores, speeds, source, only)
    report["timings_s"] = {"build": round(build_s, 1), "quality": round(eval_s, 1),
                           "decode": round(time.perf_counter() - started - build_s - eval_s, 1)}
    report["timings_s"]["total"] = round(time.perf_counter() - started, 1)
    write_json(out / "report.json", report)
    write_text_atomic(out / "report.md", format_markdown(report))
    if plot:
        plot_report(report, out / "report.png")
    return report


def _report(recipe: BuildRecipe, variants: list[Variant], rows: dict, scores: dict, speeds: dict,
            source: dict, only: tuple[str, ...]) -> dict[str, Any]:
    """The report: per variant its build, figures and gates; the protocol; pass or fail."""
    from .bench.machine import cpu_info, versions

    ev = recipe.evaluation
    reference = ev.reference or REFERENCE
    ref = scores[REFERENCE]
    out_rows = []
    for v in variants:
        score = ref if v.name == reference else scores[v.name]
        figures = {"perplexity": score["perplexity"], "ppl_increase": score["perplexity"] / ref["perplexity"] - 1,
                   "kl": score["kl"] if v.name != reference else 0.0,
                   "top1": score["top1"] if v.name != reference else 1.0,
                   "size_mb": score["size_mb"], "bits_per_weight": score["bits_per_weight"],
                   "linear_bits_per_weight": score["linear_bits_per_weight"],
                   "decode_tok_s": speeds[v.name]["decode_tok_s"]["median"],
                   "decode_tok_s_range": [speeds[v.name]["decode_tok_s"][k] for k in ("min", "max")],
                   "backend": speeds[v.name]["backend"]}
        if "decode_ratio" in speeds[v.name]:
            ratio = speeds[v.name]["decode_ratio"]
            figures |= {"decode_ratio": ratio["median"], "decode_ratio_range": [ratio["min"], ratio["max"]]}
        gates = check_gates(v.gates, figures)
        out_rows.append(rows[v.name] | {"package": v.name, "format": "+".join(v.options.formats), "quant": v.quant,
                                        "layers": _layers(v)} | figures
                        | {"gates": gates, "passed": all(g["passed"] for g in gates)})
    protocol = ref["protocol"]
    missed = [f"{r['name']}: {_gate_text(g)}" for r in out_rows for g in r["gates"] if not g["passed"]]
    return {
        "recipe": {"file": str(recipe.file), "name": recipe.name, "sha256": sha256_file(recipe.file)},
        "only": list(only), "overrides": recipe.overrides, "tool_version": __version__, "source": source,
        "calibration": dataclasses.asdict(recipe.calibration),
        "evaluation": dataclasses.asdict(ev) | {"protocol": protocol},
        "reference": {"name": ev.reference or "fp32 ONNX export of the source", "perplexity": ref["perplexity"]},
        "variants": out_rows, "passed": not missed, "missed": missed,
        "machine": cpu_info(), "versions": versions()}


def _layers(variant: Variant) -> str:
    o = variant.options
    if o.keep_layers:
        return f"keep {len(o.keep_layers)}" + (" healed" if o.heal else "")
    return f"-{o.prune_layers}" + (" healed" if o.heal else "") if o.prune_layers else "all"


def _gate_text(gate: dict[str, Any]) -> str:
    sign = "<=" if gate["gate"].startswith("max_") else ">="
    if gate["value"] is None:
        return f"{gate['gate']} {sign} {gate['limit']:g}: not measured"
    text = f"{gate['gate']} {sign} {gate['limit']:g}: {gate['value']:.4g}"
    return text if gate["passed"] else f"{text}, missed by {gate['missed_by']:.4g}"


def format_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a verdict, the table, what was measured how (a CI job summary)."""
    ev = report["evaluation"]
    baseline = ev["baseline"]
    verdict = "all gates passed" if report["passed"] else f"**{len(report['missed'])} gate(s) missed**"
    lines = [f"### edge-run build `{report['recipe']['name']}`: {verdict}", "",
             f"| variant | format | quant | layers | size MB | ppl | ppl vs ref | KL | top-1 | decode tok/s | "
             f"vs {baseline or '-'} | gates |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        gates = "; ".join(("" if g["passed"] else "**missed** ") + _gate_text(g) for g in r["gates"]) or "-"
        ratio = f"x{r['decode_ratio']:.2f}" if r.get("decode_ratio") is not None else "-"
        cached = " (cached)" if r["cached"] else ""
        lines.append(f"| {r['name']}{cached} | {r['format']} ({r['backend']}) | {r['quant']} | {r['layers']} | "
                     f"{r['size_mb']:.1f} | {r['perplexity']:.3f} | {100 * r['ppl_increase']:+.2f}% | "
                     f"{r['kl']:.4f} | {100 * r['top1']:.1f}% | {r['decode_tok_s']:.1f} | {ratio} | {gates} |")
    p = ev["protocol"]
    lines += ["", f"Quality: WikiText-2 test, {p['windows']} independent {p['window_tokens']}-token windows "
                  f"({p['scored_positions']} positions scored) against the reference, "
                  f"{report['reference']['name']} (perplexity {report['reference']['perplexity']:.3f}). "
                  f"Decode: {ev['decode_tokens']} greedy tokens after a {ev['prompt_tokens']}-token prompt, "
                  f"{ev['rounds']} interleaved rounds, medians"
                  + (f"; ratios are per-round against {baseline}, measured side by side." if baseline else ".")]
    if report["overrides"]:
        lines.append("Settings from the command line instead of the recipe's: " + ", ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in report["overrides"].items()) + ".")
    if report["source"]["format"] == "gguf":
        lines.append(f"Source {report['source']['name']} (sha256 {report['source']['sha256'][:16]}...): the float "
                     f"reference is its dequantized weights.")
    t = report.get("timings_s", {})
    if t:
        lines.append(f"Wall time {t['total']:.0f} s (build {t['build']:.0f} s, quality {t['quality']:.0f} s, "
                     f"decode {t['decode']:.0f} s) on {report['machine']['model']}, "
                     f"{report['machine']['physical_cores']} cores; edge-run {report['tool_version']}.")
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Perplexity increase against package size and against decode speed, one point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["variants"]
    ratio = all(r.get("decode_ratio") is not None for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, label in ((axes[0], "size_mb", "package size (MB)"),
                           (axes[1], "decode_ratio" if ratio else "decode_tok_s",
                            f"decode speed vs {report['evaluation']['baseline']}" if ratio else "decode tokens/s")):
        for r in rows:
            ax.scatter(r[key], 100 * r["ppl_increase"], color="tab:blue" if r["passed"] else "tab:red",
                       marker="o" if r["passed"] else "x")
            ax.annotate(r["name"], (r[key], 100 * r["ppl_increase"]), fontsize=8, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=1)  # linear within +-1%, logarithmic beyond (a pruned draft's +50%)
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    axes[0].set_ylabel("perplexity increase vs reference (%)")
    fig.suptitle(f"edge-run build {report['recipe']['name']}: WikiText-2 "
                 f"{report['evaluation']['protocol']['windows']} x {report['evaluation']['protocol']['window_tokens']}"
                 f" tokens (red x: missed a gate)", fontsize=10)
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The build flags, for `edge-run build` (cli.py)."""
    p.add_argument("recipe", type=Path, help="the build recipe (TOML; see recipes/smollm2-135m.toml)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder for the packages (one per variant), report.json, report.md and report.png")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="build this variant only (repeatable); its reference and baseline are built too")
    p.add_argument("--force", action="store_true",
                   help="rebuild and rescore variants whose cache entry is complete (the cache key's tool version "
                        "does not change with every commit of a checkout)")
    p.add_argument("--eval-windows", type=int, default=None, metavar="N",
                   help="WikiText-2 windows to score instead of the recipe's (a short CI slice)")
    p.add_argument("--calibration-sequences", type=int, default=None, metavar="N",
                   help="calibration windows for GPTQ instead of the recipe's (a CI-sized calibration; "
                        "it changes the packages, so they get cache keys of their own)")
    p.add_argument("--no-plot", action="store_true", help="skip report.png (no matplotlib needed)")
    p.epilog = ("Exit status: 0 when every gate passed, 3 when a variant missed one (report.md and report.json "
                "say which and by how much), 1 on an error.")


def run(args: argparse.Namespace) -> int:
    """Build as parsed by `add_arguments`; prints the report table. Returns the exit status."""
    for flag, value in (("--eval-windows", args.eval_windows), ("--calibration-sequences", args.calibration_sequences)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    recipe = load_build_recipe(args.recipe, args.eval_windows, args.calibration_sequences)
    report = run_build(recipe, args.output, tuple(args.only), args.force, not args.no_plot, progress=True)
    print(format_markdown(report))
    for line in report["missed"]:
        print(f"edge-run: gate missed: {line}", file=sys.stderr)
    return 0 if report["passed"] else GATE_FAILURE


__all__ = ["GATES", "GATE_FAILURE", "build_record", "cache_key", "check_gates", "format_markdown", "run",
           "run_build"]
