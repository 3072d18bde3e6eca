"""LoRA for every model file: low-rank adapters on the frozen Linear layers, saved in PEFT's layout.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". A frozen weight W (out, in) gets a trainable
update of rank r: y = W x + (alpha / r) B A x, A (r, in) random, B (out, r) zero, so step 0 is the base model.
  - targets: "attention" (every Linear of a block's attention), "mlp" (of its MLP, dense or shared experts; never
    the router), "all", or module-name suffixes matched as PEFT matches them ("q_proj", "attn.c_proj"); MoE routed
    experts (stacked tensors), routers, the LM head and DeepSeek's MTP module (which transformers drops) never;
  - alpha defaults to the rank (scaling 1), as PEFT's defaults (r=8, lora_alpha=8) do;
  - `disabled(model)` turns every adapter off: the base model without a copy (DPO's reference);
  - `merge(model)` folds B A into W: a plain model again, as fast as the base;
  - save_adapter / read_adapter / load_unmerged / from_pretrained use PEFT's files (adapter_config.json +
    adapter_model.safetensors), so `peft.PeftModel.from_pretrained(transformers_model, directory)` loads ours and
    we load PEFT's. GPT-2's projections are Conv1D there (fan_in_fan_out), its modules under `transformer.`.
    PEFT 0.21 on transformers 5 turns the gate/up/down_proj targets of a MoE model (DeepSeek, Qwen3-MoE) into
    targets on its fused routed experts, so it loads only the attention part of such an adapter (peft#3711).
"""
import contextlib
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

import checkpoint_io
from errors import BadInput

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_HF_PREFIX = {"gpt2": "transformer."}   # where transformers' module paths differ from ours (by model_type)
_CONV1D = {"gpt2"}                       # families whose official projections are Conv1D [in, out]
# adapter_config.json fields that change what an adapter computes: lora.py implements only their defaults
_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "lora_bias": False, "rank_pattern": {},
                "alpha_pattern": {}, "modules_to_save": None, "layer_replication": None, "target_parameters": None}


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus B A x scaled by alpha / r, with dropout on the input of A (as PEFT)."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scaling, self.enabled = base, alpha / rank, True
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # PEFT's init, that of nn.Linear
        self.dropout = nn.Dropout(dropout)

    def delta(self):
        """scaling * B A (out, in), computed in fp32 (as PEFT merges) and cast to the weight's dtype."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.base.weight.dtype)

    @property
    def weight(self):
        # the adapted weight, for code that reads .weight itself (deepseek.py's absorbed decoding: kv_b_proj)
        return self.base.weight + self.delta() if self.enabled else self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling


def _block_linears(model):
    """{path: (module, block-relative name)} of the nn.Linear (or adapted) modules in the n_layer blocks, less the MoE
    routers: 'h.0.attn.c_attn' -> 'attn.c_attn', 'model.layers.3.mlp.up_proj' -> 'mlp.up_proj'."""
    modules, found = dict(model.named_modules()), {}
    for path, m in modules.items():
        hit = re.fullmatch(r"(?:.+?\.)?(\d+)\.(.+)", path)   # the first number in the path: the block's index
        in_adapter = isinstance(modules.get(path.rpartition(".")[0]), LoRALinear)   # a LoRALinear's .base
        if (isinstance(m, (nn.Linear, LoRALinear)) and hit and int(hit[1]) < model.config.n_layer and not in_adapter
                and hit[2] != "mlp.gate"):
            found[path] = (m, hit[2])
    return found


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)   # PEFT's rule for a list of target_modules


def target_names(model, targets):
    """The sorted module paths that targets (names or suffixes, or 'a,b' in one string) select; BadInput for a
    target that selects nothing, listing what exists. gpt2: 'attention' -> ['h.0.attn.c_attn', 'h.0.attn.c_proj', ..]"""
    targets = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if not targets:
        raise BadInput("--lora_targets '': expected 'attention', 'mlp', 'all' or module names, comma-separated")
    linears, names = _block_linears(model), set()
    for t in targets:
        kinds = {"attention": ("attn", "self_attn"), "mlp": ("mlp",), "all": ("attn", "self_attn", "mlp")}.get(t)
        hit = {p for p, (_, rel) in linears.items() if (rel.split(".")[0] in kinds if kinds else _matches(p, [t]))}
        if not hit:
            existing = ", ".join(dict.fromkeys(rel for _, rel in linears.values()))
            raise BadInput(f"--lora_targets {t!r}: matches no module; the Linear modules are: {existing} "
                           f"(or 'attention', 'mlp', 'all')")
        names |= hit
    return sorted(names)


def add_lora(model, rank, alpha=None, dropout=0.0, targets=("attention",)):
    """Freeze every parameter and wrap each targeted Linear in a LoRALinear, in place; alpha None: the rank.
    Keeps model.lora_config (rank, alpha, dropout, targets: the module paths) for save_adapter."""
    if type(rank) is not int or rank < 1:
        raise BadInput(f"--lora_rank {rank!r}: expected an integer >= 1")
    alpha = rank if alpha is None else alpha
    if type(alpha) not in (int, float) or not 0 < alpha < math.inf:
        raise BadInput(f"--lora_alpha {alpha!r}: expected a number > 0")
    if type(dropout) not in (int, float) or not 0 <= dropout < 1:
        raise BadInput(f"--lora_dropout {dropout!r}: expected a number in [0, 1)")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("add_lora: the model has adapters already (merge them first)")
    names = target_names(model, targets)
    model.requires_grad_(False)
    for path in names:
        parent, _, child = path.rpartition(".")
        adapter = LoRALinear(model.get_submodule(path), rank, alpha, dropout).train(model.training)   # its dropout too
        setattr(model.get_submodule(parent), child, adapter)
    model.lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=names)
    return model


@contextlib.contextmanager
def disabled(model):
    """Every adapter off inside the block: the base model's outputs (and .weight), no copy of it."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in adapters]
    try:
        for m in adapters:
            m.enabled = False
        yield model
    finally:
        for m, on in zip(adapters, before):
            m.enabled = on


@torch.no_grad()
def merge(model):
    """Replace each LoRALinear by its base Linear holding W + scaling B A: a plain model, every parameter trainable
    again (as from_pretrained returns it), no lora_config."""
    for path, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.base.weight += m.delta()
            parent, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent), child, m.base)
    model.requires_grad_(True)
    model.__dict__.pop("lora_config", None)
    return model


def _family(model):
    return model.config.to_hf()["model_type"]


def save_adapter(model, directory, base_model_name_or_path):
    """adapter_config.json + adapter_model.safetensors in PEFT's layout (atomic writes) for a model after add_lora.
    base_model_name_or_path: the base checkpoint (a directory or hub id), for from_pretrained and PEFT users."""
    c, family, directory = model.lora_config, _family(model), Path(directory)
    prefix = "base_model.model." + _HF_PREFIX.get(family, "")
    tensors = {f"{prefix}{p}.lora_{ab}.weight": getattr(model.get_submodule(p), f"lora_{ab}").detach().contiguous()
               for p in c["targets"] for ab in "AB"}
    # target_modules as PEFT writes them, block-relative suffixes, unless these would select more (a target such as
    # 'h.0.attn.c_attn'): then the full paths, which PEFT matches exactly
    linears = _block_linears(model)
    suffixes = sorted({linears[p][1] for p in c["targets"]})
    exact = {p for p in linears if _matches(p, suffixes)} == set(c["targets"])
    target_modules = suffixes if exact else [_HF_PREFIX.get(family, "") + p for p in c["targets"]]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": c["rank"], "lora_alpha": c["alpha"],
              "lora_dropout": c["dropout"], "target_modules": target_modules, "fan_in_fan_out": family in _CONV1D,
              "base_model_name_or_path": str(base_model_name_or_path), "inference_mode": True,
              "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
              "revision": None, **_UNSUPPORTED}
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint_io.atomic_write(directory / WEIGHTS, safetensors_bytes(tensors, metadata={"format": "pt"}))
    checkpoint_io.write_json(directory / CONFIG, config)   # last: a directory with a config holds its weights


def _read_config(directory):
    """adapter_config.json, checked: a LoRA config with the fields lora.py implements, else BadInput naming them."""
    path = Path(directory) / CONFIG
    d = checkpoint_io.read_json(path)
    if not isinstance(d, dict):
        raise BadInput(f"{path}: expected a JSON object, got {type(d).__name__}")
    if d.get("peft_type") != "LORA":
        raise BadInput(f"{path}: peft_type {d.get('peft_type')!r}: expected 'LORA'")
    try:
        checkpoint_io.check_keys(d, {"r": int, "lora_alpha": float, "lora_dropout": "rate"}, ("r", "lora_alpha"))
    except ValueError as e:
        raise BadInput(f"{path}: {e}") from None
    for key, default in _UNSUPPORTED.items():
        if d.get(key) and d[key] != default:   # null, false, [] and {} are the defaults too
            raise BadInput(f"{path}: {key} is {d[key]!r:.60}, which lora.py does not implement (expected {default!r})")
    return d


def read_adapter(directory, model):
    """(adapter_config dict, {our module path: (A, B)}) of a PEFT adapter for model (the base, before add_lora):
    BadInput naming the file and key for a damaged file, a key that names no module lora.py adapts, a wrong shape."""
    config, path = _read_config(directory), Path(directory) / WEIGHTS
    if not path.exists():
        raise BadInput(f"{path}: not found; expected PEFT's adapter weights beside {CONFIG}")
    family, linears, r = _family(model), _block_linears(model), config["r"]
    prefix = "base_model.model." + _HF_PREFIX.get(family, "")
    pieces = {}
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                hit = re.fullmatch(re.escape(prefix) + r"(.+)\.lora_([AB])\.weight", key)
                if not hit or hit[1] not in linears:
                    raise BadInput(f"{path}: key {key!r} names no module lora.py adapts in this {family} model")
                m = linears[hit[1]][0]
                shape = (r, m.in_features) if hit[2] == "A" else (m.out_features, r)
                tensor = f.get_tensor(key)
                if tuple(tensor.shape) != shape:
                    raise BadInput(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, expected {shape} (r={r})")
                pieces.setdefault(hit[1], {})[hit[2]] = tensor
    except SafetensorError as e:
        raise BadInput(f"{path}: not a readable safetensors file ({e})") from None
    for module, ab in pieces.items():
        if len(ab) < 2:
            raise BadInput(f"{path}: lacks key {prefix}{module}.lora_{'B' if 'A' in ab else 'A'}.weight")
    return config, {p: (ab["A"], ab["B"]) for p, ab in sorted(pieces.items())}


@torch.no_grad()
def load_unmerged(model, directory):
    """add_lora as the saved adapter says, with its A and B: a LoRA run resumed exactly, or PEFT's adapter unmerged."""
    config, weights = read_adapter(directory, model)
    if not weights:
        raise BadInput(f"{Path(directory) / WEIGHTS}: holds no LoRA weights")
    add_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets=list(weights))
    for path, (a, b) in weights.items():
        m = model.get_submodule(path)
        m.lora_A.copy_(a)
        m.lora_B.copy_(b)
    return model


def from_pretrained(cls, directory, dtype=None, device=None):
    """The base (cls.from_pretrained of the config's base_model_name_or_path) with the adapter merged in."""
    config = _read_config(directory)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise BadInput(f"{Path(directory) / CONFIG}: base_model_name_or_path is {base!r}: expected the base model's "
                       f"directory or hub id")
    return merge(load_unmerged(cls.from_pretrained(base, dtype=dtype, device=device), directory))
