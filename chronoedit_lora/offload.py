"""Where each component's weights live during an edit: all on the GPU, each only for its stage
(``model``), or the DiT's blocks streamed through the GPU one at a time (``blocks``).

Why not DiffSynth's VRAM management (``diffsynth.core.vram``): its layers run every offloaded
module on a per-call ``deepcopy`` cast to the GPU, with no copy/compute overlap, and it wraps our
modules in its own classes (the fp8 layers and unfused-LoRA hooks of the kit would have to be
re-expressed as its wrappers). What an edit needs is simpler: whole components moved between a
pinned CPU home and the GPU at stage boundaries, and for ``blocks`` each block's weights copied in
just before it runs (the next block's copy issued on a side CUDA stream so it overlaps the current
block's compute) and dropped right after. Weights always keep one home copy in CPU RAM.

Training streams the blocks too (``block_swap = true``): :class:`BlockStreamer` also follows the
backward pass under gradient checkpointing, where each block's forward is recomputed just before
its backward. There the blocks arrive in reverse order: block i is copied in for its recomputation
and stays through its backward, block i - 1 is prefetched meanwhile, and block i + 1 (whose
backward is done) is dropped; the last one goes home when the backward ends. Only frozen tensors
move: trained ones (the adapter, registered after the placement was made) stay on the compute
device with their gradients and optimizer states.

Every move goes through :meth:`Placement.move`, so a test can record which components are on the
compute device at each stage. On a CPU machine both sides are the CPU, and the compute side still
gets its own copy, so the bytes it would hold on a GPU are allocated, and can be measured, there.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

MODES = ("none", "model", "blocks", "auto")
STAGES = ("text_encoder", "image_encoder", "vae", "dit")
GIB = 2**30
# Working memory beside the weights, measured by bench/memory_edit_14b.py for ChronoEdit-14B in
# bf16 (720x1280 and 1024x1024 agree): the DiT's denoising step per 1000 tokens (guidance as one
# batch-2 call; 0.16 GiB with bf16 blocks, 0.18 with fp8 ones, whose dequantized weight adds), and
# the untiled VAE decode of the 5-frame clip per output pixel. They steer only --offload auto.
DIT_WORKING_PER_KTOKEN = 0.19 * GIB
VAE_WORKING_PER_PIXEL = 8.4 * 2**10
AUTO_MARGIN = 1.5 * GIB  # CUDA context, allocator slack


def weight_bytes(module: torch.nn.Module | None) -> int:
    """Bytes of a module's parameters and buffers."""
    if module is None:
        return 0
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def needs(components: dict[str, torch.nn.Module | None], tokens: int, pixels: int,
          context_bytes: int = 0) -> dict[str, float]:
    """Peak bytes of an edit per offload mode: the largest stage of (what is resident + its working
    memory), plus a margin. ``context_bytes``: the context K/V cache, on the compute device for the whole
    denoising loop in every mode (:func:`~chronoedit_lora.models.context_cache.dit_cache_bytes`)."""
    sizes = {name: weight_bytes(module) for name, module in components.items()}
    dit = components["dit"]
    block = max((weight_bytes(b) for b in dit.blocks), default=0)
    dit_working = DIT_WORKING_PER_KTOKEN * tokens / 1000 + context_bytes
    vae_working = VAE_WORKING_PER_PIXEL * pixels
    encoders = max(sizes["text_encoder"], sizes["image_encoder"])
    streamed = sizes["dit"] - weight_bytes(dit.blocks) + 2 * block
    return {"none": sum(sizes.values()) + max(dit_working, vae_working) + AUTO_MARGIN,
            "model": max(encoders, sizes["dit"] + dit_working, sizes["vae"] + vae_working) + AUTO_MARGIN,
            "blocks": max(encoders, streamed + dit_working, sizes["vae"] + vae_working) + AUTO_MARGIN}


def choose_mode(components: dict[str, torch.nn.Module | None], device: torch.device, tokens: int, pixels: int,
                free_bytes: int | None = None, context_bytes: int = 0) -> tuple[str, str]:
    """``--offload auto``: the least offloading that fits the free GPU memory; returns (mode, why)."""
    if device.type != "cuda":
        return "none", f"{device.type}: no GPU memory to save"
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    need = needs(components, tokens, pixels, context_bytes)
    for mode in ("none", "model", "blocks"):
        if need[mode] <= free:
            return mode, (f"{free / GIB:.1f} GiB free on {device}; {mode} needs about {need[mode] / GIB:.1f} GiB"
                          + ("" if mode == "none" else f" (all resident: {need['none'] / GIB:.1f} GiB)"))
    return "blocks", (f"{free / GIB:.1f} GiB free on {device}, less than block offload's {need['blocks'] / GIB:.1f} GiB; "
                      "trying block offload anyway (lower the size, or use --fp8-base or --vae-tiling on)")


class Placement:
    """Moves components between their CPU home and the compute device, stage by stage."""

    def __init__(self, components: dict[str, torch.nn.Module | None], device: torch.device, mode: str):
        self.components = {name: module for name, module in components.items() if module is not None}
        self.device, self.mode = device, mode
        self.home = torch.device("cpu") if mode != "none" else device
        self.resident: set[str] = set(self.components) if mode == "none" else set()
        # The home copy of every tensor: weights do not change during an edit, so moving home is free.
        self._home = {id(t): _pinned(t.data, device) if mode != "none" else t.data
                      for module in self.components.values() for t in _tensors(module)}
        for name in self.components if mode != "none" else ():
            self.move(name, False)
        self.streamer = BlockStreamer(self, self.components["dit"]) if mode == "blocks" else None
        self.current: str | None = None

    def move(self, name: str, onto_device: bool, module: torch.nn.Module | None = None) -> None:
        """Put ``name`` (or a part of it, ``module``) on the compute device, or back home: the one place
        weights move. Home is free: weights do not change during an edit, so their home copy is kept."""
        for tensor in _tensors(module or self.components[name]):
            home = self._home.get(id(tensor))
            if home is not None:  # None: a trained tensor added later, which lives on the compute device
                tensor.data = home.to(self.device, non_blocking=True, copy=True) if onto_device else home
        if module is None:
            (self.resident.add if onto_device else self.resident.discard)(name)

    def use(self, name: str) -> None:
        """Make ``name`` the component on the compute device (``model``: only it; ``blocks``: the DiT's
        non-block weights, its blocks streamed by :class:`BlockStreamer`). It stays there until
        another stage needs the device, so the steps of a denoising loop move nothing."""
        if self.mode == "none" or name not in self.components or name == self.current:
            return
        self.release()
        if name == "dit" and self.streamer is not None:
            self.streamer.start()
        else:
            self.move(name, True)
        self.current = name

    def release(self) -> None:
        """Every component back to its CPU home (between stages, and after an edit, so the GPU is
        left as it was found)."""
        if self.mode == "none":
            return
        if self.current == "dit" and self.streamer is not None:
            self.streamer.stop()
        for name in sorted(self.resident):
            self.move(name, False)
        self.current = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


class BlockStreamer:
    """The DiT on the compute device except its blocks, which are copied in one at a time: in block
    order for a forward pass, in reverse order for a backward pass (gradient checkpointing
    recomputes each block's forward just before its backward)."""

    def __init__(self, placement: Placement, dit: torch.nn.Module):
        self.placement, self.dit = placement, dit
        self.blocks = list(dit.blocks)
        self.on_device: list[int] = []  # blocks whose weights are on the compute device, in order
        self.copy_stream = torch.cuda.Stream(placement.device) if placement.device.type == "cuda" else None
        self.log: list[tuple[int, ...]] = []  # resident blocks at each block's compute (for tests)
        self._handles = []
        self._end_queued = False

    def start(self) -> None:
        """The DiT's non-block weights onto the compute device; blocks copied in as they run."""
        for name, child in self.dit.named_children():
            if name != "blocks":
                self.placement.move("dit", True, child)
        self.placement.resident.add("dit")
        for i, block in enumerate(self.blocks):
            self._handles.append(block.register_forward_pre_hook(lambda module, args, i=i: self._before(i)))
            self._handles.append(block.register_forward_hook(lambda module, args, out, i=i: self._after(i)))

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._drop_all()

    def _load(self, i: int) -> None:
        if i not in self.on_device and 0 <= i < len(self.blocks):
            stream = self.copy_stream
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                self.placement.move("dit", True, self.blocks[i])
            self.on_device.append(i)

    def _before(self, i: int) -> None:
        backward = _in_backward()
        if backward:  # recomputing block i: the blocks after it are through their backward
            self._queue_end_of_backward()
            for j in [j for j in self.on_device if j > i]:
                self._drop(j)
        self._load(i)
        if self.copy_stream is not None:  # block i's copy must be done before it computes ...
            compute = torch.cuda.current_stream(self.placement.device)
            compute.wait_stream(self.copy_stream)
            for tensor in _tensors(self.blocks[i]):  # ... and its memory not reused until that is done
                tensor.data.record_stream(compute)
        self._load(i - 1 if backward else i + 1)  # the next block's copy overlaps this block's compute
        self.log.append(tuple(self.on_device))

    def _after(self, i: int) -> None:
        if not _in_backward():  # after a recomputation, the block's backward still needs it
            self._drop(i)

    def _queue_end_of_backward(self) -> None:
        """Send the last blocks home once the whole backward pass is done."""
        if not self._end_queued:
            self._end_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self._drop_all()

    def _drop_all(self) -> None:
        for i in list(self.on_device):
            self._drop(i)

    def _drop(self, i: int) -> None:
        self.placement.move("dit", False, self.blocks[i])
        self.on_device.remove(i)


def _in_backward() -> bool:
    """True while autograd runs a backward pass on this thread (a checkpointed block recomputing)."""
    return torch._C._current_graph_task_id() != -1


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def _pinned(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The CPU home of a tensor, page-locked when it is copied to a GPU (fast, asynchronous copies)."""
    tensor = tensor.to("cpu")
    return tensor.pin_memory() if device.type == "cuda" else tensor
