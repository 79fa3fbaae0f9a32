"""DiT loading cost: our loader (through DiffSynth's registry) vs simply reading the bytes.

    python bench/load_dit.py [--layers 30] [--dtype bfloat16|float32] [--json bench/load_dit.json]

Writes a synthetic DiT with Wan2.1-1.3B I2V shapes (width 1536, 30 blocks, bf16, diffusers shards
of about 500 MB + index) to a temporary folder, then, each in a fresh process, measures wall time
and the RSS added during the load: (peak RSS - RSS before) / weight bytes, the peak reset just
before loading (Linux /proc/self/clear_refs), and the CPU time (user, system) of the load. Medians
over repeats. ``--dtype float32`` loads the bf16 files as float32 (a converted copy of each tensor).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, resource, sys, time
from pathlib import Path
import torch
import chronoedit_lora.models  # noqa: F401  (imports settled before the baseline,
import transformers.modeling_utils  # noqa: F401  and the one load_dit makes lazily for no_init_weights: ~55 MB)
from chronoedit_lora.models.dit import load_dit
folder, mode, dtype = Path(sys.argv[1]), sys.argv[2], getattr(torch, sys.argv[3])
files = sorted(folder.glob("*.safetensors"))
def status(field):  # kB, from the kernel's accounting of this process
    return int(next(l for l in open("/proc/self/status") if l.startswith(field)).split()[1])
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS:")
cpu = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
if mode == "ours":
    model, _ = load_dit(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in model.parameters())
else:
    data = [f.read_bytes() for f in files]
seconds = time.perf_counter() - start
peak = status("VmHWM:")
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "added_rss_bytes": (peak - before) * 1024,
                  "user_s": after.ru_utime - cpu.ru_utime, "system_s": after.ru_stime - cpu.ru_stime}))
"""


def write_synthetic_dit(folder: Path, layers: int) -> int:
    """Random bf16 weights in the shapes of a Wan2.1-1.3B-sized I2V ChronoEdit transformer."""
    import torch
    from diffusers import ChronoEditTransformer3DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = ChronoEditTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=36, ffn_dim=8960,
                                             num_layers=layers, image_dim=1280, added_kv_proj_dim=1536)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shard, shard_bytes, index, total = {}, 0, {}, 0
    names = []

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"diffusion_pytorch_model-{len(names) + 1:05d}.safetensors"
        save_file(shard, str(folder / name))
        names.append(name)
        index.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for key, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[key] = tensor
        shard_bytes += tensor.numel() * 2
        total += tensor.numel() * 2
        if shard_bytes > 500 * 2**20:
            flush()
    if shard:
        flush()
    for i, name in enumerate(names):  # rename to the -000NN-of-000MM pattern diffusers uses
        final = name.replace(".safetensors", f"-of-{len(names):05d}.safetensors")
        (folder / name).rename(folder / final)
        index = {k: (final if v == name else v) for k, v in index.items()}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": index}))
    (folder / "config.json").write_text(json.dumps(dict(model.config)))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the loaded weights' dtype")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        weight_bytes = write_synthetic_dit(folder, args.layers)
        runs: dict[str, list[dict]] = {"read bytes": [], "ours": []}
        for _ in range(args.repeats):
            for mode in runs:
                out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), "ours" if mode == "ours" else "bytes",
                                      args.dtype],
                                     capture_output=True, text=True, check=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))
    summary = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    print(f"synthetic DiT: {args.layers} blocks, {weight_bytes / 2**30:.2f} GiB bf16, loaded as {args.dtype}")
    print(f"{'':<24}{'read bytes':>12}{'ours':>12}{'ratio':>9}")
    print(f"{'load seconds':<24}{summary['read bytes']['seconds']:>12.2f}{summary['ours']['seconds']:>12.2f}"
          f"{summary['ours']['seconds'] / summary['read bytes']['seconds']:>8.2f}x")
    added = {m: summary[m]['added_rss_bytes'] / weight_bytes for m in summary}
    print(f"{'added RSS / file bytes':<24}{added['read bytes']:>12.2f}{added['ours']:>12.2f}")
    for key in ("user_s", "system_s"):
        print(f"{'load CPU ' + key[:-2] + ' s':<24}{summary['read bytes'][key]:>12.2f}{summary['ours'][key]:>12.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"weight_bytes": weight_bytes, "runs": runs, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
