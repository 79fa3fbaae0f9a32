"""Tiny random metric-model folders in the layouts ``chronoedit-lora eval`` reads: a CLIPModel and a
Dinov2Model (transformers' save_pretrained, with their processors and a word-level tokenizer), and
an LPIPS folder (a random AlexNet in torchvision's state-dict layout beside the lpips package's
own linear weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

WORDS = "the user wants to make it a pencil sketch drawing house sun transform image into".split()
CLIP_SIZE, DINO_SIZE = 32, 28


def write_tiny_clip(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                            model_max_length=77).save_pretrained(str(folder))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=CLIP_SIZE, patch_size=8), projection_dim=16)
    torch.manual_seed(1)
    CLIPModel(config).save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": CLIP_SIZE},
                       crop_size={"height": CLIP_SIZE, "width": CLIP_SIZE}).save_pretrained(str(folder))
    return folder


def write_tiny_dino(folder: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(2)
    Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=DINO_SIZE, patch_size=7)).save_pretrained(str(folder))
    BitImageProcessor(size={"shortest_edge": DINO_SIZE}, crop_size={"height": DINO_SIZE, "width": DINO_SIZE},
                      do_convert_rgb=True).save_pretrained(str(folder))
    return folder


def write_tiny_lpips(folder: Path):
    """A random-backbone LPIPS folder; returns the ``lpips`` package's model holding the same weights."""
    import lpips

    torch.manual_seed(3)
    reference = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    folder.mkdir(parents=True, exist_ok=True)
    # the package's slices keep AlexNet.features' module indices as names: slice2.3.weight is features.3.weight
    backbone = {f"features.{name.split('.', 1)[1]}": tensor for name, tensor in reference.net.state_dict().items()}
    torch.save(backbone, folder / "alexnet-owt-random.pth")
    shutil.copy(Path(lpips.__file__).parent / "weights" / "v0.1" / "alex.pth", folder / "alex.pth")
    return reference
