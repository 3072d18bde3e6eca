"""gpt2.py against transformers' GPT2LMHeadModel on tiny random checkpoints in the official layout."""
import json
import re

import pytest
import torch
from safetensors.torch import save_file

import errors
import gpt2

transformers = pytest.importorskip("transformers")

HF_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 97, "n_positions": 128,
             "n_ctx": 128, "n_embd": 64, "n_layer": 3, "n_head": 4, "n_inner": None,
             "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
             "attn_pdrop": 0.0, "bos_token_id": 96, "eos_token_id": 96}


def random_hf_model(seed=0):
    """A GPT2LMHeadModel with every parameter random, LayerNorm gains and biases included."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def write_official(model, directory, prefix=""):
    """The layout of openai-community/gpt2: no prefix, Conv1D [in, out], attn.bias buffers, no lm_head."""
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    n_pos = HF_CONFIG["n_positions"]
    for i in range(HF_CONFIG["n_layer"]):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos)).view(1, 1, n_pos, n_pos)
    save_file({prefix + k: v for k, v in sd.items()}, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    return directory


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model()


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, HF_CONFIG["vocab_size"], (2, 96), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_logits_match_transformers(hf_model, idx, tmp_path, prefix):
    ours = gpt2.GPT.from_pretrained(str(write_official(hf_model, tmp_path / "ckpt", prefix))).eval()
    with torch.no_grad():
        logits, _ = ours(idx)
    assert (logits - hf_logits(hf_model, idx)).abs().max().item() <= 1e-4


def test_loss_matches_transformers(hf_model, idx, tmp_path):
    ours = gpt2.GPT.from_pretrained(str(write_official(hf_model, tmp_path / "ckpt"))).eval()
    targets = idx.roll(-1, dims=1)
    targets[:, -5:] = -100
    with torch.no_grad():
        _, loss = ours(idx, targets)
        ref = torch.nn.functional.cross_entropy(hf_logits(hf_model, idx).view(-1, 97), targets.view(-1))
    assert abs(loss.item() - ref.item()) <= 1e-5


def test_tied_head_is_one_parameter(hf_model, tmp_path):
    for model in (gpt2.GPT(gpt2.Config()), gpt2.GPT.from_pretrained(str(write_official(hf_model, tmp_path / "c")))):
        assert model.lm_head.weight is model.wte.weight
        # counted once: the state dict lists the shared tensor under both names
        assert model.num_params() == sum(t.numel() for t in model.state_dict().values()) - model.wte.weight.numel()


def test_kv_cache_equals_full_recomputation(hf_model, idx, tmp_path):
    model = gpt2.GPT.from_pretrained(str(write_official(hf_model, tmp_path / "ckpt"))).eval()
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.init_cache(2, idx.size(1))
        # a prompt in uneven chunks, then token by token
        pieces, pos = [], 0
        for n in (20, 13, 1, 30):
            out, _ = model(idx[:, pos:pos + n], cache=cache, pos=pos)
            pieces.append(out)
            pos += n
        while pos < idx.size(1):
            out, _ = model(idx[:, pos:pos + 1], cache=cache, pos=pos)
            pieces.append(out)
            pos += 1
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_last_only_logits_are_the_last_row_of_the_full_logits(hf_model, idx, tmp_path):
    """What sample.generate asks for at the prefill and at every step; training keeps every position."""
    model = gpt2.GPT.from_pretrained(str(write_official(hf_model, tmp_path / "ckpt"))).eval()
    with torch.no_grad():
        full, _ = model(idx)
        last, _ = model(idx, last_only=True)
        cache = model.init_cache(2, idx.size(1))
        prefill, _ = model(idx[:, :50], cache=cache, pos=0, last_only=True)
        step, _ = model(idx[:, 50:51], cache=cache, pos=50, last_only=True)
    assert last.shape == prefill.shape == step.shape == (2, 1, HF_CONFIG["vocab_size"])
    for got, row in ((last, full.size(1) - 1), (prefill, 49), (step, 50)):
        assert (got - full[:, row:row + 1]).abs().max().item() <= 1e-5


def test_saved_checkpoint_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    model = gpt2.GPT(gpt2.Config(vocab_size=101, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path / "ours")
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    idx = torch.randint(0, 101, (1, 64))
    with torch.no_grad():
        assert (model(idx)[0] - ref(idx).logits).abs().max().item() <= 1e-4
    again = gpt2.GPT.from_pretrained(str(tmp_path / "ours")).eval()
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])


def test_context_length_error():
    model = gpt2.GPT(gpt2.Config(vocab_size=50, block_size=16, n_layer=1, n_head=1, n_embd=8))
    with pytest.raises(ValueError, match="exceeds the context length block_size=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_config_round_trip():
    for name, cfg in gpt2.PRESETS.items():
        assert gpt2.Config.from_hf(cfg.to_hf()) == cfg, name
    assert gpt2.GPT(gpt2.PRESETS["gpt2"]).num_params() == 124_439_808   # the published 124M count


# ---- bad checkpoints: one clear line naming what is wrong


def test_missing_config(tmp_path, hf_model):
    d = write_official(hf_model, tmp_path / "c")
    (d / "config.json").unlink()
    with pytest.raises(Exception, match="config.json"):
        gpt2.GPT.from_pretrained(str(d))


def test_missing_weights(tmp_path, hf_model):
    d = write_official(hf_model, tmp_path / "c")
    (d / "model.safetensors").unlink()
    with pytest.raises(Exception, match="safetensors"):
        gpt2.GPT.from_pretrained(str(d))


def _rewrite(d, edit):
    from safetensors.torch import load_file
    sd = load_file(d / "model.safetensors")
    edit(sd)
    save_file(sd, d / "model.safetensors")
    return d


def test_missing_key(tmp_path, hf_model):
    d = _rewrite(write_official(hf_model, tmp_path / "c"), lambda sd: sd.pop("h.1.mlp.c_fc.bias"))
    with pytest.raises(errors.BadInput, match=r"lack key 'h.1.mlp.c_fc.bias'"):
        gpt2.GPT.from_pretrained(str(d))


def test_unexpected_key(tmp_path, hf_model):
    d = _rewrite(write_official(hf_model, tmp_path / "c"), lambda sd: sd.update({"h.0.attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(errors.BadInput, match=r"unexpected key 'h.0.attn.q_norm.weight'"):
        gpt2.GPT.from_pretrained(str(d))


def test_wrong_shape_names_key_and_both_shapes(tmp_path, hf_model):
    d = _rewrite(write_official(hf_model, tmp_path / "c"), lambda sd: sd.update({"wpe.weight": torch.zeros(64, 64)}))
    with pytest.raises(errors.BadInput, match=r"'wpe.weight' has shape \(64, 64\), config.json implies \(128, 64\)"):
        gpt2.GPT.from_pretrained(str(d))


def test_weights_of_another_family(tmp_path, hf_model):
    d = write_official(hf_model, tmp_path / "c")
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(errors.BadInput, match="model_type 'llama', expected 'gpt2'"):
        gpt2.GPT.from_pretrained(str(d))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("n_layer"), "lacks key 'n_layer'"),
    (lambda c: c.update(n_head="4"), "'n_head' is '4': expected an integer >= 1"),
    (lambda c: c.update(n_head=0), "'n_head' is 0: expected an integer >= 1"),
    (lambda c: c.update(n_layer=True), "'n_layer' is True: expected an integer >= 1"),
    (lambda c: c.update(n_embd=66), "n_embd=66 must be a multiple of n_head=4"),
    (lambda c: c.update(layer_norm_epsilon=float("nan")), "'layer_norm_epsilon' is nan: expected a finite number > 0"),
    (lambda c: c.update(eos_token_id="<eos>"), "'eos_token_id' is '<eos>': expected a token id"),
], ids=["missing", "string", "zero", "bool", "indivisible", "nan", "eos-string"])
def test_bad_config_json_names_the_file_and_the_key(tmp_path, edit, message):
    config = dict(HF_CONFIG)
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.BadInput, match=re.escape(f"{tmp_path / 'config.json'}: {message}")):
        gpt2.GPT.from_pretrained(str(tmp_path))


def test_config_json_that_is_no_object_or_has_nulls(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(errors.BadInput, match="config.json: expected a JSON object, got list"):
        gpt2.GPT.from_pretrained(str(tmp_path))
    # null stands for the default, as in transformers: n_positions falls back to n_ctx
    config = gpt2.Config.from_hf(HF_CONFIG | {"n_positions": None, "layer_norm_epsilon": None, "eos_token_id": None})
    assert (config.block_size, config.layer_norm_epsilon, config.eos_token_id) == (128, 1e-5, None)
