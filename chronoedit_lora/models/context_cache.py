"""Exact reuse of the cross-attention K and V of an edit's context (on by default; ``--no-context-cache``).

The text (512 umT5 tokens) and CLIP-image (257 tokens) context of an edit is the same at every
denoising step, yet DiffSynth's ``CrossAttention`` projects it again at every step and for every
guidance branch: ``norm_k(k(text))``, ``v(text)``, ``norm_k_img(k_img(clip))``, ``v_img(clip)``. At
mid size and 128x128 that is 39% of the DiT's FLOPs; at 14B about 3.7% at 480x832, 1.5% at
720x1280 (docs/performance.md). :class:`ContextCache` keeps those four tensors per block and per
branch for one edit, so they are computed once; the values are the same bits, since the same
layers see the same input.

The one DiffSynth change: each block's ``cross_attn`` becomes a :class:`CachedCrossAttention`
(DiffSynth's class with ``forward`` split into "project the context" and "attend", set on first
use like :mod:`.rope`'s self-attention). DiffSynth's ``forward`` projects and attends in one
function, so there is no smaller place to hold the projections. Outside :func:`context_cache`,
under autograd, or in training mode it runs DiffSynth's own ``forward``.

The projections are taken through the layers as they are, so LoRAs fused into ``k``/``v``/
``k_img``/``v_img`` or applied through the unfused hooks (:class:`~chronoedit_lora.lora.UnfusedLora`)
are in them; the cache lives for one edit, so a LoRA or scale changed between edits (the web app
keeps LoRAs as hooks) is always seen. Memory: per block and branch (512 + 257) x dim x 2 tensors;
at 14B (dim 5120, 40 blocks, bf16) 15.0 MiB per block and branch, 0.59 GiB per branch, 1.17 GiB
with guidance's two branches (:func:`cache_bytes`).

The step before the projections is reused too: DiffSynth's model function embeds the umT5 context
(``text_embedding``) and the CLIP features (``img_emb``) at every call, and inside the cache each
branch's embedded context is computed once (their ``forward`` is wrapped for the edit and restored
after). Once the K/V are cached the embedded context is read only for its shape, so this work
was pure repetition: at mid size 3% of a cached step's FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from diffsynth.models.wan_video_dit import CrossAttention, WanModel, flash_attention

IMAGE_TOKENS = 257  # DiffSynth's CrossAttention reads the first 257 context tokens as the CLIP image
TEXT_TOKENS = 512
EMBEDDINGS = ("text_embedding", "img_emb")  # the DiT's context embeddings (umT5 text, CLIP image)


class ContextCache:
    """Each block's context K/V per guidance branch, for one edit. :meth:`branch` names the branch of
    the DiT calls inside it (``pair``: both in one batch-2 call; ``cond``/``uncond``: separate calls);
    calls outside any branch compute as DiffSynth does."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, int], tuple[torch.Tensor, ...]] = {}
        self.embeddings: dict[tuple[str, str], tuple[torch.Size, torch.Tensor]] = {}
        self.active: str | None = None
        self.computed = 0  # projections computed (blocks x branches), for tests and benches

    @contextmanager
    def branch(self, name: str) -> Iterator[None]:
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous

    def get(self, attention: CachedCrossAttention, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block's (k, v[, k_img, v_img]) of context ``y`` in the active branch, computed on first use."""
        key = (self.active, attention.block_index)
        entry = self.entries.get(key)
        if entry is None or entry[0].shape[:2] != (y.shape[0], y.shape[1] - attention.image_tokens):
            entry = self.entries[key] = attention.project(y)
            self.computed += 1
        return entry

    def embedded(self, name: str, x: torch.Tensor, embed: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``embed(x)`` (the context embedding ``name``) in the active branch, computed on first use."""
        key = (self.active, name)
        entry = self.embeddings.get(key)
        if entry is None or entry[0] != x.shape:
            entry = self.embeddings[key] = (x.shape, embed(x))
        return entry[1]


class CachedCrossAttention(CrossAttention):
    """DiffSynth's ``CrossAttention`` whose context projections can come from a :class:`ContextCache`."""

    cache: ContextCache | None = None
    block_index: int = 0

    @property
    def image_tokens(self) -> int:
        return IMAGE_TOKENS if self.has_image_input else 0

    def project(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """k, v of the text context, then (with image input) k_img, v_img of the CLIP tokens."""
        image, text = y[:, :self.image_tokens], y[:, self.image_tokens:]
        kv = (self.norm_k(self.k(text)), self.v(text))
        return kv + (self.norm_k_img(self.k_img(image)), self.v_img(image)) if self.has_image_input else kv

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if cache is None or cache.active is None or self.training or torch.is_grad_enabled():
            return super().forward(x, y)
        kv = cache.get(self, y)
        q = self.norm_q(self.q(x))
        out = self.attn(q, kv[0], kv[1])
        if self.has_image_input:
            out = out + flash_attention(q, kv[2], kv[3], num_heads=self.num_heads)
        return self.o(out)


@contextmanager
def context_cache(dit: WanModel, enabled: bool = True) -> Iterator[ContextCache | None]:
    """Inside the ``with`` block (one edit), ``dit``'s cross-attention reuses the context K/V of each
    branch named through the yielded cache (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    cache = ContextCache()
    attentions = [block.cross_attn for block in dit.blocks]
    for index, attention in enumerate(attentions):
        if type(attention) is CrossAttention:
            attention.__class__ = CachedCrossAttention
        attention.cache, attention.block_index = cache, index
    embeddings = [getattr(dit, name) for name in EMBEDDINGS if hasattr(dit, name)]
    for name, module in zip(EMBEDDINGS, embeddings):
        module.forward = _reused(module, cache, name)
    try:
        yield cache
    finally:
        for attention in attentions:
            attention.cache = None
        for module in embeddings:
            del module.forward  # back to the class's own


def _reused(module: torch.nn.Module, cache: ContextCache, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward, taking its output from ``cache`` in a branch (not under autograd or in training)."""
    compute = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if cache.active is None or module.training or torch.is_grad_enabled():
            return compute(x)
        return cache.embedded(name, x, compute)

    return forward


def cache_bytes(dim: int, blocks: int, branches: int, dtype: torch.dtype = torch.bfloat16,
                image_input: bool = True) -> int:
    """Bytes the context cache holds: K and V of the text (and CLIP) tokens, per block and branch."""
    tokens = TEXT_TOKENS + (IMAGE_TOKENS if image_input else 0)
    return 2 * tokens * dim * dtype.itemsize * blocks * branches


def guidance_branches(cfg: float, enabled: bool = True) -> int:
    """Guidance branches whose context the cache holds in an edit: two with guidance (``cfg`` > 1, batched
    as one batch-2 ``pair`` or as ``cond`` and ``uncond``), one without, none when the cache is off."""
    return 0 if not enabled else 2 if cfg > 1.0 else 1


def dit_cache_bytes(dit: WanModel, branches: int, dtype: torch.dtype) -> int:
    """:func:`cache_bytes` of ``dit``'s shapes, with its activations in ``dtype``."""
    return cache_bytes(dit.dim, len(dit.blocks), branches, dtype, dit.has_image_input)
