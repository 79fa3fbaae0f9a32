"""The context K/V cache: every edit equals the uncached one, and a LoRA change between edits is seen."""

from __future__ import annotations

import pytest
import torch

from chronoedit_lora.models.context_cache import cache_bytes, context_cache
from chronoedit_lora.pipeline import ChronoEditPipeline, EditRequest

# Same layers on the same inputs: the cached projections are the same bits, so the edits agree to
# float32 rounding of nothing at all; 1e-6 is the bound (measured difference: 0).
ATOL = 1e-6
EDIT = dict(steps=3, height=32, width=32, progress=False, scheduler="euler")


@pytest.fixture(scope="module")
def pipe(tiny_diffusers):
    return ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)


def count_context_projections(pipe: ChronoEditPipeline) -> tuple[list[int], list]:
    """Calls of every block's cross_attn.k (the text K projection), then of the text and the CLIP
    context embeddings' first layers, counted by forward hooks."""
    calls = [0, 0, 0]

    def counter(index: int):
        return lambda *_: calls.__setitem__(index, calls[index] + 1)

    layers = [(block.cross_attn.k, 0) for block in pipe.dit.blocks]
    layers += [(pipe.dit.text_embedding[0], 1), (pipe.dit.img_emb.proj[1], 2)]
    return calls, [layer.register_forward_hook(counter(index)) for layer, index in layers]


def edits(pipe: ChronoEditPipeline, requests: list[EditRequest], **settings) -> list[torch.Tensor]:
    return [result.video for result in pipe.edit_many(requests, **EDIT, **settings)]


@pytest.mark.parametrize("settings, branches", [
    (dict(cfg=1.0), 1),
    (dict(cfg=4.0, batched_guidance=True), 1),  # one "pair" branch of batch 2
    (dict(cfg=4.0, batched_guidance=False), 2),
    (dict(cfg=4.0, temporal_reasoning_steps=2), 1),  # the token count changes at step 2, the context does not
], ids=["no-guidance", "batched", "separate", "temporal-reasoning"])
def test_cached_edit_equals_uncached_and_projects_once(pipe, input_image, settings, branches):
    request = [EditRequest(input_image, "add a hat", "blurry", seed=1)]
    calls, handles = count_context_projections(pipe)
    try:
        uncached = edits(pipe, request, context_cache=False, **settings)[0]
        per_edit_uncached, calls[:] = list(calls), [0, 0, 0]
        cached = edits(pipe, request, **settings)[0]
    finally:
        for handle in handles:
            handle.remove()
    blocks = len(pipe.dit.blocks)
    assert per_edit_uncached == [blocks * branches * EDIT["steps"]] + [branches * EDIT["steps"]] * 2
    assert calls == [blocks * branches, branches, branches]  # once per block (embedding) and branch
    assert (cached - uncached).abs().max().item() <= ATOL
    assert not any("forward" in vars(module) for module in (pipe.dit.text_embedding, pipe.dit.img_emb))  # restored


def test_batch_and_unfused_lora_edits_equal_uncached(pipe, input_image, random_lora):
    from chronoedit_lora.lora import UnfusedLora

    requests = [EditRequest(input_image, "add a hat", seed=1), EditRequest(input_image.rotate(90), "make it red", seed=2)]
    with UnfusedLora(pipe.dit, random_lora, scale=0.5):
        uncached = edits(pipe, requests, cfg=3.0, context_cache=False)
        cached = edits(pipe, requests, cfg=3.0)
    plain = edits(pipe, requests[:1], cfg=3.0)[0]
    assert (plain - cached[0]).abs().max().item() > 1e-3  # the LoRA's k/v change is in the cached projections
    for a, b in zip(cached, uncached):
        assert (a - b).abs().max().item() <= ATOL


def test_fused_lora_edit_equals_uncached(tiny_diffusers, input_image, random_lora, tmp_path):
    from chronoedit_lora.lora import save_lora

    path = save_lora(random_lora, tmp_path / "lora.safetensors")
    fused = ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32)
    fused.load_lora(path, 0.7)
    request = [EditRequest(input_image, "add a hat", seed=1)]
    assert (edits(fused, request, cfg=3.0)[0] - edits(fused, request, cfg=3.0, context_cache=False)[0]).abs().max() <= ATOL


def test_lora_scale_changed_in_the_web_app_session_is_recomputed(tiny_diffusers, random_lora, input_image, tmp_path):
    """Two edits in one process through the app's session, the LoRA's scale changed between them:
    the second equals an uncached edit at the new scale, not the first."""
    from chronoedit_lora.cli import build_parser
    from chronoedit_lora.lora import save_lora
    from chronoedit_lora.ui.session import Folders, Session

    save_lora(random_lora, tmp_path / "loras" / "a.safetensors")
    args = build_parser().parse_args(["ui", "--model", str(tiny_diffusers), "--device", "cpu", "--dtype", "float32"])
    session = Session(ChronoEditPipeline.from_pretrained(tiny_diffusers, dtype=torch.float32), args,
                      Folders(None, (tmp_path / "loras").resolve(), None, tmp_path / "history"))
    lora = str(tmp_path / "loras" / "a.safetensors")

    def edit(scale: float, **values) -> torch.Tensor:
        settings = dict(prompt="add a hat", steps=3, height=32, width=32, cfg=3.0, lora=[f"{lora}:{scale}"])
        with session.job("page") as cancelled:  # one page's edit, as the app runs it
            return session.edit(input_image, session.edit_args(**settings, **values), cancelled).video

    first = edit(1.0)
    second = edit(0.25)
    uncached = edit(0.25, context_cache=False)
    assert (second - first).abs().max().item() > 1e-3
    assert (second - uncached).abs().max().item() <= ATOL
    assert "--no-context-cache" in session.command(session.edit_args(context_cache=False))


def test_the_web_app_step_cache_control_reaches_the_edit_and_its_command():
    """The step-cache dropdown (beside steps and cfg, shared by Edit and Compare) becomes --step-cache."""
    from chronoedit_lora.ui.edit import NO_STEP_CACHE, STEP_CACHES, SIDECAR_SETTINGS, form_settings

    assert "mag:fast" in STEP_CACHES and "step_cache" in SIDECAR_SETTINGS
    form = ("none", 8, 5, "first-block:fast", "", "model default", 0, 0, 0)
    assert form_settings(*form)["step_cache"] == "first-block:fast"
    assert form_settings(*form[:3], NO_STEP_CACHE, *form[4:])["step_cache"] is None


def test_never_active_under_autograd(pipe):
    """Training's forward (gradients on) computes the projections as DiffSynth does, cache or not."""
    attention = pipe.dit.blocks[0].cross_attn
    x = torch.randn(1, 8, attention.dim)
    y = torch.randn(1, 257 + 16, attention.dim)
    with context_cache(pipe.dit) as cache, cache.branch("cond"):
        with torch.no_grad():
            cached = attention(x, y)
        trained = attention(x, y)
    assert cache.computed == 1 and trained.requires_grad
    torch.testing.assert_close(trained.detach(), cached, rtol=0, atol=ATOL)
    text = torch.randn(1, 16, pipe.dit.text_embedding[0].in_features)
    with context_cache(pipe.dit) as cache, cache.branch("cond"):
        with torch.no_grad():
            embedded = pipe.dit.text_embedding(text)
            assert pipe.dit.text_embedding(text) is embedded  # the edit's context, embedded once
        trained = pipe.dit.text_embedding(text)
    assert trained.requires_grad and trained is not embedded


def test_memory_at_14b():
    """The figure docs/performance.md states: 14B (dim 5120, 40 blocks), bf16, two branches."""
    assert cache_bytes(5120, 1, 1) / 2**20 == pytest.approx(15.02, abs=0.01)
    assert cache_bytes(5120, 40, 2) / 2**30 == pytest.approx(1.17, abs=0.01)



@pytest.mark.parametrize("ranks", [2, 3])
@torch.no_grad()
def test_sequence_parallel_shares_reuse_the_context_exactly(pipe, ranks):
    """--sequence-parallel keeps the context cache on (DiffSynth's USP replaces only the self-attention):
    each rank's blocks see its padded share of the tokens and the whole context, split as
    model_fn_wan_video splits them. Each rank's cache (one per rank, as each is its own process) over two
    steps: the shares' cached cross-attention, gathered and unpadded as DiffSynth does, equals DiffSynth's
    uncached one over the whole sequence, and each rank projects the context once."""
    from diffsynth.models.wan_video_dit import CrossAttention

    attention = pipe.dit.blocks[-1].cross_attn
    generator = torch.Generator().manual_seed(0)
    y = torch.randn(1, 257 + 16, attention.dim, generator=generator)
    xs = [torch.randn(1, 25, attention.dim, generator=generator) for _ in range(2)]  # 25 tokens: the last share is padded
    shares: list[list[torch.Tensor]] = [[] for _ in xs]
    for rank in range(ranks):
        with context_cache(pipe.dit) as cache, cache.branch("pair"):
            for step, x in enumerate(xs):
                chunks = torch.chunk(x, ranks, dim=1)
                share = torch.nn.functional.pad(chunks[rank], (0, 0, 0, chunks[0].shape[1] - chunks[rank].shape[1]))
                shares[step].append(attention(share, y))
        assert cache.computed == 1
    for x, step_shares in zip(xs, shares):
        gathered = torch.cat(step_shares, dim=1)[:, :x.shape[1]]
        assert (gathered - CrossAttention.forward(attention, x, y)).abs().max().item() <= ATOL
