"""Lean loading of a pruned T5: peak memory of the load / bytes of the pruned encoder, per case (issue 13).

    python scripts/bench_load.py                 # T5-v1.1-large shape (341 M params), fp32 + bf16 checkpoints
    python scripts/bench_load.py --shape xl      # T5-v1.1-XL shape (1.22 B params; ~7.5 GB of disk, ~6 GB RAM)

Writes a random T5 encoder checkpoint of the chosen shape twice (fp32 sharded in 1 GB files, as hub T5
checkpoints are, and bf16 in one file), then loads the same ~40 % pruned encoder (skips and one re-use) in a
fresh subprocess per case: same dtype, fp32 -> bf16 cast, and on CUDA when available. Each case prints
``peak/pruned N.NN``: the peak resident memory the load added (host; on CUDA the peak allocated device
memory) divided by the bytes of the pruned encoder's parameters. The old run path (dense ``from_pretrained``,
then ``apply_plan``) runs side by side as a reference. The last line is the worst lean case; target <= 1.10.
Hardware-independent work is printed beside the time: bytes read from disk vs the dense checkpoint's bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing skrr
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# google/t5-v1_1-large and -xl encoder configs (d_kv 64, gated-GELU, 32 buckets / 128 max distance).
SHAPES = {
    "large": dict(d_model=1024, d_ff=2816, num_heads=16, num_layers=24),
    "xl": dict(d_model=2048, d_ff=5120, num_heads=32, num_layers=24),
}
TARGET = 1.10


def config_for(shape: str):
    from transformers import T5Config

    return T5Config(vocab_size=32128, d_kv=64, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, is_encoder_decoder=False, use_cache=False,
                    tie_word_embeddings=False, dropout_rate=0.0, **SHAPES[shape])


def plan_for(config, model_id: str):
    """~40 % sparsity like Skrr on T5-XXL (41.9 %): 11 FFNs and 10 attentions skipped, one attention re-used."""
    from skrr.plan import EncoderSignature, PruningPlan, Slot
    from skrr.families import T5Family

    n = config.num_layers
    sig = EncoderSignature(model_id, None, "t5", T5Family().arch(config), n)
    skips = [2 * b + 1 for b in range(n - 14, n - 3)] + [2 * b for b in range(n - 12, n - 2)]
    plan = PruningPlan.from_skips(sig, skips, "unit", "bench")
    return plan.with_slots({2 * (n - 11): Slot(2 * (n - 13), "attn")})


def write_checkpoint(folder: Path, shape: str, dtype_name: str, shard_bytes: int | None) -> int:
    """A random T5 encoder checkpoint written tensor by tensor (never whole in memory); returns its bytes."""
    import torch
    from accelerate import init_empty_weights
    from transformers import T5EncoderModel

    from skrr.tensorfile import ST_DTYPES

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    st_name = {v: k for k, v in ST_DTYPES.items()}[dtype]
    config = config_for(shape)
    with init_empty_weights():
        skeleton = T5EncoderModel(config)
    names = [(k, tuple(v.shape)) for k, v in skeleton.state_dict().items() if k != "encoder.embed_tokens.weight"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards, current, size = [], [], 0
    for name, shp in names:
        nbytes = itemsize * int(torch.Size(shp).numel())
        if shard_bytes and current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shp, nbytes))
        size += nbytes
    shards.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    files = ([f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
             if len(shards) > 1 else ["model.safetensors"])
    for fname, shard in zip(files, shards):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shp, nbytes in shard:
            header[name] = {"dtype": st_name, "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shp, _ in shard:
                t = torch.randn(shp, generator=g).mul_(0.05).to(dtype)
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
                total += t.numel() * itemsize
    if len(files) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _vm(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def touch(model) -> None:
    """Read one element per 4 KiB page of every parameter (makes lazily mapped weights resident)."""
    for p in model.parameters():
        flat = p.detach().view(-1)
        flat[:: max(1, 4096 // flat.element_size())].sum()


def child(args: argparse.Namespace) -> None:
    """One case in this fresh process; prints one JSON line."""
    import torch

    from skrr.export import load_pruned_from_dense
    from skrr.surgery import apply_plan, count_params
    from skrr.tensorfile import TensorFiles

    torch.set_num_threads(2)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.to]
    config = config_for(args.shape)
    plan = plan_for(config, args.ckpt)
    read = [0]
    original = TensorFiles.read

    def counting(self, name, *a, **k):
        read[0] += self.entries[name].nbytes
        return original(self, name, *a, **k)

    TensorFiles.read = counting
    cuda = args.device == "cuda"
    if cuda:
        torch.zeros(1, device="cuda")  # CUDA context outside the measurement
        torch.cuda.reset_peak_memory_stats()
    import transformers

    # Warm-up on a tiny checkpoint: every module the load imports and the allocator's first pools are not
    # part of what a load of this encoder costs.
    from skrr.plan import PruningPlan
    from skrr.surgery import signature
    from skrr.tiny import tiny_t5

    with tempfile.TemporaryDirectory() as warm:
        tiny_t5(num_layers=2, name="").save_pretrained(warm)
        small = load_pruned_from_dense(warm, PruningPlan.identity(signature(
            transformers.T5EncoderModel.from_pretrained(warm))), dtype, args.device)
        touch(small)
        del small
    base = _vm("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    t0 = time.perf_counter()
    if args.path == "lean":
        enc = load_pruned_from_dense(args.ckpt, plan, dtype, args.device)
    else:  # the old run path: the dense encoder first, on the device, then apply_plan
        dense = transformers.T5EncoderModel.from_pretrained(args.ckpt, dtype=dtype).to(args.device)
        config._name_or_path = args.ckpt
        enc = apply_plan(dense, plan_for(dense.config, args.ckpt))
        del dense
    touch(enc)  # memory-mapped weights count once they are used; a forward pass would touch every page
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    pruned = sum(p.numel() * p.element_size() for p in {id(p): p for p in enc.parameters()}.values())
    peak = torch.cuda.max_memory_allocated() if cuda else _vm("VmHWM:") - base
    print(json.dumps({"peak": peak, "pruned": pruned, "seconds": seconds, "read": read[0] if args.path == "lean" else None,
                      "params": count_params(enc), "host_peak": _vm("VmHWM:") - base}))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="large")
    p.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary folder)")
    p.add_argument("--no-reference", action="store_true", help="skip the old-path reference cases")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--to", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--path", default="lean", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import torch

    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="skrr-bench-load-")
        root = Path(tmp.name)
    ckpt = {}
    for dt, shard in (("float32", 1 << 30), ("bfloat16", None)):
        folder = root / f"t5-{args.shape}-{dt}"
        t0 = time.perf_counter()
        done = folder / ".complete"  # a --dir of an earlier run is reused
        if done.exists():
            nbytes = int(done.read_text())
        else:
            nbytes = write_checkpoint(folder, args.shape, dt, shard)
            done.write_text(str(nbytes))
        ckpt[dt] = (folder, nbytes)
        print(f"wrote random T5-v1.1-{args.shape} encoder, {dt}: {nbytes / 1e9:.2f} GB in "
              f"{len(list(folder.glob('*.safetensors')))} file(s), {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"plan: {plan_for(config_for(args.shape), '').summary()}")
    cases = [("float32", "float32", "cpu"), ("bfloat16", "bfloat16", "cpu"), ("float32", "bfloat16", "cpu")]
    if torch.cuda.is_available():
        cases += [("bfloat16", "bfloat16", "cuda"), ("float32", "bfloat16", "cuda")]
    paths = ["lean"] + ([] if args.no_reference else ["dense+apply_plan"])
    worst = None
    for src, to, device in cases:
        for path in paths:
            cmd = [sys.executable, __file__, "--child", "--shape", args.shape, "--ckpt", str(ckpt[src][0]),
                   "--to", to, "--device", device, "--path", path]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "child failed",
                      file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ratio = r["peak"] / r["pruned"]
            label = f"{src:>8} ckpt -> {to:<8} {device:<4} {path:<16}"
            what = "device" if device == "cuda" else "host"
            read = "all" if r["read"] is None else f"{r['read'] / 1e9:.2f}"
            print(f"{label} peak/pruned {ratio:.2f}  ({what} peak +{r['peak'] / 1e9:.2f} GB, pruned "
                  f"{r['pruned'] / 1e9:.2f} GB, {r['params'] / 1e6:.0f} M params; read "
                  f"{read} of "
                  f"{ckpt[src][1] / 1e9:.2f} GB on disk; {r['seconds']:.1f} s)", flush=True)
            if path == "lean" and (worst is None or ratio > worst[0]):
                worst = (ratio, label.strip())
    print(f"worst lean case: peak/pruned {worst[0]:.2f} ({worst[1]}); target <= {TARGET:.2f}: "
          f"{'met' if worst[0] <= TARGET else 'NOT met'}")
    if tmp is not None:
        tmp.cleanup()
    return 0 if worst[0] <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
