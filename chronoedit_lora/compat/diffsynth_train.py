"""``accelerate launch scripts/train_diffsynth.py`` with the original release's DiffSynth 1.x flags ->
``chronoedit-lora train``.

The original needs DiffSynth 1.x and fails on its own README command (2-frame clips with
``--num_frames 5``); here every pair is trained as the 5-frame clip [source, edit x 4] whatever
``--num_frames`` says. Model files named by ``--model_id_with_origin_paths`` are looked up where
DiffSynth downloads them (``./models/<model_id>/<file>``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import ChronoEditError
from ..models.components import WAN_FILES
from ..models.loading import resolve_weight_files
from .common import KitCommand, diffsynth_files, diffsynth_tokenizer, original_parser, refuse, run_translated

PROG = "train_diffsynth.py"
DIFFSYNTH_MAX_PIXELS = 1280 * 720  # DiffSynth's dynamic-resolution budget when height/width are not given
# the kit's TrainConfig keys of the encoders, by the Wan file names DiffSynth loads them from
ENCODER_KEYS = {name: key for key in ("text_encoder", "image_encoder", "vae") for name in WAN_FILES[key]}


def build_parser() -> argparse.ArgumentParser:
    """DiffSynth 1.x's ``wan_parser`` flags (the ones the original script reads)."""
    parser = original_parser(PROG, "ChronoEdit LoRA training with the original release's DiffSynth flags "
                                   "(runs chronoedit-lora train).")
    add = parser.add_argument
    add("--dataset_base_path", required=True, help="folder the metadata's paths are relative to")
    add("--dataset_metadata_path", help="metadata.csv (video,prompt: 2-frame MP4s; or the kit's layouts)")
    add("--max_pixels", type=int, help=f"pixel budget without height/width (default {DIFFSYNTH_MAX_PIXELS})")
    add("--height", type=int)
    add("--width", type=int)
    add("--num_frames", type=int, help="accepted: the kit builds each pair's 5-frame clip itself")
    add("--data_file_keys", default="image,video")
    add("--dataset_repeat", type=int, default=1)
    add("--model_paths", help='JSON list: the DiT (a file, or a list of its shards) and/or Wan encoder files')
    add("--model_id_with_origin_paths", help="MODEL_ID:FILE,... resolved to ./models/MODEL_ID/FILE")
    add("--audio_processor_config")
    add("--learning_rate", type=float, default=1e-4)
    add("--num_epochs", type=int, default=1)
    add("--output_path", default="./models")
    add("--remove_prefix_in_ckpt", default="pipe.dit.", help="accepted; the kit's LoRA keys are diffusion_model.blocks.N...")
    add("--trainable_models")
    add("--lora_base_model")
    add("--lora_target_modules", default="q,k,v,o,ffn.0,ffn.2")
    add("--lora_rank", type=int, default=32)
    add("--lora_checkpoint")
    add("--extra_inputs")
    add("--use_gradient_checkpointing", action="store_true", help="accepted; on by default, as in DiffSynth's Wan trainer")
    add("--use_gradient_checkpointing_offload", action="store_true")
    add("--gradient_accumulation_steps", type=int, default=1)
    add("--max_timestep_boundary", type=float, default=1.0)
    add("--min_timestep_boundary", type=float, default=0.0)
    add("--find_unused_parameters", action="store_true", help="accepted; the kit's LoRA uses every parameter")
    add("--save_steps", type=int)
    add("--dataset_num_workers", type=int, default=0, help="accepted; the kit loads data in the training process")
    add("--weight_decay", type=float, default=0.01)
    return parser


def _refuse_unsupported(args: argparse.Namespace) -> None:
    if args.trainable_models:
        raise refuse("--trainable_models", "the kit trains LoRAs only; use --lora_base_model dit.")
    if args.lora_base_model != "dit":
        raise refuse(f"--lora_base_model {args.lora_base_model}", "the kit trains LoRAs on the DiT; pass --lora_base_model dit.")
    if args.lora_checkpoint:
        raise refuse("--lora_checkpoint", "a run starts from a fresh LoRA; continue a kit run with --resume instead.")
    if args.audio_processor_config:
        raise refuse("--audio_processor_config", "ChronoEdit has no audio input.")
    extras = set((args.extra_inputs or "input_image").split(","))
    if extras != {"input_image"}:
        raise refuse(f"--extra_inputs {args.extra_inputs}", "ChronoEdit is conditioned on the input image only "
                     "(--extra_inputs input_image, which the kit always uses).")
    if (args.min_timestep_boundary, args.max_timestep_boundary) != (0.0, 1.0):
        raise refuse("--min/max_timestep_boundary", "the kit samples training timesteps over the whole range "
                     "(these are for Wan2.2's two-expert models).")
    if "video" not in args.data_file_keys.split(","):
        raise refuse(f"--data_file_keys {args.data_file_keys}", "the kit reads the metadata's video column (or its "
                     "input_image/edited_image columns) itself.")


def _dataset(args: argparse.Namespace) -> str:
    """The metadata CSV, whose folder must be ``--dataset_base_path`` (the kit's paths are relative to the CSV)."""
    if not args.dataset_metadata_path:
        raise refuse("--dataset_base_path without --dataset_metadata_path", "the kit trains from a metadata.csv; "
                     "write one with `chronoedit-lora dataset prepare` and pass it.")
    metadata = Path(args.dataset_metadata_path)
    if metadata.suffix.lower() != ".csv":
        raise refuse(f"--dataset_metadata_path {metadata}", "the kit reads CSV metadata (video,prompt or "
                     "input_image,edited_image,prompt), not JSON.")
    if Path(os.path.abspath(args.dataset_base_path)) != Path(os.path.abspath(metadata.parent)):
        raise refuse(f"--dataset_base_path {args.dataset_base_path}", f"the kit reads paths relative to the CSV's own "
                     f"folder ({metadata.parent}); move {metadata.name} into {args.dataset_base_path} and pass it there.")
    return str(metadata)


def _model_files(args: argparse.Namespace) -> dict[str, str]:
    """TrainConfig component keys -> paths, from --model_paths and --model_id_with_origin_paths."""
    entries: list[list[str]] = []
    if args.model_paths:
        try:
            listed = json.loads(args.model_paths)
        except json.JSONDecodeError as exc:
            raise ChronoEditError(f"--model_paths is not valid JSON ({exc}).") from None
        entries += [[item] if isinstance(item, str) else list(item) for item in listed]
    model_ids = []
    for item in filter(None, (args.model_id_with_origin_paths or "").split(",")):
        model_id, sep, pattern = item.partition(":")
        if not sep:
            raise ChronoEditError(f"--model_id_with_origin_paths {item!r}: expected MODEL_ID:FILE.")
        model_ids.append(model_id)
        entries.append(diffsynth_files(model_id, pattern, "--model_id_with_origin_paths"))
    files: dict[str, str] = {}
    for entry in entries:
        key = ENCODER_KEYS.get(Path(entry[0]).name, "dit") if len(entry) == 1 else "dit"
        if key in files:
            raise ChronoEditError(f"two {key} files given: {files[key]} and {entry[0]}; pass one.")
        files[key] = _dit_location(entry) if key == "dit" else entry[0]
    files["tokenizer"] = diffsynth_tokenizer(model_ids)
    return files


def _dit_location(files: list[str]) -> str:
    """One DiT file, or the folder whose shards (by its index) are exactly ``files``."""
    if len(files) == 1:
        return files[0]
    folder = Path(files[0]).parent
    if sorted(map(Path, files)) != sorted(resolve_weight_files(folder)):
        raise ChronoEditError(f"--model_paths lists {len(files)} DiT shards that are not all of {folder}'s shards; "
                              "the kit loads a DiT from its shard folder (or index): keep only that model's shards there.")
    return str(folder)


def translate(argv: list[str]) -> KitCommand:
    """The ``chronoedit-lora train`` command for the original flags."""
    args = build_parser().parse_args(argv)
    _refuse_unsupported(args)
    settings = {"dataset": _dataset(args), "output": args.output_path, **_model_files(args),
                "repeat": args.dataset_repeat, "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                "epochs": args.num_epochs, "rank": args.lora_rank, "alpha": args.lora_rank,  # DiffSynth: alpha = rank
                "targets": args.lora_target_modules, "gradient_accumulation": args.gradient_accumulation_steps,
                "max_grad_norm": 0}  # DiffSynth's runner does not clip gradients
    if args.height is not None or args.width is not None:
        settings |= {"height": args.height, "width": args.width}
    else:
        settings["max_pixels"] = args.max_pixels or DIFFSYNTH_MAX_PIXELS
    if args.use_gradient_checkpointing_offload:
        settings["activation_offload"] = "true"
    if args.save_steps:
        settings["save_every"] = args.save_steps
    kit = ["train"] + [item for key, value in settings.items() if value is not None for item in (f"--{key}", str(value))]
    notes = [f"the LoRA is written as {Path(args.output_path) / 'lora.safetensors'} (keys diffusion_model.blocks.N..., "
             "loadable by diffusers and ComfyUI), with checkpoints for --resume"]
    accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ  # set by `accelerate launch`
    return KitCommand(kit, notes=notes, launcher="accelerate launch scripts/train.py" if accelerate else "chronoedit-lora")


def main(argv: list[str] | None = None) -> int:
    return run_translated(PROG, translate, argv)
