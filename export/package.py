"""Write an edge-run package: manifest.json, stage graphs with external data, tokenizer.json.

Writing is atomic: everything goes into a temporary sibling folder that is renamed into place
only when complete, so a failed export never leaves a half-written package.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import onnx
from tqdm import tqdm

from .. import __version__
from ..runtime.manifest import Manifest, PackageError, Stage
from .checkpoint import Checkpoint, load_checkpoint
from .onnx_graph import build_stage

log = logging.getLogger(__name__)


@contextmanager
def atomic_dir(target: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces `target` only if the block completes."""
    target = Path(target)
    if target.exists() and not force:
        raise PackageError(f"{target} already exists; choose another -o folder or pass --force")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as e:
        raise PackageError(f"cannot create {target}: {e.strerror or e} ({e.filename or target.parent}); "
                           f"choose a writable -o folder") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; a package is an ordinary folder
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def split_layers(num_layers: int, boundaries: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Turn stage boundaries (first layer of each later stage) into [start, end) ranges."""
    cuts = [0, *boundaries, num_layers]
    if any(b <= a for a, b in zip(cuts, cuts[1:])) or not all(0 < b < num_layers for b in boundaries):
        raise PackageError(f"stage boundaries {list(boundaries)} must be increasing layer indices "
                           f"inside 1..{num_layers - 1}")
    return list(zip(cuts, cuts[1:]))


def write_package(ckpt: Checkpoint, out_dir: str | Path, stage_boundaries: Sequence[int] = (),
                  force: bool = False, progress: bool = False, separate_head: bool = False) -> Manifest:
    """Write `ckpt` as an fp32 ONNX package.

    Args:
        ckpt: the checkpoint to export.
        out_dir: package folder to create.
        stage_boundaries: first layer of every stage after the first (empty: one graph).
        force: replace an existing folder.
        progress: show a progress bar on stderr.
        separate_head: put final norm + LM head in a stage of its own, so the runtime can
            score the hidden states of any stage boundary (early exit, self-speculation).
    Returns:
        The manifest written.
    """
    ranges = split_layers(ckpt.spec.num_layers, stage_boundaries)
    if separate_head:
        ranges.append((ckpt.spec.num_layers, ckpt.spec.num_layers))
    stages = []
    with atomic_dir(Path(out_dir), force=force) as tmp:
        for k, (start, end) in enumerate(tqdm(ranges, desc="export", unit="stage", disable=not progress)):
            stage = Stage(file="head.onnx" if start == end else f"stage{k}.onnx", first_layer=start, end_layer=end,
                          embeds=k == 0, has_head=k == len(ranges) - 1)
            model = build_stage(ckpt.spec, ckpt.weights, start, end, stage.embeds, stage.has_head)
            onnx.save_model(model, tmp / stage.file, save_as_external_data=True,
                            all_tensors_to_one_file=True, location=f"{stage.file}.data", size_threshold=1024)
            stages.append(stage)
        ckpt.tokenizer.save(str(tmp / "tokenizer.json"))
        manifest = Manifest(
            model=ckpt.spec,
            stages=tuple(stages),
            weights={"embedding": "float32", "attention": "float32", "mlp": "float32",
                     "norms": "float32", "lm_head": "tied" if ckpt.spec.tie_embeddings else "float32"},
            tokenizer="tokenizer.json",
            bos_token_id=ckpt.bos_token_id,
            eos_token_ids=ckpt.eos_token_ids,
            add_bos_token=ckpt.add_bos_token,
            chat_template=ckpt.chat_template,
            source=ckpt.source,
            tool_version=__version__,
            kept_layers=tuple(range(ckpt.spec.num_layers)),
        )
        manifest.validate()
        manifest.write(tmp)
    log.info("wrote package %s (%d stage graphs)", out_dir, len(stages))
    return manifest


def export(model: str | Path, out_dir: str | Path, stage_boundaries: Sequence[int] = (),
           force: bool = False, progress: bool = False, separate_head: bool = False) -> Manifest:
    """Read checkpoint `model` (path) and write an ONNX package to `out_dir`."""
    return write_package(load_checkpoint(model), out_dir, stage_boundaries, force, progress, separate_head)
