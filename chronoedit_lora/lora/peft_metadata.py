"""PEFT's ``lora_adapter_metadata`` safetensors header: the only place a diffusers-format LoRA keeps alpha.

diffusers builds ``peft.LoraConfig(**metadata)`` from it (per-layer ``rank_pattern``/``alpha_pattern``
included); without it, alpha silently becomes the rank. Pipeline files prefix every entry with the
component (``transformer.lora_alpha``), and diffusers reads only those entries when the tensor keys
carry that prefix too.
"""

from __future__ import annotations

import json
import math
from collections import Counter

from ..errors import CheckpointError

METADATA_KEY = "lora_adapter_metadata"
COMPONENT = "transformer."


def _config(raw: str, prefixed: bool, source: str) -> dict:
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: header {METADATA_KEY} is not JSON ({exc}).") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: header {METADATA_KEY} is not a JSON object.")
    if prefixed:
        config = {k[len(COMPONENT):]: v for k, v in config.items() if k.startswith(COMPONENT)}
    return config


def read_alphas(metadata: dict[str, str], ranks: dict[str, int], prefixed: bool, source: str,
                dora: bool = False) -> dict[str, float]:
    """Alpha of each layer (diffusers name -> its rank) as diffusers/PEFT apply the file; ``dora``:
    the file holds DoRA magnitudes.

    rsLoRA (scale alpha / sqrt(rank)) is turned into the equivalent plain alpha. A rank that
    contradicts the header (diffusers would refuse the file), or a header and tensors that disagree
    on DoRA, is an error.
    """
    raw = metadata.get(METADATA_KEY)
    config = _config(raw, prefixed, source) if raw else None
    if not config:
        return {module: float(rank) for module, rank in ranks.items()}
    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    try:
        peft_config = LoraConfig(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: header {METADATA_KEY} is not a peft LoraConfig ({exc}).") from None
    if peft_config.use_dora != dora:
        said, held = ("DoRA", "no lora_magnitude_vector tensors") if peft_config.use_dora else ("plain LoRA", "DoRA magnitudes")
        raise CheckpointError(f"{source}: header {METADATA_KEY} says {said} but the file holds {held}; "
                              "re-export it from the training run.")
    rank_pattern, alpha_pattern = peft_config.rank_pattern or {}, peft_config.alpha_pattern or {}
    alphas, misfit = {}, []
    for module, rank in ranks.items():
        expected = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), peft_config.r)
        if expected != rank:
            misfit.append(f"{module}: {rank} (header: {expected})")
        alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), peft_config.lora_alpha))
        alphas[module] = alpha * math.sqrt(rank) if peft_config.use_rslora else alpha
    if misfit:
        raise CheckpointError(f"{source}: {len(misfit)} layer(s) have another rank than header {METADATA_KEY} says: "
                              + ", ".join(misfit[:5]))
    return alphas


def write_metadata(ranks: dict[str, int], dora: bool = False) -> str:
    """Header for a ``transformer.``-prefixed file (diffusers name -> rank) whose alphas equal the ranks
    (``dora``: with DoRA magnitudes).

    The most common rank is ``r``; other layers go to ``rank_pattern``/``alpha_pattern`` by full
    name. diffusers pads an image-to-video model's LoRA that lacks ``attn2.add_k_proj``/``add_v_proj``
    with zero layers shaped like ``attn2.to_k``'s, so those are named here too.
    """
    ranks = dict(ranks)
    if not all(any(m.endswith(f".attn2.{proj}") for m in ranks) for proj in ("add_k_proj", "add_v_proj")):
        for module, rank in list(ranks.items()):
            if module.endswith(".attn2.to_k"):
                block = module[: -len("to_k")]
                ranks.setdefault(block + "add_k_proj", rank)
                ranks.setdefault(block + "add_v_proj", rank)
    counts = Counter(ranks.values())
    r = max(counts, key=lambda rank: (counts[rank], rank))
    pattern = {module: rank for module, rank in sorted(ranks.items()) if rank != r}
    config = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": pattern, "alpha_pattern": pattern,
              "use_dora": dora}
    return json.dumps({COMPONENT + k: v for k, v in config.items()}, sort_keys=True)
