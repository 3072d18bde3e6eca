"""Peak memory while loading a Llama checkpoint, against the size of its weights.

    python bench/llama_load_memory.py                          # 100M-parameter config, fp32, HF layout, 4 shards
    python bench/llama_load_memory.py --preset llama3.2-1b --dtype bfloat16 --shard_mb 5000   # as on the hub
    python bench/llama_load_memory.py --layout meta --shards 2                # Meta's consolidated.NN.pth
    python bench/llama_load_memory.py --dtype bfloat16 --load_dtype float32   # converted while loading

A random checkpoint is written to a temporary directory first; then a fresh process imports llama3, notes its
memory, loads the checkpoint with Llama.from_pretrained, reads every weight once (as a first forward pass
would) and reports what that added:
  - RSS (VmRSS, peak VmHWM): everything resident, including pages of the weight files that safetensors or
    torch.load map into the process (file-backed, shared with the page cache, dropped when memory is short).
    Weights stored in the dtype asked for stay such mapped pages: loading only maps them, hence the small
    figure when from_pretrained returns;
  - anonymous RSS (RssAnon, sampled every 2 ms): memory the process allocated itself: converted dtypes and
    tensors concatenated from Meta's model-parallel shards. This is what costs RAM.
A loader that held a second full copy of the weights would show 2x.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import importlib, json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
module = importlib.import_module(sys.argv[4])   # the model file: llama3 here, deepseek in deepseek_fp8_load_memory

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

peak_anon, done = 0, False
def sample():
    global peak_anon
    while not done:
        peak_anon = max(peak_anon, status()["RssAnon"])
        time.sleep(0.002)

torch.set_num_threads(1)
with torch.device("meta"):   # warm-up: the first use of a device context imports ~70 MB of modules, not weights
    module.Model(module.Config(vocab_size=8, n_layer=2, n_embd=16, n_head=2))
torch.zeros(8).sum()
base = status()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
model = module.Model.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
seconds = time.perf_counter() - t0
loaded = status()
with torch.no_grad():   # read every weight, as the first forward pass will: mapped file pages become resident
    for p in model.parameters():
        p.sum()
done = True
thread.join()
end = status()
weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"weights": weights, "seconds": seconds, "base_rss": base["VmRSS"], "base_anon": base["RssAnon"],
                  "loaded_rss": loaded["VmRSS"], "peak_rss": end["VmHWM"], "peak_anon": max(peak_anon, end["RssAnon"]),
                  "end_anon": end["RssAnon"]}))
"""


def write_checkpoint(config, directory, layout, dtype, shard_mb, shards):
    import torch
    sys.path.insert(0, str(ROOT))
    import llama3
    torch.manual_seed(0)
    with torch.device("meta"):
        model = llama3.Llama(config)
    # random values, made one tensor at a time (the model is built on the meta device: no float32 copy first)
    state = {k: torch.randn(v.shape, dtype=dtype) * 0.02 for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and config.tie_word_embeddings)}
    if layout == "hf":
        import checkpoint_io
        checkpoint_io.save_safetensors(state, directory, max_shard_bytes=shard_mb * 2**20)
        checkpoint_io.write_json(Path(directory) / "config.json", config.to_hf())
        return
    # Meta's layout: keys renamed (q/k row order is irrelevant for memory), rows or columns split per shard
    names = {v: k for k, v in llama3._META_TOP_KEYS.items()}
    names |= {f"model.layers.{i}.{hf}": f"layers.{i}.{meta}" for i in range(config.n_layer)
              for meta, hf in llama3._META_LAYER_KEYS.items()}
    parts = [{} for _ in range(shards)]
    for key, w in state.items():
        meta_key = names[key]
        dim = None if meta_key.endswith("norm.weight") else 1 if meta_key.endswith(("wo.weight", "w2.weight")) else 0
        for part, piece in zip(parts, [w] * shards if dim is None else w.chunk(shards, dim=dim)):
            part[meta_key] = piece.clone()
    del state
    for i, part in enumerate(parts):
        torch.save(part, Path(directory) / f"consolidated.{i:02d}.pth")
    params = {"dim": config.n_embd, "n_layers": config.n_layer, "n_heads": config.n_head,
              "n_kv_heads": config.n_kv_head, "vocab_size": config.vocab_size, "multiple_of": config.intermediate_size,
              "ffn_dim_multiplier": None, "norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta}
    if config.rope_scale_factor:
        params["use_scaled_rope"] = True
        (Path(directory) / "config.json").write_text(json.dumps(config.to_hf()))   # where the factor comes from
    (Path(directory) / "params.json").write_text(json.dumps(params))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default=None, help="a llama3.PRESETS name (default: a 100M-parameter config)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16: stored as")
    p.add_argument("--load_dtype", default=None, help="loaded as (default: --dtype)")
    p.add_argument("--layout", default="hf", help="hf | meta")
    p.add_argument("--shard_mb", type=int, default=100, help="HF layout: largest shard, MiB")
    p.add_argument("--shards", type=int, default=1, help="Meta layout: number of consolidated.NN.pth")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    a = p.parse_args()
    import torch
    sys.path.insert(0, str(ROOT))
    import llama3
    config = llama3.PRESETS[a.preset] if a.preset else llama3.Config(
        vocab_size=32768, block_size=2048, n_layer=12, n_head=12, n_kv_head=4, n_embd=768, intermediate_size=2048,
        rope_scale_factor=32.0, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        write_checkpoint(config, d, a.layout, getattr(torch, a.dtype), a.shard_mb, a.shards)
        sizes = [f.stat().st_size for f in Path(d).iterdir() if f.suffix in (".safetensors", ".pth")]
        r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), d, a.load_dtype or a.dtype, "llama3"], capture_output=True,
                           text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        m = json.loads(r.stdout.strip().splitlines()[-1])
    gb = 2**30
    w = m["weights"]

    def row(name, value):
        print(f"{name:52s} {value / gb:6.2f} GiB = {value / w:.2f}x the weights")

    print(f"{a.preset or 'llama 100M'}: {w / gb:.2f} GiB of weights loaded as {a.load_dtype or a.dtype} from "
          f"{a.dtype}, {a.layout} layout, {len(sizes)} file(s), largest {max(sizes) / gb:.2f} GiB; from_pretrained "
          f"took {m['seconds']:.1f}s")
    row("RSS added when from_pretrained returns", m["loaded_rss"] - m["base_rss"])
    row("peak RSS added, load + first read of every weight", m["peak_rss"] - m["base_rss"])
    row("peak anonymous memory added, same span", m["peak_anon"] - m["base_anon"])
    row("anonymous memory held at the end", m["end_anon"] - m["base_anon"])


if __name__ == "__main__":
    main()
