"""ORT-format models for mobile targets (`--device android|ios`), with onnxruntime's own converter.

The ONNX Runtime Mobile packages (and reduced builds) load ORT-format models (`.ort`, flatbuffers,
weights inline). `onnxruntime.tools.convert_onnx_models_to_ort` writes one per stage graph, already
optimized for the CPU provider at the level the mobile runtime applies, plus
`required_operators.config`: the operator kernels a reduced build (`build.sh
--include_ops_by_config required_operators.config --minimal_build`) must keep.
"""
from __future__ import annotations

import contextlib
import io
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

OPERATORS_CONFIG = "required_operators.config"


def write_ort_models(folder: Path, stage_files: list[str]) -> tuple[list[str], str]:
    """Convert the stage graphs in `folder` to ORT format next to them, plus the operators config.

    Args:
        folder: the (temporary) package folder holding the stage graphs and their .data files.
        stage_files: the stage graph file names, relative to `folder`.
    Returns:
        (the .ort file names in stage order, the operators config file name), relative to `folder`.
    Raises:
        ValueError: onnxruntime could not convert a graph (its reason).
    """
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)  # it logs each config at INFO
    staging = folder / "ort-conversion"
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # the converter prints its progress
            # target "arm": no x86-only layout (NCHWc) transforms baked into the saved graph
            convert_onnx_models_to_ort(folder, output_dir=staging, optimization_styles=[OptimizationStyle.Fixed],
                                       target_platform="arm")
    except Exception as e:  # the converter raises whatever the session raised
        raise ValueError(f"onnxruntime could not convert the package to ORT format: {str(e).splitlines()[0]}") from e
    finally:
        log.debug("convert_onnx_models_to_ort: %s", printed.getvalue())
    ort_files = []
    for name in stage_files:
        ort_name = str(Path(name).with_suffix(".ort"))
        (staging / ort_name).replace(folder / ort_name)
        ort_files.append(ort_name)
    config = (staging / OPERATORS_CONFIG).read_text()  # its header names the temporary folder's files
    (folder / OPERATORS_CONFIG).write_text(config.replace(f"{staging}/", "").replace(str(staging), ""))
    shutil.rmtree(staging)
    return ort_files, OPERATORS_CONFIG


__all__ = ["OPERATORS_CONFIG", "write_ort_models"]
