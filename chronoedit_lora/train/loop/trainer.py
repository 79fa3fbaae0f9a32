"""The training loop, readable top to bottom: preflight -> models -> LoRA (or the DiT's own weights,
``finetune = "full"``) -> optimizer -> resume -> (encode, loss, backward, step, EMA, log, checkpoint)
-> final LoRA (a full fine-tune's weights stay in its last checkpoint, for ``chronoedit-lora export``).

Multi-GPU / multi-node / FSDP / DeepSpeed come from ``accelerate launch`` and its config; the loop
only talks to ``Accelerator``. Each process trains on its own shard of every epoch's batches; DDP
averages gradients so all processes hold the same LoRA after every optimizer step. What FSDP needs
beyond that (sharding on CPU, gathering the LoRA and optimizer state) is in :mod:`.fsdp`; under DDP
each of its functions is the plain operation.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, broadcast_object_list, set_seed
from safetensors import SafetensorError

from ...data.metadata import TRAJECTORY
from ...errors import ChronoEditError
from ...files import WriteError
from ...lora.weights import ADAPTER_NAMES, LoraWeights
from ...models.dit import compile_blocks
from ...models.loading import DTYPES
from ...models.quantized import is_quantized
from ...settings import MAX_TRAIN_SEED, check_targets
from ..state import checkpoint as ckpt
from .config import TrainConfig
from ..distributed import fsdp
from ..state import lora_export, trained_state
from .data import TrainingData, preflight
from ..state.ema import ExponentialMovingAverage
from ..objective.full_module import check_trainable, training_module
from .evaluation import TrainingEvaluation, evaluate_step, restore_best, snapshot_best
from .cache import ConditioningCache, components_fingerprint, fill
from .inputs import PairInputs, collate_inputs
from ..distributed.launch import check_launch
from ..state.logs import PRESERVATION, TrainingLog
from ..state.model_card import write_model_card
from ..state.trackers import end_trackers
from .optimizer import WHOLE_STEP, make_optimizer, make_schedule
from .prefetch import Prefetcher
from ..state.run_folder import RunFolder, choose_checkpoint
from ..distributed.sync import assert_ranks_in_sync


@dataclass
class TrainResult:
    lora: Path  # the LoRA file; for a full fine-tune, its last checkpoint (see `chronoedit-lora export`)
    steps: int
    final_loss: float
    loaded_encoders: bool  # False when every pair came from the conditioning cache
    interrupted_by: int | None = None  # the signal (SIGINT/SIGTERM) that stopped the run early, if any


class NonFiniteError(ChronoEditError):
    """The loss or a gradient became NaN/inf; nothing from that step was applied or saved."""


class _StopRequest:
    """SIGINT/SIGTERM: finish the current step, save, exit; the previous handlers come back on restore()."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, saving, then stopping "
              "(send again to stop at once).", flush=True)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig) -> TrainResult:
    check_launch(config)  # before the Accelerator: a DeepSpeed launch without DeepSpeed fails inside it
    # Without CUDA, cpu=True makes a torchrun-style launch (accelerate's --multi_gpu launcher or
    # torchrun itself) a gloo process group instead of N unrelated single processes.
    output = Path(config.output)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation,
                              mixed_precision=config.mixed_precision, cpu=not torch.cuda.is_available(),
                              log_with=config.log_with or None,
                              project_config=ProjectConfiguration(output, logging_dir=output / "logs" / "tensorboard"))
    run = RunFolder(output)
    failed = True
    try:
        result = _train(accelerator, config, output, run)
        failed = False
        return result
    except WriteError as exc:  # a log, sample or cache entry; checkpoint writes say more in _save
        good = ckpt.latest_checkpoint(output)
        raise ChronoEditError(exc.advice(f"rerun the same command with --resume (it continues from {good})" if good
                                         else "rerun the same command")) from None
    finally:
        if accelerator.is_main_process:
            run.release(failed)


def _train(accelerator: Accelerator, config: TrainConfig, output: Path, run: RunFolder) -> TrainResult:
    # 1. Check the data, the settings and the output folder before loading anything heavy.
    _on_main_then_everyone(accelerator, lambda: (preflight(config, output), run.claim(config)))
    data = TrainingData(config)
    paths = component_paths(config)
    _refuse_quantized_base(config, paths["dit"])
    if config.finetune == "full":
        check_trainable(config.trainable, [name for name, _ in _skeleton(paths["dit"]).named_parameters()])
    else:
        check_targets(config.targets, dit_linear_layers(paths["dit"]))
    base_loras, sample_loras = _checked_loras(config, paths["dit"])
    resume = choose_checkpoint(config, output, report=accelerator.is_main_process)

    # 2. Models: encoders frozen; the DiT gets LoRA layers (same init on every rank), or its
    # `trainable` weights train.
    from ...pipeline import ChronoEditPipeline
    from .samples import Preview

    dtype = DTYPES[config.dtype]
    cache = open_cache(config, output, dtype, paths) if config.cache else None
    # the encoders alone fill the cache, so they and the DiT are never in memory together
    filled = _fill_missing(accelerator, cache, data, paths, dtype) if cache else 0
    # sampling and evaluation pairs are encoded as they come (preservation pairs, uncached, too)
    encoders = config.sample_every > 0 or config.eval_every > 0 or (cache is None and data.preservation is not None)
    # config.model for its scheduler config: samples and eval_every edits sample as `edit --model` does
    pipe = ChronoEditPipeline.from_pretrained(
        config.model, device=accelerator.device, dit_device="cpu" if fsdp.requested() else None, dtype=dtype, rope=config.rope,
        encoders=cache is None or encoders, fp8_base=config.fp8_base, offload="blocks" if config.block_swap else "none",
        **paths)
    loaded_encoders = cache is None or filled > 0 or encoders
    for path, _, scale in base_loras:  # the base trained on (quantized weights cannot absorb them: hooks there)
        pipe.load_lora(path, scale, fuse=not is_quantized(pipe.dit))
    stacked = [(weights, scale) for _, weights, scale in sample_loras]
    sample_preview = Preview.of(config.sample_steps, config.sample_preset, stacked)
    pair_inputs = PairInputs(pipe, data.dataset, cache)
    preservation = PairInputs(pipe, data.preservation, cache) if data.preservation is not None else None
    set_seed(config.seed)
    module = training_module(pipe, config)
    if config.compile:  # after the LoRA layers are in place, so they are compiled with their blocks
        compile_blocks(pipe.dit)
    # Fused AdamW: one kernel over all LoRA tensors instead of a Python loop over them (about 5x
    # faster per step for a small LoRA on a CPU). Not under FSDP (its step on DTensor shards aborts
    # on the CPU) or DeepSpeed (which steps the optimizer itself); there fused=None keeps torch's
    # default (False would also turn off its foreach path on GPUs).
    fused = True if not fsdp.requested() and accelerator.distributed_type != DistributedType.DEEPSPEED else None
    optimizer = make_optimizer(module.trained_parameters(), config, fused)
    # Where to start (fresh, or a checkpoint's point) fixes the run's length, which the LR schedule
    # spans. The schedule is counted in optimizer steps and stepped here once per optimizer step:
    # handed to accelerator.prepare, it would advance num_processes times per step (accelerate
    # assumes a schedule counted in single-process batches), so a warm-up would end N times too early.
    saved = ckpt.load_progress(resume.folder) if resume is not None else ckpt.Progress(processes=accelerator.num_processes)
    progress = saved.continued_on(accelerator.num_processes)
    total_steps = config.max_steps or data.total_steps(progress, accelerator.num_processes, config.gradient_accumulation,
                                                       config.epochs)
    scheduler = make_schedule(optimizer, config, total_steps)
    if resume is not None and config.finetune == "lora":  # the full LoRA goes in before FSDP (if any) splits it
        lora_export.load_into(module, resume.folder / "lora.safetensors", config)
    # under block_swap the module spans both devices: accelerate must not move it whole onto the GPU
    module, optimizer = fsdp.prepare(accelerator, module, optimizer, place_model=not config.block_swap,
                                     whole_step=config.optimizer in WHOLE_STEP)
    trained_parameters = accelerator.unwrap_model(module).trained_parameters()
    ema = ExponentialMovingAverage.maybe(config, accelerator.unwrap_model(module).named_trained())
    if fsdp.sharded(module):  # every rank reports its own share, measured from its local shards
        held, whole = fsdp.local_parameter_bytes(module)
        print(f"FSDP rank {accelerator.process_index}: holds {held} of the base's {whole} parameter bytes", flush=True)
    # Each batch's noise and timestep come from its own seed (_noise_seed); the global RNG, per rank, is
    # left for anything else.
    set_seed(_rank_seed(config.seed + accelerator.process_index))

    # 3. Where to start: fresh, or exactly where a checkpoint left off. On another process count
    # the ranks split the rest of the epoch anew; its batches' noise does not depend on the count.
    if resume is not None:
        trained_state.load(resume, accelerator, config, module, optimizer, scheduler, ema)
        if progress is saved:
            ckpt.load_rank_state(resume.folder, accelerator.process_index)
        else:
            accelerator.print(f"continuing a {saved.processes}-process run on {accelerator.num_processes}: the "
                              f"{progress.epoch_start} batches of epoch {progress.epoch} trained so far are not repeated")
        if accelerator.is_main_process:
            restore_best(output, resume.folder)
        accelerator.print(f"resumed from {resume.folder} at step {progress.step}")

    batches_per_epoch = data.batches_per_rank(accelerator.num_processes)
    steps_per_epoch = max(batches_per_epoch // config.gradient_accumulation, 1)
    trajectories = data.dataset.kinds.count(TRAJECTORY)
    what = (f"{sum(p.numel() for p in trained_parameters) / 1e6:.1f}M DiT parameters (full fine-tune)"
            if config.finetune == "full" else f"a rank-{config.rank} {ADAPTER_NAMES[config.adapter]}")
    accelerator.print(
        f"training {what} on {len(data.dataset)} items"
        + (f" ({trajectories} of them trajectories)" if trajectories else "") + f" ({accelerator.num_processes} process(es) on "
        f"{accelerator.device}, batch {config.batch_size} x accumulation {config.gradient_accumulation}): "
        f"{steps_per_epoch} steps per epoch, {total_steps} steps, checkpoints every {config.save_every} in {output}")
    evaluation = (TrainingEvaluation(config, data.held_out, Preview.of(config.eval_steps, config.sample_preset, stacked))
                  if config.eval_every else None)
    log = TrainingLog(accelerator, output, total_steps, progress.step, config.tracker_project, config.to_json(),
                      extra_fields=(evaluation.fields() if evaluation else []) + ([PRESERVATION] if preservation else []))
    stop = _StopRequest()
    loss_value, grad_norm = float("nan"), None

    # 4. The loop. A window is the gradient_accumulation micro-batches of one optimizer step; the
    # next batch is read from disk while this one trains (prefetch), and the loss and the gradients'
    # norm are read back once per optimizer step (step_status), the only host sync of a step; the
    # norm is the finiteness check and the clipping's. DeepSpeed clips by its own config.
    window_loss, window_positions, window_started = 0.0, [], None  # a window may span an epoch's end
    window_preservation, preserved = 0.0, None
    clip = config.max_grad_norm > 0 and accelerator.distributed_type != DistributedType.DEEPSPEED
    prefetch = Prefetcher(lambda indices: [pair_inputs.read(i) for i in indices])
    try:
        while progress.step < total_steps and not stop.requested:
            batches = data.rank_batches(progress.epoch, accelerator.process_index, accelerator.num_processes,
                                        progress.epoch_start)
            for batch_indices, read in prefetch(batches[progress.batch_in_epoch:]):
                window_started = window_started or time.perf_counter()
                with accelerator.accumulate(module):
                    inputs = collate_inputs([pair_inputs.inputs(item) for item in read])
                    seed = _noise_seed(config.seed, progress.epoch, batch_indices)
                    # with a preservation dataset, one of its pairs (chosen by the batch's seed) joins the batch
                    kept = preservation.inputs(preservation.read(seed % len(data.preservation))) if preservation else None
                    loss = module(inputs, noise_seed=seed, preserve=kept)
                    accelerator.backward(loss)
                    window_loss = window_loss + loss.detach()
                    if preservation:
                        window_preservation = window_preservation + accelerator.unwrap_model(module).last_preservation
                    window_positions.append(progress.position())
                    if accelerator.sync_gradients:
                        loss_value, grad_norm = fsdp.step_status(
                            accelerator, window_loss / config.gradient_accumulation, trained_parameters)
                        if preservation:  # the term's mean over the window and the processes
                            preserved = accelerator.reduce(window_preservation / config.gradient_accumulation, "mean").item()
                        _refuse_non_finite(loss_value, grad_norm, progress.step + 1, output, cache)
                        if clip and grad_norm is not None:
                            fsdp.clip_gradients(trained_parameters, grad_norm, config.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients and not optimizer.step_was_skipped:
                        scheduler.step()
                        if ema is not None:
                            ema.update(progress.step + 1)
                    optimizer.zero_grad(set_to_none=True)
                progress.batch_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue
                progress.step += 1
                last = progress.step >= total_steps
                validation = None
                if config.sample_every and (progress.step % config.sample_every == 0 or last):
                    with ema.swapped_in() if config.sample_ema else contextlib.nullcontext():
                        validation = _sample(accelerator, pipe, data, config, sample_preview, output, progress.step, log)
                evaluated = None
                if evaluation and evaluation.due(progress.step, last):
                    evaluated = evaluate_step(accelerator, pipe, module, evaluation, progress, config, output)
                samples = data.items_trained(window_positions, accelerator.num_processes) if log.enabled else []
                log.step(progress.step, loss_value, scheduler.get_last_lr()[0], grad_norm, time.perf_counter() - window_started,
                         samples, validation, evaluated, preserved)
                window_loss, window_positions, window_started, window_preservation = 0.0, [], None, 0.0
                if config.check_sync_every and progress.step % config.check_sync_every == 0:
                    assert_ranks_in_sync(accelerator, trained_parameters)
                if last or stop.requested or progress.step % config.save_every == 0:
                    _save(accelerator, module, optimizer, scheduler, ema, progress, config, output)
                if last or stop.requested:
                    break
            else:
                progress.next_epoch()
    finally:
        prefetch.close()
        stop.restore()

    if config.finetune == "full":  # its weights are in the last checkpoint (saved at the last step)
        lora_path = ckpt.latest_checkpoint(output)
        log.finish(lora_path, ADAPTER_NAMES[config.adapter], full=True)
    else:
        lora_path = lora_export.final_path(output)
        lora = trained_state.gather(accelerator, config, module, None, ema, output)
        if accelerator.is_main_process:
            trained_state.write(lora, output, config, progress.step)
            write_model_card(output, config, progress.step, data.rows, data.dataset.pairs[0].prompt)
            log.finish(lora_path, ADAPTER_NAMES[config.adapter])
    accelerator.wait_for_everyone()
    interrupted = stop.signal if stop.requested and progress.step < total_steps else None
    if interrupted:
        accelerator.print(f"stopped at step {progress.step}/{total_steps} (checkpoint {ckpt.latest_checkpoint(output)}); "
                          "continue with the same command plus --resume")
    end_trackers(accelerator, output)  # their last flush, a failed write naming the tracker's folder
    return TrainResult(lora=lora_path, steps=progress.step, final_loss=loss_value, loaded_encoders=loaded_encoders,
                       interrupted_by=interrupted)


def _noise_seed(seed: int, epoch: int, batch: list[int]) -> int:
    """The seed of one batch's timestep and noise: a function of the run's seed, the epoch and the
    batch's items, whichever process trains it, so a run on N processes, one on fewer with gradient
    accumulation, and one resumed on another process count draw the same noise for the same pairs."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{','.join(map(str, batch))}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _rank_seed(value: int) -> int:
    """A process's seed, kept in the range accelerate's ``set_seed`` takes (numpy's 32 bits)."""
    return value % (MAX_TRAIN_SEED + 1)


def _refuse_non_finite(loss: float, grad_norm: float | None, step: int, output: Path,
                       cache: ConditioningCache | None) -> None:
    """Stop before a NaN/inf loss or gradient reaches the weights (the same on every rank: the loss
    and the gradient norm are reduced across them, see :func:`.fsdp.step_status`)."""
    if math.isfinite(loss) and (grad_norm is None or math.isfinite(grad_norm)):
        return
    what = f"loss is not finite ({loss:g})" if not math.isfinite(loss) else f"gradient is not finite (norm {grad_norm:g})"
    good = ckpt.latest_checkpoint(output)
    cached = (f" The inputs came from the conditioning cache {cache.folder}: if it was copied from elsewhere or "
              "written by another program, delete it to have it encoded again." if cache else "")
    then = (f"resume from the last good checkpoint with --resume {good} --allow_changes true, or start over with "
            "--overwrite" if good else "run again (no checkpoint was written yet, so nothing of this run is kept)")
    raise NonFiniteError(
        f"step {step}: the training {what}; stopped before applying it, and nothing was saved from this state. "
        f"Lower learning_rate, set max_grad_norm, or train in float32/bf16 (not float16), then {then}." + cached)


def _refuse_quantized_base(config: TrainConfig, dit: Path) -> None:
    """A GGUF or fp8 DiT file stays quantized (frozen): an adapter trains on it, its own weights
    cannot, and FSDP does not shard its stored bytes."""
    if config.finetune != "full" and not fsdp.requested():
        return
    from ...models.dit import inspect_dit
    from ...models.quantized import stored_quantized

    kind = stored_quantized(inspect_dit(dit))
    if kind is None:
        return
    held = "GGUF blocks" if kind == "gguf" else "float8 weights"
    if config.finetune == "full":
        raise ChronoEditError(f'finetune = "full" trains the DiT\'s own weights, and {dit} holds them quantized ({held}), '
                              'which cannot be trained. Use a bf16 or fp16 DiT file, or train an adapter (finetune = "lora").')
    raise ChronoEditError(f"{dit} holds the DiT quantized ({held}), which an FSDP launch cannot shard. Train on one GPU or "
                          "with configs/accelerate/multi_gpu_ddp.yaml, or use a bf16 or fp16 DiT file under FSDP.")


def _skeleton(dit: Path) -> torch.nn.Module:
    """The DiT from its headers alone (a meta-device model)."""
    from ...models.dit import inspect_dit, meta_dit

    return meta_dit(inspect_dit(dit))


def _checked_loras(config: TrainConfig, dit: Path) -> tuple[list[tuple[Path, LoraWeights, float]], ...]:
    """base_loras and sample_loras as (file, weights, scale), each read and checked (finite, fitting
    the DiT from its headers) before any model loads."""
    from ...lora import check_lora_file, parse_lora_spec

    skeleton = _skeleton(dit) if config.base_loras or config.sample_loras else None
    found = {}
    for key in ("base_loras", "sample_loras"):
        specs = [parse_lora_spec(spec, key) for spec in getattr(config, key)]
        found[key] = [(path, check_lora_file(path, skeleton, f"{key} {path}"), scale) for path, scale in specs]
    return found["base_loras"], found["sample_loras"]


def dit_linear_layers(dit: Path) -> list[str]:
    """Names of the DiT's linear layers, from its headers alone."""
    from ...models.dit import inspect_dit, linear_layers

    return linear_layers(inspect_dit(dit))


def component_paths(config: TrainConfig) -> dict[str, Path]:
    """Where every component is (``model`` plus per-component overrides), found once per run."""
    from ...models.components import COMPONENT_NAMES, discover_components

    found = discover_components(config.model, **{name: getattr(config, name) for name in COMPONENT_NAMES})
    return {name: getattr(found, name) for name in COMPONENT_NAMES}


def open_cache(config: TrainConfig, output: Path, dtype: torch.dtype, paths: dict[str, Path]) -> ConditioningCache:
    from ...models.components import ComponentPaths

    return ConditioningCache(Path(config.cache_dir) if config.cache_dir else output / "cache",
                             components_fingerprint(ComponentPaths(**paths), dtype), dtype)


def _fill_missing(accelerator: Accelerator, cache: ConditioningCache, data: TrainingData, paths: dict[str, Path],
                  dtype: torch.dtype) -> int:
    """Encode the entries the cache lacks (the training items', then the preservation set's) with the
    encoders alone (each process its share; everyone waits for the rest); returns how many were missing."""
    datasets = [data.dataset] + ([data.preservation] if data.preservation is not None else [])
    found = [cache.missing(dataset, report=accelerator.is_main_process) for dataset in datasets]
    missing = [todo for todo, _ in found]
    if any(missing):
        from ...pipeline import ChronoEditPipeline

        encoders = ChronoEditPipeline.from_pretrained(device=accelerator.device, dtype=dtype, with_dit=False, **paths)
        for dataset, todo in zip(datasets, missing):
            share = todo[accelerator.process_index::accelerator.num_processes]
            fill(cache, encoders, dataset, share, show=accelerator.is_main_process)
        accelerator.wait_for_everyone()
    new, distinct = sum(len(todo) for todo in missing), sum(distinct for _, distinct in found)
    accelerator.print(f"conditioning cache {cache.folder}: {new} new, {distinct - new} reused")
    return new


def cache_conditioning(config: TrainConfig) -> int:
    """Fill the conditioning cache for ``config`` (run under accelerate to split the work); returns new entries."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    output = Path(config.output)
    _on_main_then_everyone(accelerator, lambda: preflight(config, output))
    data = TrainingData(config)
    dtype = DTYPES[config.dtype]
    paths = component_paths(config)
    return _fill_missing(accelerator, open_cache(config, output, dtype, paths), data, paths, dtype)


def _save(accelerator: Accelerator, module, optimizer, scheduler, ema: ExponentialMovingAverage | None,
          progress: ckpt.Progress, config: TrainConfig, output: Path) -> None:
    """Write checkpoint step-N (all ranks' RNG states and, for a full fine-tune, their shards; rank 0
    the rest) and lora-stepN.safetensors.

    A failed write (disk full, folder gone) removes the partial checkpoint, keeps the previous one
    and stops with a message saying how to continue.
    """
    staging = ckpt.staging_dir(output, progress.step)
    try:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            staging.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        ckpt.write_rank_state(staging, accelerator.process_index)
        # a LoRA run's state is gathered on every rank under FSDP (collectives), kept by the main process only
        gathered = trained_state.gather(accelerator, config, module, optimizer, ema, staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            trained_state.write(gathered, staging, config, progress.step)
            snapshot_best(output, staging)
            ckpt.finalize(staging, ckpt.checkpoint_dir(output, progress.step), progress,
                          gathered.optimizer, scheduler.state_dict(), config.keep_checkpoints)
            if gathered.lora is not None:
                lora_export.save(gathered.lora, lora_export.step_path(output, progress.step), config, progress.step)
        accelerator.wait_for_everyone()
    except (OSError, SafetensorError) as exc:  # safetensors reports ENOSPC as its own error type
        shutil.rmtree(staging, ignore_errors=True)
        previous = ckpt.latest_checkpoint(output)
        kept = (f"the last complete checkpoint, {previous}, is intact. Free some space (or fix the folder) and rerun the "
                "same command with --resume" if previous else "no earlier checkpoint exists, so nothing of this run is "
                "kept. Free some space (or fix the folder) and rerun the same command")
        raise ChronoEditError(f"could not write the step-{progress.step} checkpoint under {output} "
                              f"({getattr(exc, 'strerror', None) or exc}); {kept}.") from None


def _sample(accelerator: Accelerator, pipe, data: TrainingData, config: TrainConfig, preview, output: Path,
            step: int, log: TrainingLog) -> float | None:
    """Main process: sample edits with the live adapter (grid and rows to the trackers too) and
    return the validation loss; the others wait."""
    loss = None
    if accelerator.is_main_process:
        from .samples import sample_grid

        path = output / "samples" / f"step-{step:06d}.png"
        items = data.sample_items(config.sample_count)
        loss = sample_grid(pipe, items, path, preview, config.seed)
        log.samples(path, items, step)
        accelerator.print(f"\nstep {step}: validation loss {loss:.4f}, samples {path}")
    accelerator.wait_for_everyone()
    return loss


def _on_main_then_everyone(accelerator: Accelerator, check) -> None:
    """Run ``check`` on the main process; raise its user error on every process (no hang)."""
    error = [None]
    if accelerator.is_main_process:
        try:
            check()
        except ChronoEditError as exc:
            error = [str(exc)]
    if accelerator.num_processes > 1:
        error = broadcast_object_list(error)
    if error[0] is not None:
        raise ChronoEditError(error[0])
