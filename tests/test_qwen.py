"""qwen.py against transformers' Qwen2ForCausalLM, Qwen3ForCausalLM and Qwen3MoeForCausalLM on tiny random checkpoints
written here in the official layout (hub-style config.json, per-expert MoE keys, every parameter random)."""
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import errors
import qwen
from conftest import official_state
from components.moe import softmax_topk

transformers = pytest.importorskip("transformers")

T = 256   # long enough for YaRN and the rope base to show (docs/FORMATS.md 2.4)
BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False,
        "bos_token_id": 250, "eos_token_id": 251}
QWEN2 = BASE | {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True}
QWEN3 = BASE | {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "head_dim": 24, "attention_bias": False}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}   # the hub's spelling ("type")
MOE = QWEN3 | {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 8,
               "num_experts_per_tok": 3, "moe_intermediate_size": 32, "norm_topk_prob": True,
               "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.01}
CONFIGS = {
    "qwen2.5-tied": QWEN2,
    "qwen3-untied": QWEN3,
    "qwen3-yarn-tied": QWEN3 | {"rope_scaling": YARN, "tie_word_embeddings": True, "max_position_embeddings": 256},
    "moe-norm": MOE,
    # layers 0, 2 dense (step 2), 1 MoE, 3 dense (listed); no renormalization of the top-k probabilities
    "moe-sparse-step": MOE | {"num_hidden_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3],
                              "norm_topk_prob": False},
}
CLASSES = {"qwen2": "Qwen2", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe"}


def hf_class(model_type, suffix="ForCausalLM"):
    return getattr(transformers, CLASSES[model_type] + suffix)


def random_hf_model(config, seed=0):
    """A fp32 eager transformers model with every parameter random: norm gains ~ 1 +- 0.1, biases, router, experts."""
    torch.manual_seed(seed)
    hf_config = hf_class(config["model_type"], "Config")(**config, attn_implementation="eager",
                                                          experts_implementation="eager")
    model = hf_class(config["model_type"])(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


def write_hf(model, config, directory):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(official_state(model), directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, BASE["vocab_size"], (2, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def models(idx, tmp_path_factory):
    """{name: (hf model, its logits on idx, a directory with its official files)}"""
    out = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = random_hf_model(config, seed=i)
        with torch.no_grad():
            out[name] = (model, model(idx).logits, write_hf(model, config, tmp_path_factory.mktemp(name)))
    return out


def ours(directory, **kwargs):
    return qwen.Qwen.from_pretrained(str(directory), **kwargs).eval()


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def randomize(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    return model.eval()


# ---- logits equal transformers'


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(models, idx, name):
    hf_model, ref, directory = models[name]
    model = ours(directory)
    diff = max_diff(logits_of(model, idx), ref)
    print(f"{name}: max |diff| {diff:.2e}")
    assert diff <= 1e-4
    config = CONFIGS[name]
    assert model.config.tie_word_embeddings == config["tie_word_embeddings"]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == config["tie_word_embeddings"]
    assert model.num_params() == sum(p.numel() for p in hf_model.parameters())
    if name.startswith("moe"):   # the per-expert file itself is what transformers reads (the fixture is right)
        again = hf_class("qwen3_moe").from_pretrained(directory, attn_implementation="eager",
                                                      experts_implementation="eager", dtype=torch.float32).eval()
        assert torch.equal(logits_of(again, idx), ref)
        kinds = [type(block.mlp).__name__ for block in model.model.layers]
        assert kinds == (["MoE", "MoE"] if name == "moe-norm" else ["MLP", "MoE", "MLP", "MLP"])


@pytest.mark.parametrize("name,edit", [
    ("qwen3-yarn-tied", {"rope_scaling": None}),                      # YaRN dropped
    ("moe-norm", {"norm_topk_prob": False}),                          # the top-k left unnormalized
    ("qwen2.5-tied", {"rope_theta": 1e6}),
], ids=["yarn", "norm_topk_prob", "rope_theta"])
def test_the_parity_tests_can_fail(models, idx, tmp_path, name, edit):
    hf_model, ref, directory = models[name]
    write_hf(hf_model, CONFIGS[name] | edit, tmp_path)
    assert max_diff(logits_of(ours(tmp_path), idx), ref) > 1e-3


def test_yarn_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for rope in (YARN, YARN | {"beta_fast": 16.0, "beta_slow": 2.0}, YARN | {"attention_factor": 1.3},
                 {"rope_type": "yarn", "factor": 2.0}):   # no original context: transformers falls back as we do
        config = QWEN3 | {"rope_scaling": dict(rope), "max_position_embeddings": 256}
        ref_freq, ref_factor = ROPE_INIT_FUNCTIONS["yarn"](transformers.Qwen3Config(**config), "cpu")
        inv_freq, factor = qwen.rope_frequencies(qwen.Config.from_hf(config))
        assert torch.allclose(inv_freq, ref_freq, rtol=1e-6, atol=0) and factor == pytest.approx(ref_factor, rel=1e-12)
        plain, one = qwen.rope_frequencies(qwen.Config.from_hf(QWEN3))
        assert one == 1.0 and ref_factor > 1.0 and not torch.allclose(inv_freq, plain)


# ---- KV cache


@pytest.mark.parametrize("name", ["qwen2.5-tied", "moe-sparse-step"])
def test_kv_cache_equals_full_recomputation(models, idx, name):
    model = ours(models[name][2])
    n = 128
    with torch.no_grad():
        full, _ = model(idx[:, :n])
        cache = model.init_cache(2, n)
        assert cache[0].k.shape == (2, 2, n, model.config.head_dim)   # n_kv_head heads cached, not n_head
        pieces, pos = [], 0
        for size in (40, 33, 1, 38):   # a prompt fed in uneven chunks, then token by token
            pieces.append(model(idx[:, pos:pos + size], cache=cache, pos=pos)[0])
            pos += size
        while pos < n:
            pieces.append(model(idx[:, pos:pos + 1], cache=cache, pos=pos, last_only=True)[0])
            pos += 1
    diff = max_diff(torch.cat(pieces, dim=1), full)
    print(f"{name}: kv cache max |diff| {diff:.2e}")
    assert diff <= 1e-4


# ---- the mixture of experts


def naive_moe(moe, x):
    """Token by token, expert by expert: the router as components.moe.softmax_topk, the experts as plain matmuls."""
    flat = x.reshape(-1, x.size(-1))
    weights, idx = softmax_topk(flat @ moe.gate.weight.T, moe.top_k, renormalize=moe.norm_topk_prob)
    w = moe.experts
    out = torch.zeros_like(flat)
    for t in range(flat.size(0)):
        for slot in range(moe.top_k):
            e = idx[t, slot]
            h = F.silu(flat[t] @ w.gate_proj[e].T) * (flat[t] @ w.up_proj[e].T)
            out[t] += weights[t, slot] * (h @ w.down_proj[e].T)
    return out.view_as(x), torch.bincount(idx.flatten(), minlength=moe.n_experts)


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("norm", [True, False])
def test_grouped_moe_equals_a_naive_loop(monkeypatch, grouped_mm, norm):
    if not grouped_mm:
        monkeypatch.delattr(F, "grouped_mm", raising=False)   # the fallback: a loop over the experts
    torch.manual_seed(0)
    config = qwen.Config(n_embd=32, n_head=2, n_kv_head=1, n_experts=8, n_experts_per_tok=3, moe_intermediate_size=16,
                         norm_topk_prob=norm)
    moe = randomize(qwen.MoE(config))
    x = torch.randn(3, 40, 32)
    with torch.no_grad():
        ref, load = naive_moe(moe, x)
        y = moe(x)
    assert max_diff(y, ref) <= 1e-5 and torch.equal(moe.load, load) and moe.load.sum() == 3 * 40 * 3


def test_aux_loss_and_training_loss_equal_transformers(models, idx):
    hf_model, _, directory = models["moe-norm"]
    model = ours(directory).train()   # dropout is 0: training changes only the loss, which now has the aux loss
    targets = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], dim=1)   # transformers shifts its labels itself
    hf_model.train()
    with torch.no_grad():
        ref = hf_model(idx, labels=idx, output_router_logits=True)
        _, loss = model(idx, targets)
    hf_model.eval()
    print(f"aux loss {model.aux_loss.item():.6f} vs {ref.aux_loss.item():.6f}, loss diff "
          f"{abs(loss.item() - ref.loss.item()):.2e}")
    assert model.aux_loss.item() == pytest.approx(ref.aux_loss.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ref.loss.item(), rel=1e-5)
    assert model.aux_loss.item() != pytest.approx(3.0, rel=1e-3)   # not the uniform value: routing is uneven
    model.eval()
    with torch.no_grad():
        assert model(idx, targets)[1].item() == pytest.approx(ref.loss.item() - 0.01 * ref.aux_loss.item(), rel=1e-5)


def test_expert_load_and_aux_loss_of_dense_and_moe_models(models, idx):
    dense = qwen.Qwen(qwen.Config())
    dense(idx[:, :8] % 4096)
    assert dense.expert_load() is None and dense.aux_loss is None
    model = ours(models["moe-sparse-step"][2])
    assert model.expert_load() is None   # no forward yet
    logits_of(model, idx)
    load = model.expert_load()
    assert load.shape == (1, 8) and load.dtype == torch.long and load.sum() == 2 * T * 3
    assert model.aux_loss.requires_grad is False and model.aux_loss.dim() == 0


def test_a_short_moe_training_run_learns_and_uses_every_expert():
    torch.manual_seed(0)
    config = qwen.Config(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                         intermediate_size=64, n_experts=8, n_experts_per_tok=2, moe_intermediate_size=32,
                         router_aux_loss_coef=0.01)
    model = qwen.Qwen(config).train()
    stream = torch.arange(64).repeat(40) % 61                          # a repetitive token stream
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        start = torch.randint(0, stream.numel() - 33, (8,))
        batch = torch.stack([stream[s:s + 33] for s in start.tolist()])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    share = model.expert_load().float() / model.expert_load().sum(1, keepdim=True)   # (2, 8)
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}; min expert share {share.min().item():.3f}")
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0
    assert (share > 0.02).all()   # uniform would be 1/8; none has collapsed


# ---- our checkpoints in transformers


@pytest.mark.parametrize("kind", ["qwen2", "qwen3-yarn", "qwen3_moe"])
def test_saved_checkpoint_loads_in_transformers(tmp_path, kind):
    common = dict(vocab_size=101, block_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48,
                  bos_token_id=99, eos_token_id=[100, 99])
    config = {"qwen2": qwen.Config(**common, model_type="qwen2", attention_bias=True, qk_norm=False),
              "qwen3-yarn": qwen.Config(**common, head_dim=16, rope_scale_factor=4.0, rope_original_context=32,
                                        tie_word_embeddings=False),
              "qwen3_moe": qwen.Config(**common, n_experts=6, n_experts_per_tok=2, moe_intermediate_size=16,
                                       norm_topk_prob=False, mlp_only_layers=[0])}[kind]
    model = randomize(qwen.Qwen(config), seed=3)
    model.save_pretrained(tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "model.safetensors").keys()
    assert ("lm_head.weight" in keys) != config.tie_word_embeddings
    assert ("model.layers.1.mlp.experts.5.down_proj.weight" in keys) == (kind == "qwen3_moe")
    ref = hf_class(config.model_type).from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                       experts_implementation="eager", dtype=torch.float32).eval()
    idx = torch.randint(0, 101, (2, 256), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = max_diff(model(idx)[0], ref(idx).logits)
    print(f"{kind}: ours saved -> transformers max |diff| {diff:.2e}")
    assert diff <= 1e-4
    again = ours(tmp_path / "ours")
    assert again.config == config
    assert torch.equal(logits_of(model, idx), logits_of(again, idx))


@pytest.mark.parametrize("name", ["qwen3-yarn-tied", "moe-sparse-step"])
def test_transformers_own_save_loads(models, idx, tmp_path, name):
    """transformers 5 writes rope_parameters and num_local_experts (docs/FORMATS.md 0.2)."""
    hf_model, ref, _ = models[name]
    hf_model.save_pretrained(tmp_path / "hf")
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_scaling" not in saved
    assert ("num_local_experts" in saved and "num_experts" not in saved) == name.startswith("moe")
    model = ours(tmp_path / "hf")
    assert model.config == qwen.Config.from_hf(CONFIGS[name])
    assert max_diff(logits_of(model, idx), ref) <= 1e-4


# ---- presets and sizes


def test_presets_round_trip_and_count_like_transformers():
    for name, config in qwen.PRESETS.items():
        assert qwen.Config.from_hf(config.to_hf()) == config, name
        assert qwen.HUB_IDS[name].startswith("Qwen/")
    assert qwen.HUB_IDS["qwen3-8b"] == "Qwen/Qwen3-8B-Base" and qwen.HUB_IDS["qwen3-8b-instruct"] == "Qwen/Qwen3-8B"
    for name in ("qwen2.5-0.5b", "qwen3-0.6b", "qwen3-30b-a3b"):
        config = qwen.PRESETS[name]
        with torch.device("meta"):
            ref = hf_class(config.model_type)(hf_class(config.model_type, "Config")(**config.to_hf()))
            model = qwen.Qwen(config)
        assert model.num_params() == ref.num_parameters(), name


def test_qwen3_30b_a3b_active_parameters_on_the_meta_device():
    c = qwen.PRESETS["qwen3-30b-a3b"]
    with torch.device("meta"):
        model = qwen.Qwen(c)
    total, active = model.num_params(), model.num_params(active=True)
    skipped = c.n_layer * (c.n_experts - c.n_experts_per_tok) * 3 * c.moe_intermediate_size * c.n_embd
    assert active == total - skipped
    assert 30.3e9 < total < 30.7e9 and 3.2e9 < active < 3.45e9   # the model card: 30.5B total, 3.3B activated
    embed = c.vocab_size * c.n_embd
    assert model.flops_per_token(1024) == 6 * (active - embed) + 12 * c.n_layer * c.n_head * c.head_dim * 1024


def test_default_config_is_a_small_dense_qwen3():
    c = qwen.Config()
    assert (c.model_type, c.n_experts, c.qk_norm, c.attention_bias, c.n_embd, c.n_layer) == ("qwen3", 0, True, False,
                                                                                             128, 4)
    model = qwen.Qwen(c)
    assert model.num_params(active=True) == model.num_params() < 2_000_000
    assert all((m.weight == 1).all() for n, m in model.named_modules() if n.endswith(("q_norm", "k_norm")))
    biased = qwen.Qwen(qwen.Config(model_type="qwen2", attention_bias=True, qk_norm=False))
    assert all((m.bias == 0).all() for n, m in biased.named_modules() if n.endswith(("q_proj", "k_proj", "v_proj")))


# ---- bad input: one clear line naming what is wrong


def test_expert_count_contradicting_the_weights_names_the_key(models, tmp_path):
    hf_model, _, _ = models["moe-norm"]
    write_hf(hf_model, MOE | {"num_experts": 4}, tmp_path / "fewer")
    with pytest.raises(errors.BadInput, match=r"unexpected key 'model.layers.0.mlp.experts.4.down_proj.weight'.*"
                                         r"num_experts=4"):
        ours(tmp_path / "fewer")
    write_hf(hf_model, MOE | {"num_experts": 16}, tmp_path / "more")
    with pytest.raises(errors.BadInput, match=r"'model.layers.0.mlp.gate.weight' has shape \(8, 64\), config.json "
                                         r"implies \(16, 64\)"):
        ours(tmp_path / "more")
    write_hf(hf_model, MOE | {"num_experts_per_tok": 9}, tmp_path / "topk")
    with pytest.raises(errors.BadInput, match=r"config.json: n_experts_per_tok=9 \(num_experts_per_tok\) must be "
                                         r"between 1 and n_experts=8"):
        ours(tmp_path / "topk")


def test_missing_expert_weights_name_the_key(models, tmp_path):
    hf_model, _, _ = models["moe-norm"]
    d = write_hf(hf_model, MOE, tmp_path)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(sd, d / "model.safetensors")
    with pytest.raises(errors.BadInput, match=r"lack key 'model.layers.1.mlp.experts.5.up_proj.weight'"):
        ours(d)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(model_type="mistral"), "model_type 'mistral', expected 'qwen3' or 'qwen2' or 'qwen3_moe'"),
    (lambda c: c.update(use_sliding_window=True), "sets use_sliding_window=true for model_type 'qwen3_moe'"),
    (lambda c: c.update(attention_bias=True), "sets attention_bias=true for model_type 'qwen3_moe'"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act 'gelu' is not Qwen's silu"),
    (lambda c: c.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
     "rope_scaling: rope type 'dynamic'"),
    (lambda c: c.update(rope_scaling=YARN | {"factor": -1}), "'rope_scaling.factor' is -1: expected a finite number"),
    (lambda c: c.pop("moe_intermediate_size"), "lacks key 'moe_intermediate_size'"),
    (lambda c: c.pop("num_experts"), "lacks key 'num_experts'"),
    (lambda c: c.update(mlp_only_layers=["1"]), "'mlp_only_layers' is ['1']: expected a token id or a list"),
], ids=["model_type", "sliding", "qwen3-bias", "act", "rope-type", "rope-factor", "moe-width", "experts", "only"])
def test_bad_config_json_names_the_file_and_the_key(tmp_path, edit, message):
    config = dict(MOE)
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.BadInput, match=re.escape(f"{tmp_path / 'config.json'}: {message}")):
        ours(tmp_path)


def test_config_combinations_the_official_schemas_cannot_hold():
    assert qwen.Config(n_experts=4).model_type == "qwen3_moe"   # a Qwen3 with experts is a Qwen3-MoE
    for bad in (dict(model_type="qwen2"), dict(attention_bias=True), dict(qk_norm=False),
                dict(model_type="qwen2", attention_bias=True, qk_norm=False, n_experts=4), dict(model_type="llama")):
        with pytest.raises(ValueError, match="expected 'qwen2' .biases, no experts., 'qwen3' or 'qwen3_moe'"):
            qwen.Config(**bad)
