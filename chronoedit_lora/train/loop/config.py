"""Training configuration: a TOML file, then ``--key value`` overrides from the command line."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import ChronoEditError
from ...user_files import check_regular, read_text

DEFAULT_TARGETS = ["q", "k", "v", "o", "ffn.0", "ffn.2"]
FINETUNE_MODES = ("lora", "full")


@dataclass
class TrainConfig:
    """Every training setting. Field docs double as ``--help`` and the config reference."""

    # data
    dataset: str = ""  # metadata.csv of edit pairs (paths relative to its folder)
    height: int | None = None  # fixed training size (with width); None -> aspect buckets
    width: int | None = None  # fixed training width (with height)
    max_pixels: int = 1024 * 1024  # pixel budget of aspect-ratio buckets
    trajectory_max_pixels: int | None = None  # pixel budget of trajectory rows (29 frames); None -> a quarter of the pairs'
    trajectory_share: float | None = None  # fraction of each epoch's batches that are trajectory batches; None -> as the rows come
    repeat: int = 1  # times each pair is seen per epoch
    batch_size: int = 1  # pairs per process per step (drawn within one bucket)
    allow_outside: bool = False  # allow dataset paths outside the CSV's folder
    prompt_column: str = ""  # CSV column trained on; "" -> a row's caption_cot (written by a captioner) if filled, else its prompt
    # adapters under the trained one, and previews as the LoRA will be used
    base_loras: list[str] = field(default_factory=list)  # "FILE:SCALE" adapters fused into the base DiT before training (hooks with fp8_base), e.g. the 8-step distill LoRA; must stay the same on --resume
    sample_loras: list[str] = field(default_factory=list)  # "FILE:SCALE" adapters stacked (as hooks) under the trained one for samples and eval_every, e.g. the distill LoRA when base_loras is empty
    sample_preset: str = ""  # "distill": samples and eval_every edit with 8 steps, cfg 1, shift 2 (as `edit --preset distill`) instead of sample_steps / eval_steps
    datasets: list[dict] = field(default_factory=list)  # [[datasets]] tables instead of `dataset`: csv, weight (share of each epoch's items) or repeat, and optionally height, width, max_pixels, prompt_column, prompt_dropout (see docs/training.md)
    # model
    model: str | None = None  # ChronoEdit-14B-Diffusers folder or Wan2.1 file folder
    dit: str | None = None  # override: DiT shard folder, index JSON or single file
    text_encoder: str | None = None  # override: text_encoder/ folder or umT5 .pth
    image_encoder: str | None = None  # override: image_encoder/ folder or open-clip .pth
    vae: str | None = None  # override: vae/ folder or Wan2.1_VAE.pth
    tokenizer: str | None = None  # override: umT5 tokenizer folder
    dtype: str = "bfloat16"  # base weights; LoRA weights train in float32
    fp8_base: bool = False  # DiT blocks' linear weights stored in float8 (half of bf16), computed in the activations' dtype
    rope: str = "skip"  # "skip" (ChronoEdit [0, 7]) or "legacy" ([0, 1], original DiffSynth scripts)
    cache: bool = False  # encode each pair once (latents, y, CLIP, umT5) and train without the encoders
    cache_dir: str | None = None  # where cached conditioning lives (default: <output>/cache); shareable across runs
    # adapter
    adapter: str = "lora"  # "lora", "dora" (LoRA + a learned norm per output row), "loha" (Hadamard product of two LoRAs) or "lokr" (Kronecker product), all through peft
    rank: int = 32  # adapter rank (LoKr: of the factors it splits in two)
    alpha: float = 32.0  # adapter alpha (scale = alpha / rank)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # DiT linear layers to adapt (name suffixes)
    lokr_factor: int = -1  # LoKr: split each dimension as out = a*b with a the largest divisor <= this (-1: as square as possible)
    lokr_decompose_both: bool = False  # LoKr: split the small Kronecker factor in two rank-`rank` factors too, not only the large one
    # full fine-tuning
    finetune: str = "lora"  # "lora", or "full": train the DiT's own weights named by `trainable` (float32 masters)
    trainable: list[str] = field(default_factory=lambda: ["blocks.*"])  # full fine-tuning: DiT parameter names to train (fnmatch patterns, e.g. blocks.*.self_attn.*)
    # moving average of the trained weights
    ema_decay: float = 0.0  # > 0: keep an EMA of the trained weights, w_ema = d * w_ema + (1 - d) * w after each step (it starts at step 1's weights)
    ema_power: float = 0.0  # > 0: power EMA instead, d = (1 - 1/step) ** (ema_power + 1) (Karras et al. 2024; 6.94 is their sigma_rel 0.10)
    sample_ema: bool = False  # samples during training use the EMA weights
    # optimisation
    learning_rate: float = 1e-4  # the optimizer's learning rate (peak of the schedule)
    weight_decay: float = 0.01  # the optimizer's (decoupled) weight decay
    warmup_steps: int = 0  # linear warm-up steps, then lr_scheduler
    gradient_accumulation: int = 1  # batches per optimizer step
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_steps: int = 0  # > 0 stops after this many optimizer steps (wins over epochs)
    epochs: int = 1  # passes over the dataset (if max_steps is 0)
    seed: int = 0  # LoRA init, data order, noise and timesteps
    mixed_precision: str = "no"  # accelerate: "no", "bf16", "fp16"
    gradient_checkpointing: bool = True  # recompute block activations in backward (less memory)
    activation_offload: bool = False  # checkpointed activations kept on CPU
    block_swap: bool = False  # DiT blocks held in (pinned) CPU RAM and streamed to the GPU one at a time, the next prefetched, in forward and in the recomputed forward and backward (one GPU; needs gradient_checkpointing)
    compile: bool = False  # compile each DiT block with torch.compile (regional: one block's compile time)
    shift: float = 5.0  # flow-matching sigma shift of the training timesteps
    # the loss recipe, the optimizer and its LR schedule, preservation (docs/training.md: "The loss recipe", "Optimizers and LR schedules", "Preservation")
    timestep_sampling: str = "uniform"  # "uniform" (over the shifted schedule: DiffSynth's), "logit_normal" (timestep_mean, timestep_std) or "sigmoid" (timestep_scale): how each step's timestep is drawn
    timestep_mean: float = 0.0  # logit_normal: mean of logit(sigma); > 0 favours noisier timesteps
    timestep_std: float = 1.0  # logit_normal: standard deviation of logit(sigma)
    timestep_scale: float = 1.0  # sigmoid: sigma = sigmoid(timestep_scale * N(0, 1))
    timestep_range: list[float] = field(default_factory=lambda: [0.0, 1000.0])  # [low, high]: timesteps (0-1000, t = 1000 sigma) drawn only inside this range
    loss_weighting: str = "diffsynth"  # "diffsynth" (its timestep weight, a bump centred at t = 500) or "none"
    change_weight: float = 1.0  # weight of the latents the edit changed (input vs edited image) relative to the rest; 1: no change map
    input_frame_weight: float = 1.0  # weight of the input frame's latents in the loss (0: the loss ignores them)
    optimizer: str = "adamw"  # "adamw" (torch), "adamw8bit" (bitsandbytes), "prodigy" (prodigyopt; learning_rate about 1.0) or "adafactor" (transformers)
    lr_scheduler: str = "constant"  # after warm-up: "constant", "cosine", "linear", "cosine_with_restarts" or "polynomial" (diffusers' schedules, over the run's optimizer steps)
    lr_cycles: int = 1  # cosine_with_restarts: number of cosine cycles (hard restarts)
    lr_power: float = 1.0  # polynomial: power of the decay (1: linear)
    preservation_dataset: str | None = None  # CSV of pairs, or a folder of images (identity pairs), the LoRA should leave alone: each step also pulls its prediction on one of them toward the frozen base's (same noise and timestep)
    preservation_weight: float = 1.0  # weight of that preservation term (logged as the `preservation` column)
    preservation_prompt: str = "Keep the image unchanged."  # the instruction of a preservation folder's identity pairs
    # outputs
    output: str = "runs/lora"  # folder for LoRAs, checkpoints, logs, samples
    save_every: int = 500  # optimizer steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # training-state checkpoints kept for --resume
    min_free_mb: int = 1024  # refuse to start with less free space than this in `output`
    sample_every: int = 0  # > 0: every N steps, edit held-out pairs into samples/step-N.png (input | edit | target)
    sample_dataset: str | None = None  # CSV of held-out pairs for samples (default: first pairs of `dataset`)
    sample_count: int = 2  # pairs per sample grid
    sample_steps: int = 20  # denoising steps of sample edits
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # experiment trackers (accelerate's names: tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, swanlab, trackio); empty: metrics.csv only
    tracker_project: str = "chronoedit-lora"  # project (W&B, TensorBoard folder) or experiment (MLflow) the trackers log under
    eval_every: int = 0  # > 0: every N steps, score held-out pairs (quantile loss; PSNR/SSIM of few-step edits) as eval/<metric> in logs/metrics.csv
    eval_dataset: str | None = None  # CSV of held-out pairs for eval_every (required with it; never the training pairs)
    eval_count: int = 4  # held-out pairs scored at each evaluation (the CSV's first rows)
    eval_steps: int = 4  # denoising steps of the evaluation's edits (0: the quantile loss only)
    keep_best: str | None = None  # eval metric whose best step's LoRA is kept as lora-best.safetensors (loss, loss_q10..q90, psnr, ssim)
    check_sync_every: int = 100  # compare LoRA weights across processes every N steps (0: never)
    resume: bool = False  # continue the run in `output` from its newest checkpoint
    resume_from: str | None = None  # continue from this checkpoint folder instead (implies resume)
    allow_changes: bool = False  # with resume: accept settings that differ from the saved run's
    overwrite: bool = False  # start over in an `output` that holds another run (its files are removed first)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """``{field: comment}`` from the source, for --help and generated docs."""
        import inspect

        comments: dict[str, str] = {}
        for line in inspect.getsource(cls).splitlines():
            name, _, rest = line.strip().partition(":")
            if "#" in rest and name in {f.name for f in dataclasses.fields(cls)}:
                comments[name] = rest.split("#", 1)[1].strip()
        return comments

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def load_config(path: str | Path | None, overrides: dict[str, str]) -> TrainConfig:
    """Read ``path`` (TOML, optional) and apply string overrides, checking every key and type."""
    values: dict[str, typing.Any] = {}
    if path is not None:
        path = Path(path)
        check_regular(path)
        if not path.is_file():
            raise ChronoEditError(f"config {path} not found.")
        try:
            values = tomllib.loads(read_text(path))
        except tomllib.TOMLDecodeError as exc:
            raise ChronoEditError(f"{path}: invalid TOML ({exc}).") from None
    hints = typing.get_type_hints(TrainConfig)
    for key in list(values) + list(overrides):
        if key not in hints:
            import difflib

            close = difflib.get_close_matches(key, hints, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ChronoEditError(f"unknown training setting {key!r}{hint}.")
    for key, raw in overrides.items():
        values[key] = _parse(raw, hints[key], key)
    for key, value in values.items():
        values[key] = _check_type(value, hints[key], key)
    config = TrainConfig(**values)
    validate(config)
    return config


MIXED_PRECISION = ("no", "bf16", "fp16")
# Settings that only change what happens after a resumed run's checkpoint (or where files go).
FUTURE_ONLY = frozenset({
    "max_steps", "epochs", "save_every", "keep_checkpoints", "min_free_mb", "sample_every", "sample_dataset",
    "sample_count", "sample_steps", "check_sync_every", "output", "cache", "cache_dir", "log_with", "tracker_project",
    "sample_ema", "eval_every", "block_swap", "sample_loras", "sample_preset"})


def validate(config: TrainConfig) -> None:
    """Every setting that can be checked without a model: ranges, choices, combinations."""
    from ...models.loading import DTYPES
    from ..objective.adapter_config import check_adapter
    from ..state.trackers import check_trackers
    from ...models.rope import ROPE_MODES
    from ...settings import MAX_STEPS, MAX_TRAIN_SEED, check_choice, check_range, check_seed, check_shift, check_size

    check_choice("dtype", config.dtype, sorted(DTYPES))
    check_choice("rope", config.rope, ROPE_MODES)
    check_choice("mixed_precision", config.mixed_precision, MIXED_PRECISION)
    check_choice("finetune", config.finetune, FINETUNE_MODES)
    if not 0 <= config.ema_decay < 1:
        raise ChronoEditError(f"ema_decay must be >= 0 and < 1 (0: no EMA), got {config.ema_decay!r}.")
    check_range("ema_power", config.ema_power, 0)
    if config.ema_decay and config.ema_power:
        raise ChronoEditError("ema_decay and ema_power both set: choose one EMA (a fixed decay, or the power EMA).")
    if config.sample_ema and not (config.ema_decay or config.ema_power):
        raise ChronoEditError("sample_ema = true needs an EMA: set ema_decay (e.g. 0.999) or ema_power.")
    if config.finetune == "full" and config.fp8_base:
        raise ChronoEditError("finetune = \"full\" trains the DiT's weights, which fp8_base stores frozen in float8; "
                              "set fp8_base = false (FSDP shards the weights instead).")
    check_block_swap(config)
    if config.finetune == "full" and config.adapter != "lora":
        raise ChronoEditError(f"adapter = {config.adapter!r} with finetune = \"full\": a full fine-tune trains the DiT's own "
                              "weights, not an adapter; drop adapter, or set finetune = \"lora\".")
    if config.finetune == "full" and config.keep_best:
        raise ChronoEditError("keep_best keeps the best step's adapter as lora-best.safetensors; a full fine-tune has "
                              "none. Keep checkpoints (keep_checkpoints), turn them into LoRAs with `chronoedit-lora lora extract` "
                              "and score those with `chronoedit-lora eval --lora`.")
    if config.finetune == "full" and not config.trainable:
        raise ChronoEditError("trainable is empty: name the DiT parameters to train, e.g. blocks.* (every block).")
    for key in ("learning_rate", "alpha"):
        check_range(key, getattr(config, key), 0, low_inclusive=False)
    check_shift("shift", config.shift)
    check_seed("seed", config.seed, MAX_TRAIN_SEED)
    for key in ("rank", "batch_size", "gradient_accumulation", "save_every", "epochs", "repeat", "keep_checkpoints",
                "sample_count", "eval_count"):
        check_range(key, getattr(config, key), 1)
    for key in ("weight_decay", "warmup_steps", "max_grad_norm", "max_steps", "min_free_mb", "sample_every",
                "check_sync_every", "eval_every"):
        check_range(key, getattr(config, key), 0)
    check_range("sample_steps", config.sample_steps, 1, MAX_STEPS)
    check_range("eval_steps", config.eval_steps, 0, MAX_STEPS)
    validate_evaluation(config)
    validate_stacked_loras(config)
    dataset_specs(config)
    check_range("max_pixels", config.max_pixels, 16 * 16)
    if config.trajectory_max_pixels is not None:
        check_range("trajectory_max_pixels", config.trajectory_max_pixels, 16 * 16)
    if config.trajectory_share is not None:
        check_range("trajectory_share", config.trajectory_share, 0, 1)
    check_size(config.height, config.width, prefix="")
    check_adapter(config)
    validate_recipe(config)
    check_trackers(config.log_with)
    if (config.resume or config.resume_from) and config.overwrite:
        raise ChronoEditError("resume and overwrite contradict each other: continue the run, or start over.")


def check_block_swap(config: TrainConfig) -> None:
    """block_swap streams the frozen blocks through the backward pass, which only gradient
    checkpointing's recomputation gives it, one block at a time."""
    if not config.block_swap:
        return
    if config.finetune == "full":
        raise ChronoEditError('block_swap = true streams the frozen base weights; finetune = "full" trains them, so '
                              'they stay on the GPU. Set block_swap = false, or train an adapter (finetune = "lora").')
    if not config.gradient_checkpointing:
        raise ChronoEditError("block_swap = true needs gradient_checkpointing = true: each block is streamed back for "
                              "its recomputed forward and backward, which only checkpointing does one block at a time.")
    if config.compile:
        raise ChronoEditError("block_swap = true cannot be combined with compile = true: streaming moves the blocks' "
                              "weights on every call, which a compiled block would recompile for. Set compile = false.")


def validate_evaluation(config: TrainConfig) -> None:
    """eval_every needs held-out pairs; keep_best names a metric that eval_every measures."""
    from ...eval.metrics import METRICS, NEUTRAL, TRAINING_METRICS
    from ...settings import check_choice

    if config.eval_every and not config.eval_dataset:
        raise ChronoEditError("eval_every needs eval_dataset: a CSV of held-out pairs (rows not in `dataset`), "
                              "e.g. made by moving a few rows of metadata.csv into heldout.csv.")
    if config.keep_best is None:
        return
    if not config.eval_every:
        raise ChronoEditError(f"keep_best = {config.keep_best!r} needs eval_every > 0 (the steps it is measured at).")
    measured = [m for m in TRAINING_METRICS if METRICS[m][0] != NEUTRAL and (config.eval_steps or m.startswith("loss"))]
    check_choice("keep_best", config.keep_best, measured)


def validate_recipe(config: TrainConfig) -> None:
    """The loss recipe's settings (:mod:`..objective.loss`), the optimizer and the LR schedule
    (:mod:`.optimizer`), and preservation."""
    from ...settings import check_choice, check_range
    from ..objective.loss import LOSS_WEIGHTINGS, TIMESTEP_SAMPLINGS, TRAIN_TIMESTEPS, grid_indices, training_schedule
    from .optimizer import LR_SCHEDULERS, OPTIMIZERS, POLYNOMIAL_END, check_package

    check_choice("timestep_sampling", config.timestep_sampling, TIMESTEP_SAMPLINGS)
    check_choice("loss_weighting", config.loss_weighting, LOSS_WEIGHTINGS)
    check_range("timestep_mean", config.timestep_mean)
    for key in ("timestep_std", "timestep_scale"):
        check_range(key, getattr(config, key), 0, low_inclusive=False)
    for key in ("change_weight", "input_frame_weight", "preservation_weight"):
        check_range(key, getattr(config, key), 0)
    if len(config.timestep_range) != 2:
        raise ChronoEditError(f"timestep_range must be [low, high], got {config.timestep_range!r}.")
    low, high = config.timestep_range
    check_range("timestep_range's low", low, 0, TRAIN_TIMESTEPS)
    check_range("timestep_range's high", high, low, TRAIN_TIMESTEPS, low_inclusive=False)
    if config.timestep_sampling == "uniform" and not len(grid_indices(training_schedule(config.shift), (low, high))):
        raise ChronoEditError(f"timestep_range [{low:g}, {high:g}] holds none of the shifted schedule's timesteps "
                              f"(shift {config.shift:g}); widen it.")

    check_choice("optimizer", config.optimizer, OPTIMIZERS)
    if config.finetune == "full" and config.optimizer == "adamw8bit":
        raise ChronoEditError("optimizer = 'adamw8bit' with finetune = \"full\": bitsandbytes' 8-bit state is not "
                              "tested in a full fine-tune's sharded checkpoints; use adamw, prodigy or adafactor.")
    check_package(config.optimizer)
    check_choice("lr_scheduler", config.lr_scheduler, LR_SCHEDULERS)
    check_range("lr_cycles", config.lr_cycles, 1)
    check_range("lr_power", config.lr_power, 0, low_inclusive=False)
    if config.lr_scheduler == "polynomial":
        check_range("learning_rate (with lr_scheduler = \"polynomial\", which decays to 1e-7)", config.learning_rate,
                    POLYNOMIAL_END, low_inclusive=False)

    if config.preservation_dataset and config.finetune == "full":
        raise ChronoEditError("preservation_dataset compares the adapted DiT with its base with the adapter turned off; a "
                              "full fine-tune has no adapter to turn off, and a frozen copy of the base would double "
                              "the DiT's memory (about 33 GB more for the 14B model in bf16). Drop preservation_dataset, "
                              "or train a LoRA (finetune = \"lora\").")
    if config.preservation_dataset and not Path(config.preservation_dataset).exists():
        raise ChronoEditError(f"preservation_dataset {config.preservation_dataset} not found: give the path of a "
                              "metadata.csv of pairs (input_image, edited_image, prompt) or of a folder of images.")
    if not config.preservation_prompt.strip():
        raise ChronoEditError("preservation_prompt is empty: give the instruction a preservation folder's images are "
                              "trained with, such as \"Keep the image unchanged.\"")


def validate_stacked_loras(config: TrainConfig) -> None:
    """base_loras and sample_loras name existing files with finite scales; sample_preset is known."""
    from ...lora.io import parse_lora_spec
    from ...sampling import PRESETS
    from ...settings import check_choice

    for key in ("base_loras", "sample_loras"):
        for spec in getattr(config, key):
            if not isinstance(spec, str):
                raise ChronoEditError(f"{key}: each entry is a \"FILE:SCALE\" string, got {spec!r}.")
            parse_lora_spec(spec, key)
    if config.sample_preset:
        check_choice("sample_preset", config.sample_preset, sorted(PRESETS))


@dataclass(frozen=True)
class DatasetSpec:
    """One training CSV and how it is read and mixed (a ``[[datasets]]`` table, or the plain ``dataset``)."""

    csv: str
    weight: float | None = None  # share of each epoch's items (relative to the other tables' weights)
    repeat: int = 1  # times each row is listed per epoch (without weights)
    height: int | None = None
    width: int | None = None
    max_pixels: int = 1024 * 1024
    prompt_column: str = ""
    prompt_dropout: float = 0.0  # fraction of its items trained with an empty instruction


DATASET_KEYS = ("csv", "weight", "repeat", "height", "width", "max_pixels", "prompt_column", "prompt_dropout")


def dataset_specs(config: TrainConfig) -> list[DatasetSpec]:
    """The training CSVs, each checked (a table's size and prompt settings default to the top-level ones)."""
    from ...settings import check_range, check_size, did_you_mean

    common = dict(height=config.height, width=config.width, max_pixels=config.max_pixels,
                  prompt_column=config.prompt_column)
    if not config.datasets:
        return [DatasetSpec(config.dataset, repeat=config.repeat, **common)] if config.dataset else []
    if config.dataset:
        raise ChronoEditError("both `dataset` and [[datasets]] are set: list the CSV as one more [[datasets]] table.")
    if config.repeat != 1:
        raise ChronoEditError("`repeat` with [[datasets]]: set repeat (or weight) in each table instead.")
    specs = []
    for number, table in enumerate(config.datasets, 1):
        where = f"[[datasets]] table {number}"
        if not isinstance(table, dict):
            raise ChronoEditError(f"{where}: expected a TOML table (csv = \"...\", weight = ...), got {table!r}.")
        for key in table:
            if key not in DATASET_KEYS:
                raise ChronoEditError(f"{where}: unknown key {key!r}{did_you_mean(key, DATASET_KEYS)}; the keys are "
                                      f"{', '.join(DATASET_KEYS)}.")
        values = {**common, **table}
        for key, kind in (("csv", str), ("prompt_column", str), ("repeat", int), ("max_pixels", int),
                          ("weight", (int, float)), ("prompt_dropout", (int, float)), ("height", int), ("width", int)):
            value = values.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ChronoEditError(f"{where}: {key} = {value!r} is not a {getattr(kind, '__name__', 'number')}.")
        if not values.get("csv"):
            raise ChronoEditError(f"{where}: no csv; write csv = \"data/my_pairs/metadata.csv\".")
        if not Path(values["csv"]).is_file():
            raise ChronoEditError(f"{where}: csv {values['csv']} not found.")
        if "weight" in table and "repeat" in table:
            raise ChronoEditError(f"{where}: weight and repeat both set; a weighted table's repeats follow from its "
                                  "weight. Keep one.")
        spec = DatasetSpec(**{k: float(v) if k in ("weight", "prompt_dropout") else v for k, v in values.items()})
        if spec.weight is not None:
            check_range(f"{where}: weight", spec.weight, 0, low_inclusive=False)
        check_range(f"{where}: repeat", spec.repeat, 1)
        check_range(f"{where}: max_pixels", spec.max_pixels, 16 * 16)
        check_range(f"{where}: prompt_dropout", spec.prompt_dropout, 0, 1)
        if spec.prompt_dropout == 1:
            raise ChronoEditError(f"{where}: prompt_dropout = 1 drops every instruction; use a fraction below 1.")
        check_size(spec.height, spec.width, prefix=f"{where}: ")
        specs.append(spec)
    weighted = [spec.weight is not None for spec in specs]
    if any(weighted) and not all(weighted):
        raise ChronoEditError("[[datasets]]: some tables have a weight and some not; give every table a weight "
                              "(shares of each epoch), or none (repeats).")
    return specs


# How a run was started, not what it trains: never a difference worth listing.
RUN_CONTROLS = frozenset({"resume", "resume_from", "allow_changes", "overwrite"})


def changed_settings(saved: dict, config: TrainConfig) -> tuple[list[str], list[str]]:
    """(allowed, refused) differences between a saved run's settings and ``config``, as "key: old -> new"."""
    current = json.loads(config.to_json())
    allowed, refused = [], []
    for key in sorted(current.keys() - RUN_CONTROLS):
        if key in saved and saved[key] != current[key]:
            (allowed if key in FUTURE_ONLY else refused).append(f"{key}: {saved[key]!r} -> {current[key]!r}")
    return allowed, refused


def _parse(raw: str, hint: typing.Any, key: str) -> typing.Any:
    """Convert a command-line string to the field's type."""
    base = _base_type(hint)
    if raw.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    try:
        if base is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if base is list:
            return [_element_type(hint)(item.strip()) for item in raw.split(",") if item.strip()]
        return base(raw)
    except ValueError:
        raise ChronoEditError(f"--{key}: cannot read {raw!r} as {base.__name__}.") from None


def _check_type(value: typing.Any, hint: typing.Any, key: str) -> typing.Any:
    base = _base_type(hint)
    if value is None and type(None) in typing.get_args(hint):
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise ChronoEditError(f"setting {key!r} must be {base.__name__}, got {value!r}.")
    if base is list:
        element = _element_type(hint)
        return [_check_type(item, element, f"{key}[{i}]") for i, item in enumerate(value)]
    return value


def _element_type(hint: typing.Any) -> type:
    """The element type of a ``list[...]`` setting."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return typing.get_args(hint)[0] if typing.get_origin(hint) is list else _element_type(args[0])


def _base_type(hint: typing.Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        return list
    if args:
        return _base_type(args[0])
    return hint
