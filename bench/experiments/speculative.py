"""Speculative decoding benchmark: speedup over plain decoding of the same target, per drafter.

    python bench/experiments/speculative.py TARGET --drafters lookup self:10 draft:PKG \
        --prompts mt_bench edit --n 8 --new-tokens 128 --json out.json
    python bench/experiments/speculative.py TARGET --drafters lookup --prompts edit --llamacpp smollm2-135m
    python bench/experiments/speculative.py TARGET --drafters lookup --draft-tokens auto 8   # policy vs fixed

The runs of `edgerun.bench.speculative_runs` (the section `edge-run bench --speculative` shows; its
docstring says what is measured and reported), plus a peer: with --llamacpp, llama-cpp-python's
own loop runs in the same rounds on that GGUF, plain and with its prompt lookup decoding, and its
speedup is over its own plain run (same prompt tokens).
"""
from __future__ import annotations

from pathlib import Path

from edgerun.bench import command, parser
from edgerun.bench.speculative_runs import Runners, add_arguments, draft_lengths, run


class LlamaCppPeer:
    """llama-cpp-python's own loop (`Llama.generate`, greedy) on a GGUF, plain and with its prompt
    lookup decoding (`LlamaPromptLookupDecoding` as `draft_model`): the peer a user would pick.

    Args:
        gguf: the GGUF file; threads: llama.cpp threads; n_ctx: context (prompt + new tokens);
        stop: token ids that end a run (included), as in our engine's runs;
        max_ngram, num_pred_tokens: LlamaPromptLookupDecoding's settings (its defaults: 2, 10).
    """

    def __init__(self, gguf: Path, threads: int, n_ctx: int, stop: frozenset[int] = frozenset(),
                 max_ngram: int = 2, num_pred_tokens: int = 10):
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        # flash attention off as in llamacpp_overhead.py (llama-cpp-python's default too)
        kw = dict(n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=n_ctx, flash_attn=False,
                  verbose=False)
        self.plain = llama_cpp.Llama(str(gguf), **kw)
        self.lookup = llama_cpp.Llama(str(gguf), draft_model=LlamaPromptLookupDecoding(max_ngram, num_pred_tokens),
                                      **kw)
        self.settings = f"max_ngram_size={max_ngram}, num_pred_tokens={num_pred_tokens}"
        self.stop = stop

    def run(self, llm, tokens: list[int], new_tokens: int) -> tuple[list[int], float, float]:
        """As `speculative_runs.timed_run`, with llama-cpp-python's greedy loop."""
        from llamacpp_overhead import llama_cpp_greedy

        out, start, stamps = llama_cpp_greedy(llm, tokens, new_tokens, self.stop)
        return out, stamps[-1] - start, stamps[-1] - stamps[0]

    def runners(self) -> Runners:
        return {"llama.cpp plain": (lambda t, n: self.run(self.plain, t, n), None, None),
                "llama.cpp lookup": (lambda t, n: self.run(self.lookup, t, n), "llama.cpp plain", None)}


def main(argv: list[str] | None = None) -> dict:
    from edgerun.devices.providers import physical_cores

    p = parser("python bench/experiments/speculative.py", __doc__)
    add_arguments(p)
    p.add_argument("--llamacpp", default=None, metavar="GGUF",
                   help="also run llama-cpp-python plain and with its prompt lookup decoding on this GGUF "
                        "(file, known model name or package with a GGUF), interleaved with ours")
    args = p.parse_args(argv)
    draft_tokens = draft_lengths(p, args)

    def peer(prompts_by_set: dict[str, list[list[int]]], stop: frozenset[int]) -> tuple[Runners, str]:
        from edgerun.hub import resolve_package
        from edgerun.runtime.manifest import read_manifest

        package = resolve_package(args.llamacpp, backend="llamacpp")  # no model loaded just for its path
        gguf = read_manifest(package).gguf_path(package)
        longest = max(len(t) for prompts in prompts_by_set.values() for t in prompts)
        llama = LlamaCppPeer(gguf, args.threads or physical_cores(), longest + args.new_tokens + 16, stop)
        return llama.runners(), f"; llama-cpp-python on {llama.plain.model_path} ({llama.settings})"

    return run(args, draft_tokens, peer if args.llamacpp else None)


if __name__ == "__main__":
    command(main, "python bench/experiments/speculative.py")
