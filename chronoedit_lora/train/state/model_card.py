"""The model card written beside a trained LoRA: a Hugging Face ``README.md`` (YAML header, then how
the LoRA was made and how to load it in diffusers, ComfyUI and the kit).

Text that comes from the user (the example prompt, the run's and the dataset's names) is escaped
(:func:`markdown_text`): it renders as written and cannot add headings, links, HTML or front matter.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from ...files import write_text
from ...lora.weights import ADAPTER_NAMES
from ..loop.config import TrainConfig, dataset_specs
from .lora_export import FINAL_NAME

BASE_MODEL = "nvidia/ChronoEdit-14B-Diffusers"
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+\-.!])")  # what both CommonMark and Python-Markdown unescape
_PLAIN_NAME = re.compile(r"[\w.:+-]+")
_ENTITIES = {"|": "&#124;", "~": "&#126;", "=": "&#61;", ":": "&#58;"}  # table pipes, strike-through, setext, autolinks


def markdown_text(text: str) -> str:
    """``text`` as literal Markdown: HTML and Markdown syntax escaped, one line (line breaks become spaces)."""
    escaped = _MARKDOWN_PUNCTUATION.sub(r"\\\1", html.escape(" ".join(text.split()), quote=False))
    return "".join(_ENTITIES.get(ch, ch) for ch in escaped)


def markdown_quote(text: str) -> str:
    """``text`` as a block quote that shows it line for line, every line escaped (see :func:`markdown_text`)."""
    return "\n>\n".join(f"> {markdown_text(line)}" if line.strip() else ">" for line in text.splitlines() or [""])

CARD_NAME = "README.md"
CARD_MARK = "library_name: chronoedit-lora"  # what tells the kit's card from any other README
EVAL_START, EVAL_END = "<!-- chronoedit-lora eval -->", "<!-- /chronoedit-lora eval -->"
EVAL_METRICS = Path("eval") / "metrics.csv"


def render_model_card(config: TrainConfig, steps: int, pairs: int, example_prompt: str, sample: str | None) -> str:
    """The card's Markdown (``sample``: the latest sample grid, relative to the card)."""
    name = ADAPTER_NAMES[config.adapter]
    size = f"{config.width}x{config.height}" if config.height else f"aspect buckets under {config.max_pixels} pixels"
    grid = (f"\n## Samples\n\nInput | edit with this {name} | target, after {steps} steps:\n\n![samples]({sample})\n"
            if sample else "")
    return f"""---
base_model: {BASE_MODEL}
library_name: chronoedit-lora
pipeline_tag: image-to-image
tags:
- {config.adapter}
- image-editing
- chronoedit
- wan2.1
---

# ChronoEdit {name}: {markdown_text(Path(config.output).name)}

A {name} for [ChronoEdit-14B]({"https://huggingface.co/" + BASE_MODEL}) (image editing as a short video:
the input image is frame 0, the edit the last frame), trained with chronoedit-lora.

## Training

| | |
|---|---|
| data | {pairs} before/after pairs from {", ".join(markdown_text(Path(spec.csv).name) for spec in dataset_specs(config))}, {size} |
| adapter | {name}{_lokr_shape(config)}, rank {config.rank}, alpha {config.alpha:g}, targets `{",".join(config.targets)}` |
| steps | {steps} (batch {config.batch_size} x accumulation {config.gradient_accumulation} per process), learning rate {config.learning_rate:g} |
{_base_row(config)}| RoPE | `{config.rope}` ({"ChronoEdit's temporal skip, positions [0, 7]" if config.rope == "skip" else "positions [0, 1], as the original scripts"}) |

Prompts follow the training data's form, for example:

{markdown_quote(example_prompt)}
{grid}
## Use

**chronoedit-lora**

```bash
chronoedit-lora edit --model ChronoEdit-14B-Diffusers{_base_flags(config)} --lora {FINAL_NAME} \\
  --image input.png --prompt "..." --output edited.png
```

{_diffusers_use(config.adapter)}
**ComfyUI**: put `{FINAL_NAME}` in `models/loras/` and load it with a LoRA loader on the ChronoEdit
model (its keys are `diffusion_model.blocks.N.…`, which ComfyUI maps{_comfy_keys(config.adapter)}).
"""


def _base_row(config: TrainConfig) -> str:
    """The table row naming the adapters the base was trained with (none: no row)."""
    if not config.base_loras:
        return ""
    names = ", ".join(f"`{markdown_text(Path(spec).name)}`" for spec in config.base_loras)
    return f"| base | trained on the base with {names} fused in (FILE:SCALE): load it with them, in this order |\n"


def _base_flags(config: TrainConfig) -> str:
    """``--lora`` flags for the base's adapters, and the distill preset where the run previewed with it."""
    names = [Path(spec).name for spec in config.base_loras]  # a name with other characters is not put in a code block
    flags = "".join(f" --lora {name if _PLAIN_NAME.fullmatch(name) else f'BASE_LORA_{i + 1}'}"
                    for i, name in enumerate(names))
    return flags + (f" --preset {config.sample_preset}" if config.sample_preset else "")


def _lokr_shape(config: TrainConfig) -> str:
    if config.adapter != "lokr":
        return ""
    factor = "as square as possible" if config.lokr_factor == -1 else f"factor {config.lokr_factor}"
    return f" (Kronecker split {factor}{', both factors low-rank' if config.lokr_decompose_both else ''})"


def _diffusers_use(adapter: str) -> str:
    if adapter == "lora":
        return f"""**diffusers**

```python
from diffusers import ChronoEditPipeline
pipe = ChronoEditPipeline.from_pretrained("{BASE_MODEL}")
pipe.load_lora_weights("{FINAL_NAME}")
```
"""
    if adapter == "dora":
        return f"""**diffusers** reads a DoRA in its PEFT layout: `chronoedit-lora lora convert {FINAL_NAME} dora-diffusers.safetensors
--to diffusers`, then `pipe.load_lora_weights("dora-diffusers.safetensors")`.
"""
    return f"**diffusers** cannot load a {ADAPTER_NAMES[adapter]} (its `load_lora_weights` builds LoRA/DoRA layers only).\n"


def _comfy_keys(adapter: str) -> str:
    return {"lora": "", "dora": "; DoRA magnitudes are `….dora_scale`", "loha": "; LoHa factors are `….hada_w1_a` etc.",
            "lokr": "; LoKr factors are `….lokr_w1`, `….lokr_w2` etc."}[adapter]


def evaluation_section(metrics_csv: Path, card_folder: Path) -> str:
    """The card's "Evaluation" section: the table of an evaluation's ``metrics.csv`` and its plot."""
    from ...eval.report import markdown_table, read_metrics_csv

    checkpoints, table = read_metrics_csv(metrics_csv)
    plot = metrics_csv.parent / "metrics.png"
    link = f"\n![metrics]({plot.relative_to(card_folder)})\n" if plot.is_file() and plot.is_relative_to(card_folder) else ""
    return (f"{EVAL_START}\n## Evaluation\n\nOn held-out pairs with `chronoedit-lora eval` (best value per column in "
            f"bold; loss and lpips: lower is better, the others higher; source_ssim is how much of the input survives):"
            f"\n\n{markdown_table(checkpoints, table)}\n{link}{EVAL_END}\n")


def with_evaluation(card: str, section: str) -> str:
    """``card`` with its evaluation section replaced by ``section`` (put before "## Use" if it had none)."""
    if EVAL_START in card and EVAL_END in card:
        before, rest = card.split(EVAL_START, 1)
        return before + section + rest.split(EVAL_END, 1)[1].lstrip("\n")
    head, use, tail = card.partition("## Use")
    return head + section + "\n" + use + tail if use else card + "\n" + section


def add_evaluation(output: Path, metrics_csv: Path) -> bool:
    """Put the evaluation table into the kit's model card in ``output`` (False if there is none)."""
    path = output / CARD_NAME
    if not path.is_file() or CARD_MARK not in path.read_text(errors="replace"):
        return False
    write_text(path, with_evaluation(path.read_text(), evaluation_section(metrics_csv, output)))
    return True


def write_model_card(output: Path, config: TrainConfig, steps: int, pairs: int, example_prompt: str) -> Path:
    """Write ``output/README.md`` for the LoRA in ``output``; links the newest sample grid, if any,
    and keeps an evaluation's table (``output/eval/metrics.csv``)."""
    grids = sorted((output / "samples").glob("step-*.png"))
    sample = str(grids[-1].relative_to(output)) if grids else None
    path = output / CARD_NAME
    card = render_model_card(config, steps, pairs, example_prompt, sample)
    if (output / EVAL_METRICS).is_file():
        card = with_evaluation(card, evaluation_section(output / EVAL_METRICS, output))
    write_text(path, card)
    return path
