"""Model families, found by architecture name (GGUF `general.architecture`, HF `model_type`).

Each family module registers a `Family` describing how its checkpoints map onto a
`ModelSpec` and the canonical weight names the graph builders use.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...runtime.manifest import ModelSpec, PackageError


@dataclass(frozen=True)
class Family:
    """How one architecture's checkpoints map onto edge-run's canonical form.

    Attributes:
        name: canonical architecture name written into manifests.
        aliases: other names checkpoints use for the same architecture.
        spec_from_gguf: GGUF metadata (key -> value, without the `arch.` prefix) -> ModelSpec.
        spec_from_hf: HF config.json dict -> ModelSpec.
        gguf_names: canonical weight name -> GGUF tensor name (`{i}` = layer index).
        hf_names: canonical weight name -> HF safetensors name (`{i}` = layer index).
        from_gguf_tensor: fixes the layout of a dequantized GGUF tensor (name, array, spec).
        to_gguf_tensor: the inverse: canonical array -> the layout llama.cpp expects.
        from_hf_tensor: fixes a Hugging Face tensor's values (e.g. Gemma's norm offset); optional.
        chat_template: the family's standard chat template, for a checkpoint that ships none (as
            llama.cpp falls back to its built-in templates); None: such a checkpoint stays untemplated.
        end_of_turn: tokens that end a model's turn in that template, added to the checkpoint's
            end-of-sequence ids when its vocabulary has them.
    """

    name: str
    aliases: tuple[str, ...]
    spec_from_gguf: Callable[[dict[str, Any]], ModelSpec]
    spec_from_hf: Callable[[dict[str, Any]], ModelSpec]
    gguf_names: dict[str, str]
    hf_names: dict[str, str]
    from_gguf_tensor: Callable[[str, np.ndarray, ModelSpec], np.ndarray]
    to_gguf_tensor: Callable[[str, np.ndarray, ModelSpec], np.ndarray]
    # fixes the layout of an HF tensor (name, float32 array, spec); None: as stored
    from_hf_tensor: Callable[[str, np.ndarray, ModelSpec], np.ndarray] | None = None
    chat_template: str | None = None
    end_of_turn: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for key in (family.name, *family.aliases):
        _FAMILIES[key] = family
    return family


def get_family(architecture: str) -> Family:
    """Return the family registered for `architecture`.

    Raises:
        PackageError: naming the architecture and the supported ones.
    """
    try:
        return _FAMILIES[architecture]
    except KeyError:
        raise PackageError(
            f"unsupported architecture {architecture!r}; edge-run supports: "
            f"{', '.join(sorted(_FAMILIES))}"
        ) from None


def supported_architectures() -> list[str]:
    """Architecture names edge-run can read weights of (and export)."""
    return sorted(_FAMILIES)


def find_family(architecture: str) -> Family | None:
    """The family registered for `architecture`, or None when edge-run has none."""
    return _FAMILIES.get(architecture)


def layer_names(names: dict[str, str], num_layers: int) -> dict[str, str]:
    """Expand a `{i}` name table into concrete names for every layer."""
    out: dict[str, str] = {}
    for canonical, external in names.items():
        if "{i}" in canonical:
            for i in range(num_layers):
                out[canonical.format(i=i)] = external.format(i=i)
        else:
            out[canonical] = external
    return out


from . import gemma3, llama, phi3, qwen2, qwen3  # noqa: E402, F401  (register the families; must follow the registry definitions above)
