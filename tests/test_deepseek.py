"""deepseek.py against transformers' DeepseekV2ForCausalLM and DeepseekV3ForCausalLM on tiny random checkpoints written
here in the official layout (hub-style config.json, per-expert keys, every parameter random, the V3 correction bias
too), plus its own paths (absorbed decoding, grouped experts, routers), FP8 loading and the training extras."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import deepseek
import errors
from components.moe import sigmoid_topk, softmax_topk
from conftest import official_state, randomize

transformers = pytest.importorskip("transformers")

T = 64   # long enough for YaRN, mscale and the routing to show (docs/FORMATS.md 2.4)
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
BASE = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 12,
        "moe_intermediate_size": 24, "n_routed_experts": 8, "num_experts_per_tok": 3, "first_k_dense_replace": 1}
V3 = BASE | {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "q_lora_rank": 24,
             "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
             "norm_topk_prob": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
             "rope_scaling": YARN | {"mscale": 1.0, "mscale_all_dim": 1.0}}
V2 = BASE | {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "q_lora_rank": 24,
             "n_shared_experts": 2, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 16.0,
             "norm_topk_prob": False, "scoring_func": "softmax", "topk_method": "group_limited_greedy",
             "rope_scaling": YARN | {"mscale": 0.707, "mscale_all_dim": 0.707}}
V2_LITE = V2 | {"q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
                "routed_scaling_factor": 1.0}
CONFIGS = {"v3": V3, "v2": V2, "v2-lite": V2_LITE}


def hf_class(model_type, suffix="ForCausalLM"):
    return getattr(transformers, {"deepseek_v2": "DeepseekV2", "deepseek_v3": "DeepseekV3"}[model_type] + suffix)


def random_hf_model(config, seed=0):
    """A fp32 eager transformers model with every parameter random: norm gains ~ 1 +- 0.1, router, experts, and the
    correction bias (a buffer), large enough to change the choice."""
    torch.manual_seed(seed)
    hf_config = hf_class(config["model_type"], "Config")(**config, attn_implementation="eager",
                                                          experts_implementation="eager")
    model = hf_class(config["model_type"])(hf_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model.eval()


def write_hf(sd, config, directory):
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def max_diff(a, b):
    return (a - b).abs().max().item()


def logits_of(model, idx):
    with torch.no_grad():
        return model(idx)[0]


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
            out[name] = (model, model(idx).logits, write_hf(official_state(model), config,
                                                            tmp_path_factory.mktemp(name)))
    return out


def ours(directory, **kwargs):
    return deepseek.DeepSeek.from_pretrained(str(directory), **kwargs).eval()


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    config = deepseek.Config(**dict(vocab_size=128, n_layer=2, n_embd=48, n_head=3, intermediate_size=64,
                                    q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                    v_head_dim=8, n_routed_experts=8, n_experts_per_tok=2,
                                    moe_intermediate_size=16, block_size=128) | kw)
    return deepseek.DeepSeek(config)


# ---- logits equal transformers'


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(models, idx, name):
    hf_model, ref, directory = models[name]
    model = ours(directory)
    diff = max_diff(logits_of(model, idx), ref)
    print(f"{name}: max |diff| {diff:.2e}")
    assert diff <= 1e-4
    assert model.num_params() == sum(p.numel() for p in hf_model.parameters())
    assert [type(b.mlp).__name__ for b in model.model.layers] == ["MLP", "MoE", "MoE"]
    assert (model.config.q_lora_rank is None) == (name == "v2-lite")


@pytest.mark.parametrize("name,edit", [
    ("v3", {"rope_scaling": None}),                                   # YaRN and mscale dropped
    ("v3", {"routed_scaling_factor": 1.0}),
    ("v3", {"n_group": 1, "topk_group": 1}),                          # groups ignored
    ("v2", {"topk_method": "greedy"}),                                # group limit ignored (top_k > topk_group)
    ("v2-lite", {"rope_scaling": YARN | {"mscale": 1.0, "mscale_all_dim": 1.0}}),
])
def test_logits_see_the_config(models, idx, tmp_path, name, edit):
    """The parity test can fail: each of these config mistakes moves the logits far past its tolerance."""
    _, ref, directory = models[name]
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "model.safetensors").symlink_to(directory / "model.safetensors")
    (edited / "config.json").write_text(json.dumps(CONFIGS[name] | edit))
    assert max_diff(logits_of(ours(edited), idx), ref) > 1e-2


def test_save_pretrained_loads_in_transformers(models, idx, tmp_path):
    for name in ("v3", "v2"):
        _, ref, directory = models[name]
        ours(directory).save_pretrained(tmp_path / name)
        again = hf_class(CONFIGS[name]["model_type"]).from_pretrained(
            tmp_path / name, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32).eval()
        assert max_diff(logits_of(again, idx), ref) <= 1e-5
        assert max_diff(logits_of(ours(tmp_path / name), idx), ref) <= 1e-4


def test_config_round_trip_and_refusals():
    config = deepseek.Config.from_hf(V3)
    assert deepseek.Config.from_hf(config.to_hf()) == config
    tf5 = {k: v for k, v in V3.items() if k not in ("rope_scaling", "rope_theta")} | {
        "rope_parameters": YARN | {"rope_type": "yarn", "rope_theta": 10000.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "head_dim": 8, "qk_head_dim": 24, "num_local_experts": 8}   # transformers 5: head_dim is the rotary dim
    assert deepseek.Config.from_hf(tf5) == config
    assert deepseek.Config.from_hf(V2_LITE).q_lora_rank is None
    for edit, word in [({"n_routed_experts": 6}, "n_group"), ({"hidden_act": "gelu"}, "hidden_act"),
                       ({"kv_lora_rank": None}, "kv_lora_rank"), ({"scoring_func": "softmax"}, "scoring_func"),
                       ({"rope_interleave": False}, "rope_interleave"), ({"model_type": "llama"}, "model_type")]:
        with pytest.raises(ValueError, match=word):
            deepseek.Config.from_hf(V3 | edit)


def test_presets_and_active_params():
    assert deepseek.HUB_IDS["deepseek-v3"] == "deepseek-ai/DeepSeek-V3"
    assert set(deepseek.HUB_IDS) == set(deepseek.PRESETS) - set() and "deepseek-v2-lite-chat" in deepseek.HUB_IDS
    with torch.device("meta"):
        v3, lite = deepseek.DeepSeek(deepseek.PRESETS["deepseek-v3"]), deepseek.DeepSeek(
            deepseek.PRESETS["deepseek-v2-lite"])
    assert v3.num_params() == pytest.approx(671e9, rel=0.01)
    assert v3.num_params(active=True) == pytest.approx(37e9, rel=0.02)
    assert lite.num_params() == pytest.approx(15.7e9, rel=0.01)
    embedding = lite.model.embed_tokens.weight.numel()   # the paper's 2.4B leaves the lookup out (2.66B with it)
    assert lite.num_params(active=True) - embedding == pytest.approx(2.4e9, rel=0.03)
    assert v3.model.layers[0].self_attn.scale == pytest.approx(0.13523, abs=1e-5)   # FORMATS 1.8: 192^-0.5 m^2


# ---- our own paths


def test_absorbed_decoding_equals_recomputation():
    model = tiny(rope_scale_factor=4.0, rope_original_context=32, mscale=1.0, mscale_all_dim=0.7).eval()
    conftest_randomize(model)
    idx = torch.randint(0, 128, (2, 70), generator=torch.Generator().manual_seed(2))
    full = logits_of(model, idx)
    cache = model.init_cache(2, 70)
    assert cache[0].c.shape[1:] == (70, 16) and cache[0].k_pe.shape[1:] == (70, 8)   # per token: 16 + 8 numbers
    with torch.no_grad():
        steps = [model(idx[:, :60], cache=cache)[0]] + [model(idx[:, i:i + 1], cache=cache, pos=i)[0]
                                                         for i in range(60, 70)]
    assert max_diff(torch.cat(steps, 1), full) <= 1e-4
    with torch.no_grad():   # a chunk after a chunk (the mask across the cache)
        cache = model.init_cache(2, 70)
        model(idx[:, :40], cache=cache)
        assert max_diff(model(idx[:, 40:], cache=cache, pos=40)[0], full[:, 40:]) <= 1e-4
    assert deepseek.DeepSeek.init_cache.__doc__ and len(model.init_cache(1, 8)) == model.config.n_layer


def conftest_randomize(model):
    return randomize(model, scale=0.2)


@pytest.mark.parametrize("kind", ["v3", "v2-group", "v2-greedy"])
def test_moe_equals_a_per_token_loop_and_router_equals_components(kind):
    kw = {"v3": dict(n_group=4, topk_group=2, n_experts_per_tok=3, routed_scaling_factor=2.5),
          "v2-group": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
                           norm_topk_prob=False, n_group=4, topk_group=2, n_experts_per_tok=3),
          "v2-greedy": dict(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy",
                            norm_topk_prob=False, n_shared_experts=0)}[kind]
    moe = tiny(**kw).model.layers[1].mlp
    conftest_randomize(moe)
    if kind == "v3":
        moe.gate.e_score_correction_bias.normal_(0, 0.3)
    x = torch.randn(2, 40, 48)
    with torch.no_grad():
        y = moe(x)
        weights, idx, _ = moe.gate(x.flatten(0, 1))
        logits = x.flatten(0, 1) @ moe.gate.weight.T
        if kind == "v3":
            w_ref, i_ref = sigmoid_topk(logits, 3, moe.gate.e_score_correction_bias, 4, 2, True, 2.5)
        elif kind == "v2-greedy":
            w_ref, i_ref = softmax_topk(logits, 2, renormalize=False)
        else:   # group-limited greedy, written out: groups by their best probability
            p = logits.softmax(-1)
            keep = p.view(-1, 4, 2).amax(-1).topk(2, -1).indices
            allowed = torch.zeros(p.size(0), 4, dtype=torch.bool).scatter_(1, keep, True).repeat_interleave(2, 1)
            w_ref, i_ref = p.masked_fill(~allowed, 0).topk(3, -1)
        order, order_ref = idx.sort(-1), i_ref.sort(-1)
        assert torch.equal(order.values, order_ref.values)
        assert max_diff(weights.gather(1, order.indices), w_ref.gather(1, order_ref.indices)) <= 1e-6
        ref = torch.zeros(80, 48)   # per token, per chosen expert
        for n, xn in enumerate(x.flatten(0, 1)):
            for w, e in zip(weights[n], idx[n]):
                h = F.silu(moe.experts.gate_proj[e] @ xn) * (moe.experts.up_proj[e] @ xn)
                ref[n] += w * (moe.experts.down_proj[e] @ h)
        ref = ref.view(2, 40, 48) + (moe.shared_experts(x) if moe.shared_experts is not None else 0)
    assert max_diff(y, ref) <= 1e-5
    assert moe.load.sum() == 80 * moe.top_k


# ---- FP8 checkpoints


def quantize(w):
    """Blockwise 128x128 E4M3 as the README describes it, block by block; returns (fp8, scale_inv)."""
    M, N = w.shape
    q, s = torch.empty(M, N, dtype=torch.float8_e4m3fn), torch.empty(math.ceil(M / 128), math.ceil(N / 128))
    for i in range(s.size(0)):
        for j in range(s.size(1)):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            s[i, j] = block.abs().max().clamp(min=1e-12) / 448.0
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def dequantize(q, s):
    out = torch.empty(q.shape)
    for i in range(s.size(0)):
        for j in range(s.size(1)):
            out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = q[i * 128:(i + 1) * 128,
                                                                  j * 128:(j + 1) * 128].float() * s[i, j]
    return out


def test_fp8_checkpoint_gives_its_dequantized_twin(tmp_path, idx):
    config = V3 | {"hidden_size": 160, "intermediate_size": 272, "num_hidden_layers": 2, "num_nextn_predict_layers": 1}
    sd = official_state(random_hf_model(config))
    fp8, twin = {}, {}
    for k, v in sd.items():
        if v.dim() == 2 and ("self_attn." in k or ".mlp." in k and ".mlp.gate." not in k):
            q, s = quantize(v)
            fp8 |= {k: q, k + "_scale_inv": s}
            twin[k] = dequantize(q, s)
        else:
            fp8[k] = twin[k] = v
    assert fp8["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (3, 2)   # 272 x 160: partial blocks
    mtp = {"model.layers.2.enorm.weight": torch.ones(160), "model.layers.2.eh_proj.weight": torch.zeros(160, 320)}
    a = ours(write_hf(fp8 | mtp, config, tmp_path / "fp8"))   # the MTP layer is skipped
    b = ours(write_hf(twin, config, tmp_path / "twin"))
    assert max_diff(logits_of(a, idx), logits_of(b, idx)) <= 1e-5
    assert a.model.layers[0].self_attn.q_a_proj.weight.dtype == torch.float32
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    for edit, words in [({key + "_scale_inv": None}, [key, "no scale"]),
                        ({key + "_scale_inv": torch.ones(2, 2)}, [key, "(2, 2)", "(1, 1)"]),
                        ({key: torch.zeros(9, 32, dtype=torch.float8_e4m3fn)}, [key, "(9, 32)"])]:
        bad = {k: v for k, v in (fp8 | edit).items() if v is not None}
        with pytest.raises(errors.BadInput) as e:
            ours(write_hf(bad, config, tmp_path / "bad"))
        assert all(w in str(e.value) for w in words), str(e.value)


# ---- training extras


def train(model, steps, seed=0, lr=3e-3):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        x = torch.randint(0, 16, (4, 32), generator=g) * 2   # a learnable pattern: even ids, then their successor
        x[:, 1::2] = x[:, ::2] + 1
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if model.config.bias_update_rate > 0:
            model.update_expert_bias()
        losses.append(model.mtp_loss.item() if model.config.mtp_loss_weight > 0 else loss.item())
    return losses


def test_bias_update_balances_the_load():
    def cv(rate):
        model = tiny(bias_update_rate=rate, n_layer=2)
        with torch.no_grad():   # a router that starts badly skewed
            model.moe[0].gate.weight.add_(torch.linspace(-0.3, 0.3, 8)[:, None])
            model.moe[0].gate.weight[:, :1] = torch.linspace(-3, 3, 8)[:, None]
        train(model, 30)
        load = model.expert_load().float()
        bias = model.moe[0].gate.e_score_correction_bias
        return (load.std(-1) / load.mean(-1)).mean().item(), bias
    balanced, bias = cv(0.01)
    skewed, no_bias = cv(0.0)
    assert balanced < skewed and torch.count_nonzero(no_bias) == 0
    assert bias[0] > bias[-1]   # the under-chosen end was raised
    assert "e_score_correction_bias" not in dict(tiny().named_parameters()).keys()


def test_mtp_and_aux_losses(tmp_path):
    model = tiny(mtp_loss_weight=0.5, router_aux_loss_coef=0.01, bias_update_rate=0.0)
    losses = train(model, 40, lr=1e-2)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert model.aux_loss is not None and model.aux_loss.item() > 0
    assert tiny().aux_loss is None and model.num_params() == tiny().num_params()   # MTP not counted
    model.save_pretrained(tmp_path)
    again = ours(tmp_path)
    assert again.config == model.config and again.model.layers[2].eh_proj.weight.equal(
        model.model.layers[2].eh_proj.weight)
