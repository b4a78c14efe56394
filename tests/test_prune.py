"""Depth pruning removes exactly the reported blocks; healing fits the cut; scores are sane."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import build_tiny_llama

import edgerun
from edgerun.export.checkpoint import load_checkpoint
from edgerun.export.layers import LayerRunner, nll
from edgerun.export.package import write_package
from edgerun.export.prune import best_run, prune, score_layers
from edgerun.runtime.manifest import read_manifest

TOKENS = [5, 17, 42, 99, 3, 250, 7, 61, 12, 200, 33, 8, 9]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = build_tiny_llama(tmp_path_factory.mktemp("hf") / "tiny", seed=4, num_hidden_layers=6)
    return folder, load_checkpoint(folder)


def test_pruned_package_equals_model_built_from_kept_blocks(tiny, tmp_path):
    import torch
    import transformers

    folder, ckpt = tiny
    pruned = prune(ckpt, [2, 3])
    manifest = write_package(pruned, tmp_path / "pkg")
    assert manifest.model.num_layers == 4
    assert read_manifest(tmp_path / "pkg").kept_layers == (0, 1, 4, 5)
    assert manifest.extra["transforms"][0]["prune"]["removed"] == [2, 3]
    # the reference: transformers' model with the same two blocks deleted
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in (0, 1, 4, 5)])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = 4
    with torch.no_grad():
        ref = model(torch.tensor([TOKENS]), use_cache=False).logits[0].numpy()
    np.testing.assert_allclose(edgerun.Engine(tmp_path / "pkg").logits(TOKENS), ref, atol=1e-4, rtol=0)


def test_healing_fits_the_cut_and_is_applied(tiny, tmp_path):
    _, ckpt = tiny
    windows = [TOKENS, TOKENS[::-1], [t + 1 for t in TOKENS]]
    runner = LayerRunner(ckpt, 32)
    healed = prune(ckpt, [3, 4], heal_windows=windows, runner=runner)
    assert set(k for k in healed.weights if k.startswith("cut.")) == {"cut.3.weight", "cut.3.bias"}
    write_package(healed, tmp_path / "healed")
    write_package(prune(ckpt, [3, 4]), tmp_path / "plain")
    # on the fitting data the healed residual stream tracks the full model better than a plain cut
    states = runner.residuals(TOKENS)
    full = runner.logits(states[-1])
    healed_logits = edgerun.Engine(tmp_path / "healed").logits(TOKENS)
    plain_logits = edgerun.Engine(tmp_path / "plain").logits(TOKENS)
    assert np.abs(healed_logits - full).mean() < np.abs(plain_logits - full).mean()
    assert healed.transforms[-1]["prune"]["healing"][0]["at_layer"] == 3


def test_removing_the_top_blocks_heals_before_the_head(tiny, tmp_path):
    _, ckpt = tiny
    healed = prune(ckpt, [5], heal_windows=[TOKENS])
    assert "cut.5.weight" in healed.weights  # new index 5 == num_layers: before the final norm
    write_package(healed, tmp_path / "pkg")
    assert edgerun.Engine(tmp_path / "pkg").logits(TOKENS).shape == (len(TOKENS), ckpt.spec.vocab_size)


def test_layer_runner_matches_the_package(tiny, tmp_path):
    _, ckpt = tiny
    write_package(ckpt, tmp_path / "pkg")
    runner = LayerRunner(ckpt, 32)
    np.testing.assert_allclose(runner.logits(runner.residuals(TOKENS)[-1]),
                               edgerun.Engine(tmp_path / "pkg").logits(TOKENS), atol=1e-4, rtol=0)


def test_scores_and_best_run(tiny):
    _, ckpt = tiny
    runner = LayerRunner(ckpt, 32)
    windows = [TOKENS, TOKENS[::-1]]
    scores = score_layers(runner, windows)
    assert len(scores.angular) == len(scores.removal_ppl) == 6
    assert all(0 <= a <= 1 for a in scores.angular)
    base = np.exp(np.mean(np.concatenate([nll(runner.logits(runner.residuals(t)[-1]), t) for t in windows])))
    assert scores.base_ppl == pytest.approx(base, rel=1e-6)
    start = best_run(runner, windows, 2)
    assert 1 <= start <= 4
    assert "full model perplexity" in scores.table()


@pytest.mark.parametrize("drop", [[], [6], [0, 1, 2, 3, 4, 5]])
def test_bad_prune_requests(tiny, drop):
    _, ckpt = tiny
    with pytest.raises(ValueError, match="blocks to remove"):
        prune(ckpt, drop)
