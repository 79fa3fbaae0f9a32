"""From weight files on disk to a DiffSynth module.

1. **Find** a component's files: a diffusers/transformers folder (one file, or shards + index
   JSON), an index JSON, a shard list or one file (``.safetensors``, or ``.pth`` for Wan's
   encoders). Missing, extra or stray shards are an error naming them.
2. **Read** keys and shapes from the headers without loading tensors, validating each
   safetensors header ourselves: safetensors' own errors for a damaged file are terse.
3. **Register** the component in DiffSynth's model registry
   (``diffsynth.configs.model_configs.MODEL_CONFIGS``): DiffSynth picks a class, its kwargs and a
   key converter by the md5 of a file's "key:shape" strings, so checkpoints it does not know get an
   entry whose kwargs were read from the shapes.
4. **Load** through DiffSynth's ``ModelPool``, but from tensors read lean: DiffSynth's ``DiskMap``
   keeps every shard memory-mapped while cloning each tensor, so a load briefly holds about twice
   the weights (``bench/load_dit.py``). Here each shard is read once into one buffer whose views
   become the parameters (``assign=True``), so the weights are in RAM once.
``.pth`` files are only ever read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import mmap
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from diffsynth.configs.model_configs import MODEL_CONFIGS
from diffsynth.core.loader.file import convert_keys_dict_to_single_str
from diffsynth.models.model_loader import ModelPool
from transformers.initialization import no_init_weights

from ..errors import CheckpointError, ChronoEditError
from ..files import inside
from ..user_files import INDEX_FILE_BYTES, read_json
from .gguf import gguf_state_dict, read_gguf
from .scaled_fp8 import Fp8Scheme, dequantize_state_dict, detect_scheme, strip_aux

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}  # weight dtypes by name

# -- 1. finding the files ---------------------------------------------------------------------

INDEX_SUFFIX = ".safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".pth", ".pt", ".bin")
_SHARD_RE = re.compile(r"^(?P<stem>.+)-(?P<idx>\d{5})-of-(?P<total>\d{5})\.safetensors$")


def resolve_weight_files(source: str | Path | Sequence[str | Path], what: str = "DiT") -> list[Path]:
    """Return the complete, ordered list of files holding one model's weights.

    ``source`` is a folder (with an index JSON, shards, or exactly one weights file), an index
    JSON, a single file, or a list of shard files. Missing or extra shards raise
    :class:`CheckpointError` naming them; ``what`` names the component in messages.
    """
    if not isinstance(source, (str, Path)):
        files = [Path(p) for p in source]
        if len(files) == 1:
            return resolve_weight_files(files[0], what)
        return _check_shard_list(files)
    path = Path(source)
    if path.is_dir():
        return _resolve_folder(path, what)
    if path.name.endswith(INDEX_SUFFIX):
        return _resolve_index(path)
    if not path.is_file():
        raise CheckpointError(f"{what} weights not found: {path} does not exist.")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise CheckpointError(f"{path}: not a weights file for the {what} (expected {', '.join(WEIGHT_SUFFIXES)}).")
    if _SHARD_RE.match(path.name):
        raise CheckpointError(
            f"{path} is one shard of a sharded checkpoint; pass its folder or its index JSON instead."
        )
    return [path]


def _resolve_folder(folder: Path, what: str) -> list[Path]:
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if len(indexes) == 1:
        return _resolve_index(indexes[0])
    if len(indexes) > 1:
        raise CheckpointError(
            f"{folder} holds several index files ({', '.join(p.name for p in indexes)}); "
            "pass the one to use."
        )
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"No {what} weights in {folder}: expected *.safetensors (and an index JSON).")
    if len(files) == 1:
        return files
    return _check_shard_list(files)


def _resolve_index(index_path: Path) -> list[Path]:
    if not index_path.is_file():
        raise CheckpointError(f"DiT index not found: {index_path}.")
    try:
        index = read_json(index_path, INDEX_FILE_BYTES)
    except ChronoEditError as exc:
        raise CheckpointError(f"not a valid safetensors index: {exc}") from None
    weight_map = _weight_map(index_path, index)
    folder = index_path.parent
    _check_inside(index_path, weight_map)
    listed = sorted(set(weight_map.values()))
    missing = [name for name in listed if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path.name} lists shards that are missing from {folder}: {', '.join(missing)}. "
            "Download them (all shards are needed)."
        )
    stem = index_path.name[: -len(INDEX_SUFFIX)]
    strays = sorted(
        p.name for p in folder.glob(f"{stem}-*-of-*.safetensors") if p.name not in set(listed)
    )
    if strays:
        raise CheckpointError(
            f"{folder} holds shards not listed in {index_path.name}: {', '.join(strays)}. "
            "They may come from another download; remove them or fix the index."
        )
    return [folder / name for name in listed]


_INDEX_FIX = "re-download the index (or fix it by hand)"


def _weight_map(index_path: Path, index: object) -> dict[str, str]:
    """The index's ``weight_map`` (tensor name -> shard file name), or a CheckpointError saying what is wrong."""
    if not isinstance(index, dict):
        raise CheckpointError(f"{index_path}: not a valid safetensors index: the file holds a JSON "
                              f"{type(index).__name__}, not an object with a \"weight_map\"; {_INDEX_FIX}.")
    if "weight_map" not in index:
        raise CheckpointError(f"{index_path}: not a valid safetensors index: no \"weight_map\" "
                              f"(found {', '.join(map(repr, index)) or 'nothing'}); {_INDEX_FIX}.")
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: \"weight_map\" is a JSON {type(weight_map).__name__}, not an object "
                              f"mapping each tensor name to its shard's file name; {_INDEX_FIX}.")
    for key, name in weight_map.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{index_path}: weight_map entry {key!r} is {name!r}, not a shard file name; "
                                  f"{_INDEX_FIX}.")
    return weight_map


def hf_cache_blob(folder: Path, name: str) -> bool:
    """Whether ``folder/name`` is a plain file name of a Hugging Face cache snapshot: a link from
    ``<repo>/snapshots/<revision>/…`` into that repository's own ``<repo>/blobs/``."""
    link = folder / name
    if Path(name).name != name or not link.is_symlink():
        return False
    target = link.resolve()
    repo = target.parent.parent
    return target.parent.name == "blobs" and link.absolute().is_relative_to(repo.absolute() / "snapshots")


def _check_inside(index_path: Path, weight_map: dict[str, str]) -> None:
    """Refuse shard names that lead out of the index's folder (``..``, absolute, or a link to outside,
    except the links of a Hugging Face cache snapshot into its own ``blobs/``)."""
    folder = index_path.parent
    outside: dict[str, list[str]] = {}
    for key, name in weight_map.items():
        if not inside(name, folder) and not hf_cache_blob(folder, name):
            outside.setdefault(name, []).append(key)
    if not outside:
        return
    name, keys = next(iter(outside.items()))
    more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
    others = f"; so do {', '.join(map(repr, list(outside)[1:4]))}" if len(outside) > 1 else ""
    link = not Path(name).is_absolute() and (folder / name).is_symlink()
    hint = " Links are followed only within the folder (or a Hugging Face cache's own blobs/)." if link else ""
    raise CheckpointError(
        f"{index_path}: shard {name!r}, named by weight_map entry {keys[0]!r}{more}, leads outside the "
        f"index's folder {folder}{others}. Shards must be files in that folder: put the shard there and write its bare "
        f"file name in the index.{hint}"
    )


def _check_shard_list(files: list[Path]) -> list[Path]:
    matches = [_SHARD_RE.match(p.name) for p in files]
    if not all(matches):
        odd = [p.name for p, m in zip(files, matches) if not m]
        raise CheckpointError(
            f"Several weight files were given but {', '.join(odd)} are not named like shards "
            "(NAME-00001-of-00003.safetensors); pass one file, a shard folder or an index JSON."
        )
    totals = {int(m["total"]) for m in matches}
    stems = {m["stem"] for m in matches}
    if len(totals) != 1 or len(stems) != 1:
        raise CheckpointError(
            "The shards given belong to different checkpoints: "
            + ", ".join(p.name for p in files)
        )
    total, stem = totals.pop(), stems.pop()
    folder = files[0].parent
    expected = {f"{stem}-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
    names = {p.name for p in files}
    missing = sorted(expected - names)
    absent = sorted(p.name for p in files if not p.is_file())
    if missing or absent:
        raise CheckpointError(
            f"Incomplete checkpoint in {folder}: missing {', '.join(missing + absent)}."
        )
    return sorted(files, key=lambda p: p.name)


def read_config(path: str | Path) -> dict:
    """``config.json`` of the component folder ``path``; {} for a single file or a folder without one."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return {}
    try:
        found = read_json(config)
    except ChronoEditError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(found, dict):
        raise CheckpointError(f"{config} holds no JSON object; re-download the component.")
    return found


# -- 2. reading headers and tensors -----------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_REPAIR = "re-download or re-export it"
# key -> (safetensors dtype name, shape, first byte, end byte) within the data section
HeaderEntries = dict[str, tuple[str, list[int], int, int]]


def read_entries(path: str | Path) -> tuple[int, HeaderEntries, dict[str, str]]:
    """``(data_start, {key: (dtype, shape, begin, end)}, metadata)`` of a complete safetensors file.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated or corrupt.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found.")
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes); {_REPAIR}.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header; {_REPAIR}.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); {_REPAIR}.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header; {_REPAIR}.")
    metadata = header.pop("__metadata__", None) or {}
    data_bytes = size - 8 - header_len
    entries: HeaderEntries = {}
    for key, info in header.items():
        try:
            begin, end = info["data_offsets"]
            shape = [int(d) for d in info["shape"]]
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt entry {key!r} in the header; {_REPAIR}.") from None
        itemsize = dtype.itemsize if dtype is not None else 1
        if end > data_bytes or end - begin != torch.Size(shape).numel() * itemsize:
            raise CheckpointError(
                f"{path}: truncated or corrupt (tensor {key!r} lies outside the file's "
                f"{size} bytes); {_REPAIR}."
            )
        entries[key] = (info["dtype"], shape, begin, end)
    return 8 + header_len, entries, metadata


def read_header(path: str | Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    """``({key: shape}, metadata)`` of a safetensors file, checking it is complete."""
    _, entries, metadata = read_entries(path)
    return {key: entry[1] for key, entry in entries.items()}, metadata


def read_shapes(files: Sequence[Path]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Keys -> shapes (and safetensors metadata) of weight files, without loading tensor data.

    ``.pth`` files are memory-mapped with ``torch.load(weights_only=True)``: safe, and only the
    pickled structure is read. GGUF shapes are given in torch's order. Quantization markers, scales
    and configs (ComfyUI's scaled fp8) are left out: the shapes are the model's.
    """
    shapes: dict[str, list[int]] = {}
    metadata: dict[str, str] = {}
    for path in files:
        if path.suffix == ".safetensors":
            file_shapes, file_meta = read_header(path)
            shapes.update(strip_aux(file_shapes))
            metadata.update(file_meta)
        elif path.suffix == ".gguf":
            tensors, file_meta = read_gguf(path)
            shapes.update({key: list(tensor.shape) for key, tensor in tensors.items()})
            metadata.update({key: str(value) for key, value in file_meta.items() if isinstance(value, (str, int))})
        else:
            shapes.update({k: list(v.shape) for k, v in load_pth(path).items() if isinstance(v, torch.Tensor)})
    return shapes, metadata


def load_pth(path: Path) -> dict:
    """A ``.pth`` state dict, memory-mapped, unwrapped from a single ``state_dict``/``module``/``model_state`` key."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"{path}: cannot read as a PyTorch weights file ({exc.__class__.__name__}: {exc}).") from None
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("state_dict", "module", "model_state"):
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict.")
    return state


def read_state_dict(files: Sequence[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of ``files``; floating-point ones in ``dtype`` (if given). A dtype conversion
    makes one converted copy per tensor, and a shard's buffer is freed with its last view.
    GGUF files are dequantized by the ``gguf`` package, float8 weights (ComfyUI's scaled fp8, plain
    fp8) as ``weight.float() * scale``: both into ``dtype`` (quantized ones into float32/bfloat16
    when ``dtype`` is None)."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            scheme = fp8_scheme(path)
            if scheme is None:
                state.update(_read_safetensors(path, dtype))
            else:
                state.update(dequantize_state_dict(_read_safetensors(path), scheme, dtype))
            continue
        if path.suffix == ".gguf":
            state.update(gguf_state_dict(path, dtype))
            continue
        for key, tensor in load_pth(path).items():
            if dtype is not None and isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            state[key] = tensor
    return state


def fp8_scheme(path: Path) -> Fp8Scheme | None:
    """How a safetensors file stores float8 weights (ComfyUI scaled fp8 or plain fp8), from its
    header; None when it holds none."""
    _, entries, metadata = read_entries(path)
    return detect_scheme({key: SAFETENSORS_DTYPES.get(entry[0]) for key, entry in entries.items()}, metadata)


def _read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``path``, floating-point ones in ``dtype`` (if given).

    Without a conversion each tensor is a view of one buffer the whole file is read into, so the
    weights are in RAM once. With one, each tensor is converted straight from a private memory
    map of the file: no file-sized buffer is zero-filled and copied into first, which halves the
    system time of, e.g., loading bf16 files as float32."""
    data_start, entries, _ = read_entries(path)
    stored = {key: SAFETENSORS_DTYPES[entry[0]] for key, entry in entries.items()}
    convert = dtype is not None and any(d.is_floating_point and d != dtype for d in stored.values())
    buffer = _mapped(path) if convert else _read_whole(path)
    tensors = {}
    for key, (_, shape, begin, end) in entries.items():
        count = (end - begin) // stored[key].itemsize
        if count == 0:
            tensors[key] = torch.empty(shape, dtype=dtype if convert and stored[key].is_floating_point else stored[key])
            continue
        tensor = torch.frombuffer(buffer, dtype=stored[key], count=count, offset=data_start + begin).reshape(shape)
        if convert:  # a copy of its own, so that no tensor keeps the mapping
            tensor = tensor.to(dtype, copy=True) if tensor.is_floating_point() else tensor.clone()
        tensors[key] = tensor
    return tensors


def _read_whole(path: Path) -> bytearray:
    """The file's bytes in one buffer."""
    buffer = bytearray(path.stat().st_size)
    with path.open("rb", buffering=0) as f:
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            read = f.readinto(view[done:])
            if not read:
                break
            done += read
    return buffer


def _mapped(path: Path) -> mmap.mmap:
    """The file, memory-mapped copy-on-write (writable for ``torch.frombuffer``; never written)."""
    with path.open("rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


# -- 3. sizing and registering ----------------------------------------------------------------

# (shapes, config.json of a component folder, where) -> (constructor kwargs, converter dotted path)
KwargsFromShapes = Callable[[dict[str, list[int]], dict, str], tuple[dict, "str | None"]]
Converter = Callable[[Mapping], dict]


def convert_shapes(converter: Converter, shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Key shapes after ``converter``: it runs on meta tensors, so sizing a model goes through the
    very code that later converts its weights, without reading or allocating any data."""
    meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    return {name: list(tensor.shape) for name, tensor in converter(meta).items()}


def check_config(config: Mapping, supported: Mapping[str, tuple], where: str, what: str) -> None:
    """Raise :class:`CheckpointError` when ``config`` sets a field to a value DiffSynth cannot run
    (``supported``: field -> allowed values; absent fields are fine)."""
    for field, allowed in supported.items():
        if field in config and config[field] not in allowed:
            raise CheckpointError(
                f"{where}: a {what} with {field}={config[field]!r} is not supported "
                f"(DiffSynth's module implements {field} = {' or '.join(map(repr, allowed))} only).")


def wrong_component(where: str, what: str, expected: str, shapes: Mapping[str, Sequence[int]]) -> CheckpointError:
    """The error for weights that are not the component asked for."""
    sample = ", ".join(sorted(shapes)[:3]) or "none"
    return CheckpointError(f"{where} does not hold {what}: expected {expected}; its first keys are {sample}.")


def hash_shapes(shapes: dict[str, list[int]]) -> str:
    """DiffSynth's model hash of a ``{key: shape}`` mapping (same as ``hash_model_file``)."""
    return hashlib.md5(convert_keys_dict_to_single_str(shapes).encode("utf-8")).hexdigest()


def ensure_entry(model_hash: str, model_name: str, model_class: str, kwargs: dict, converter: str | None) -> dict:
    """Return the registry entry for (hash, name, class), adding it if DiffSynth has none.

    Idempotent, so re-imports and every accelerate/torchrun worker see exactly one entry.
    """
    for entry in MODEL_CONFIGS:
        if (entry["model_hash"], entry["model_name"], entry["model_class"]) == (model_hash, model_name, model_class):
            registered = entry.get("extra_kwargs") or {}  # {}: DiffSynth relies on the class defaults
            if registered and registered != kwargs:
                raise ValueError(
                    f"DiffSynth's registry entry for {model_name} hash {model_hash} has kwargs "
                    f"{entry.get('extra_kwargs')}, but the checkpoint's shapes say {kwargs}."
                )
            return entry
    entry = {"model_hash": model_hash, "model_name": model_name, "model_class": model_class,
             "extra_kwargs": dict(kwargs)}
    if converter:
        entry["state_dict_converter"] = converter
    MODEL_CONFIGS.append(entry)
    return entry


# -- 4. loading -------------------------------------------------------------------------------

def load_registered(files: Sequence[Path], entry: dict, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """Let DiffSynth build ``entry``'s model class and fill it from ``files`` (read lean, in ``dtype``).

    DiffSynth builds the model on the meta device, where each layer's random initialisation still
    runs, op by op, through PyTorch's Python meta kernels; every parameter is replaced by a loaded
    tensor anyway (strict ``load_state_dict``), so the initialisers are skipped (``no_init_weights``)."""
    pool = ModelPool()
    vram_config = pool.default_vram_config()
    device = torch.device(device)
    # accelerate names CPU ranks "cpu:N"; safetensors only accepts "cpu"
    vram_config.update(computation_dtype=dtype, computation_device="cpu" if device.type == "cpu" else str(device))
    paths = [str(f) for f in files]
    state_dict = read_state_dict(files, dtype)
    with no_init_weights(), contextlib.redirect_stdout(io.StringIO()):  # DiffSynth prints every key map it builds
        return pool.load_model_file(entry, paths if len(paths) > 1 else paths[0], vram_config, state_dict=state_dict)


def load_component(path: str | Path, what: str, model_name: str, model_class: str, kwargs_from_shapes: KwargsFromShapes,
                   dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    """Resolve a component's files, size it from its shapes, register it, and load it."""
    files = resolve_weight_files(path, what)
    shapes, _ = read_shapes(files)
    kwargs, converter = kwargs_from_shapes(shapes, read_config(path), str(path))
    entry = ensure_entry(hash_shapes(shapes), model_name, model_class, kwargs, converter)
    return load_registered(files, entry, dtype, device)
