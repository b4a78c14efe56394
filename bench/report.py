"""Show a benchmark report: rich tables on the terminal, a markdown version, and a PNG plot."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..files import save_figure_atomic, write_text_atomic

log = logging.getLogger(__name__)
COLORS = {"edgerun": "tab:blue", "llamacpp": "tab:orange", "ortgenai": "tab:green", "transformers": "tab:red"}


def write_json(path: Path, data) -> None:
    """Write a JSON report whole or not at all: to `<name>.partial` beside it, then renamed."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _cell(summary: dict | None, digits: int = 1, rich: bool = True) -> str:
    """'median' over a dim 'min-max' line (rich), or 'median (min-max)' (markdown)."""
    if not summary:
        return "-"
    if "unsupported" in summary:
        return "n/a"
    med, low, high = summary["median"], summary["min"], summary["max"]
    if summary.get("n", 1) == 1:
        return f"{med:.{digits}f}"
    spread = f"{low:.{digits}f}–{high:.{digits}f}"
    return f"{med:.{digits}f}\n[dim]{spread}[/]" if rich else f"{med:.{digits}f} ({spread})"


def _num(value: float | None, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def _prompt_cases(report: dict) -> list[int]:
    return list(report["settings"]["prompt_tokens"])


def speed_rows(report: dict, rich: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the latency/speed table (batch 1)."""
    lengths = _prompt_cases(report)
    header = ["engine"]
    for n in lengths:
        header += [f"prefill {n} tok/s", f"TTFT {n} ms", f"decode@{n} tok/s"]
    header += [f"ITL@{lengths[0]} median ms", f"ITL@{lengths[0]} p90 ms"]
    rows = []
    for e in report["engines"]:
        if e["status"] != "ok":
            continue
        row = [e["label"]]
        for n in lengths:
            r = e["results"].get(f"prompt_{n}", {})
            row += [_cell(r.get("prefill_tok_s"), 0, rich), _cell(r.get("ttft_ms"), 0, rich),
                    _cell(r.get("decode_tok_s"), 1, rich)]
        r = e["results"].get(f"prompt_{lengths[0]}", {})
        row += [_cell(r.get("itl_ms_median"), 2, rich), _cell(r.get("itl_ms_p90"), 2, rich)]
        rows.append(row)
    return header, rows


def resource_rows(report: dict, rich: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the throughput / memory / bandwidth / quality table."""
    batches = report["settings"]["batch"]
    machine_gb_s = report["machine"]["read_bandwidth"]["bytes_per_s"] / 1e9
    header = ["engine", *[f"batch {b} tok/s" for b in batches], "batch-1 peak RSS MB", "peak RSS MB", "file MB",
              "weights MB/token", f"GB/s read (of {machine_gb_s:.0f})", "CPU share", "ppl"]
    rows = []
    for e in report["engines"]:
        if e["status"] != "ok":
            continue
        share = f" ({100 * e['bandwidth_fraction']:.0f}%)" if e.get("bandwidth_fraction") else ""
        rows.append([e["label"], *[_cell(e["results"].get(f"batch_{b}", {}).get("decode_tok_s")
                                         if "unsupported" not in e["results"].get(f"batch_{b}", {})
                                         else {"unsupported": True}, 1, rich) for b in batches],
                     _num(e.get("batch1_peak_rss_mb"), ".0f"), _num(e["peak_rss_mb"], ".0f"),
                     _num(e["file_mb"], ".0f"), _num(e["weight_mb_per_token"], ".0f"),
                     _num(e["bandwidth_gb_s"], ".1f") + share, _num(_cpu_share(e), ".0%"),
                     _num(e["perplexity"], ".2f")])
    return header, rows


def _cpu_share(engine: dict) -> float | None:
    """Median share of its threads' CPU time the engine got at batch 1 (noise: far below 100%)."""
    shares = [r["cpu_share"]["median"] for r in engine["results"].values() if "cpu_share" in r]
    return sorted(shares)[len(shares) // 2] if shares else None


def comparison_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    lengths = _prompt_cases(report)
    header = ["ours", "peer", "precision", *[f"decode@{n} ratio" for n in lengths], f"prefill {lengths[0]} ratio"]
    rows = [[c["ours"], c["peer"], c["precision_class"],
             *[_num(c.get(f"decode_tok_s_prompt_{n}"), ".2f") for n in lengths],
             _num(c.get(f"prefill_tok_s_prompt_{lengths[0]}"), ".2f")] for c in report["comparisons"]]
    return header, rows


def _overall_share(report: dict) -> float | None:
    shares = [x for e in report["engines"] if e["status"] == "ok" and (x := _cpu_share(e)) is not None]
    return sorted(shares)[len(shares) // 2] if shares else None


def header_lines(report: dict) -> list[str]:
    m, s = report["machine"], report["settings"]
    bw = m["read_bandwidth"]
    return [
        f"{m['model']} ({m['physical_cores']} physical / {m['logical_cores']} logical cores, "
        f"{', '.join(m['simd']) or 'no SIMD flags read'}), {m['memory_gb']} GB",
        f"memory read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['threads']} threads), "
        f"{bw['single_thread_bytes_per_s'] / 1e9:.1f} GB/s (1 thread); load average "
        f"{m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after",
        f"noise: engines got {_num(_overall_share(report), '.0%')} of their threads' CPU time (median; "
        f"100% on an idle machine)",
        f"model {Path(s['model']).name}; {s['prompts']} prompts of {s['prompt_tokens']} tokens, {s['new_tokens']} new "
        f"tokens, " + (f"batch {s['batch']} at {s['batch_prompt_tokens']}-token prompts"
                       if s['batch'] else "no batch cases")
        + f"; {s['threads']} threads; greedy; "
        f"median (min–max) of {s['repeats']} repeats after a warm-up; {s['seconds']:.0f} s; commit {report['commit']}",
    ]


def print_report(report: dict, console) -> None:
    """The tables, on a rich console."""
    from rich.table import Table

    for line in header_lines(report):
        console.print(line)
    for title, (header, rows) in (("speed at batch 1", speed_rows(report)),
                                  ("throughput, memory, bandwidth, quality", resource_rows(report))):
        table = Table(title=title, show_lines=True)
        for k, name in enumerate(header):
            table.add_column(name, justify="left" if k == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for e in report["engines"]:
        if e["status"] != "ok":
            console.print(f"[{'yellow' if e['status'] == 'skipped' else 'red'}]{e['status']}[/] "
                          f"{e['label']}: {e['error']}")
    header, rows = comparison_rows(report)
    if rows:
        table = Table(title="ours / peer at the same precision (medians; > 1: edge-run is faster)")
        for name in header:
            table.add_column(name)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    spec = report.get("speculative")
    if spec:
        console.print("[bold]speculative decoding[/] (bench/speculative_runs.py)")
        console.print(spec.get("output") or f"{spec['status']}: {spec.get('error')}", markup=False)


def markdown(report: dict) -> str:
    """The report's tables in markdown (for the README and notes)."""
    parts = ["\n".join(header_lines(report))]
    for header, rows in (speed_rows(report, rich=False), resource_rows(report, rich=False), comparison_rows(report)):
        if not rows:
            continue
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("\n", " ") for cell in row) + " |" for row in rows]
        parts.append("\n".join(lines))
    parts += [f"{e['status']}: {e['label']}: {e['error']}" for e in report["engines"] if e["status"] != "ok"]
    return "\n\n".join(parts) + "\n"


def plot(report: dict, path: Path) -> str:
    """Decode tok/s per engine and precision, and speed vs perplexity; returns what was drawn."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'edge-run[bench]')")
        return "skipped: matplotlib not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report["settings"]["prompt_tokens"][0]
    ok = [e for e in report["engines"] if e["status"] == "ok" and f"prompt_{n}" in e["results"]]
    rated = [e for e in ok if e["perplexity"] is not None]
    fig, axes = plt.subplots(1, 2 if rated else 1, figsize=(14 if rated else 8, 0.45 * len(ok) + 2), squeeze=False)
    ax = axes[0][0]
    speeds = [e["results"][f"prompt_{n}"]["decode_tok_s"] for e in ok]
    ax.barh([e["label"] for e in ok], [s["median"] for s in speeds],
            xerr=[[s["median"] - s["min"] for s in speeds], [s["max"] - s["median"] for s in speeds]],
            color=[COLORS.get(e["engine"], "gray") for e in ok])
    ax.invert_yaxis()
    ax.set_xlabel(f"decode tokens/s after a {n}-token prompt (median, min–max)")
    ax.set_title(f"{Path(report['settings']['model']).name}, {report['settings']['threads']} threads, "
                 f"{report['machine']['model']}")
    drawn = "decode bars"
    if rated:
        ax = axes[0][1]
        for e in rated:
            x = e["results"][f"prompt_{n}"]["decode_tok_s"]["median"]
            ax.scatter(x, e["perplexity"], color=COLORS.get(e["engine"], "gray"))
            ax.annotate(e["label"], (x, e["perplexity"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("decode tokens/s")
        ax.set_ylabel(f"WikiText-2 perplexity ({report['settings']['ppl_windows']} x "
                      f"{report['settings']['ppl_window_tokens']} tokens; lower is better)")
        ax.set_title("speed vs quality")
        drawn += " and speed-vs-quality scatter"
    else:
        drawn += "; no speed-vs-quality scatter: no perplexity measured (pass --ppl-windows N)"
    fig.tight_layout()
    save_figure_atomic(fig, path)
    plt.close(fig)
    return drawn
