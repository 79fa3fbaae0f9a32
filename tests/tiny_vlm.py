"""Tiny random Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE models with processors assembled offline, to run
the captioner's real code path (including transformers' device-map loading)."""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
WORDS = "The user wants to make it a sketch keep the colour image before after edit change no".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
KINDS = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


def _text_config(kind: str, vocab: dict[str, int]) -> dict:
    config = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=0, eos_token_id=vocab["<|im_end|>"], pad_token_id=0)
    if kind == "qwen2_5_vl":
        return config | {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    config |= {"head_dim": 16, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                   "mrope_section": [2, 3, 3], "mrope_interleaved": True}}
    if kind == "qwen3_vl_moe":
        config |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}
    return config


def _answer_tokens(answer: str) -> list[str]:
    """``answer``'s tokens: transformers loads Qwen's byte-level decoder, in which "Ġ" is a space."""
    first, *rest = answer.split()
    return [first] + ["\u0120" + word for word in rest]


def _answer_always(model, vocab: dict[str, int], answer: str) -> None:
    """Rewire a Qwen2.5-VL's language model into a lookup table that answers ``answer`` to any prompt: each
    token's embedding is a one-hot vector that passes the layers unchanged (their output projections are
    zeroed) and the head maps it to the token that follows it in ``answer`` (any other token to its first
    word; its last word to <|im_end|>)."""
    text = model.model.language_model
    with torch.no_grad():
        for name, parameter in text.layers.named_parameters():
            if "o_proj" in name or ".mlp." in name:
                parameter.zero_()
        text.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for token in vocab.values():
            text.embed_tokens.weight[token, token] = 1.0
        chain = [vocab[token] for token in _answer_tokens(answer)] + [vocab["<|im_end|>"]]
        for token in set(vocab.values()) - set(chain[:-1]):  # whatever ends the prompt: the first word
            model.lm_head.weight[chain[0], token] = 1.0
        for previous, following in zip(chain, chain[1:]):
            model.lm_head.weight[following, previous] = 1.0


def write_tiny_qwen_vl(folder: Path, kind: str = "qwen2_5_vl", answer: str | None = None) -> dict[str, int]:
    """Save a ``kind`` model (one of :data:`KINDS`) + its processor to ``folder``; returns the vocabulary.
    ``answer`` (Qwen2.5-VL only): the model answers exactly that, whatever it is shown."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for word in WORDS + (_answer_tokens(answer) if answer else []):
        vocab.setdefault(word, len(vocab))
    vocab["[UNK]"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # answers decode as words joined by spaces
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIAL[1:])
    patch = 14 if kind == "qwen2_5_vl" else 16
    sizes = dict(patch_size=patch, merge_size=2, temporal_patch_size=2)
    unit = patch * 2
    image_processor = Qwen2VLImageProcessor(min_pixels=unit * unit * 4, max_pixels=unit * unit * 16, **sizes)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=patch,
                  spatial_merge_size=2, temporal_patch_size=2)
    if kind == "qwen2_5_vl":
        vision |= dict(window_size=56, fullatt_block_indexes=[1])
        processor = transformers.Qwen2_5_VLProcessor(image_processor=image_processor,
                                                      video_processor=Qwen2VLVideoProcessor(**sizes),
                                                      tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        vision |= dict(num_position_embeddings=64, deepstack_visual_indexes=[0])
        processor = transformers.Qwen3VLProcessor(image_processor=image_processor,
                                                  video_processor=transformers.Qwen3VLVideoProcessor(**sizes),
                                                  tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        moe = kind == "qwen3_vl_moe"
        config_class = transformers.Qwen3VLMoeConfig if moe else transformers.Qwen3VLConfig
        model_class = (transformers.Qwen3VLMoeForConditionalGeneration if moe
                       else transformers.Qwen3VLForConditionalGeneration)
    config = config_class(
        text_config=_text_config(kind, vocab), vision_config=vision,
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"])
    torch.manual_seed(0)
    model = model_class(config)
    if answer is not None:
        _answer_always(model, vocab, answer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return vocab
