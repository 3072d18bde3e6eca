"""classifier.py: each family's classifier checkpoint loads in transformers' AutoModelForSequenceClassification with
equal logits (the oracle) and back in ours, the pooling is transformers' rule, a tiny task trains, and prepare()
writes what ClassData reads, with one line naming the file:line or column for each bad input."""
import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import classifier
import deepseek
import gpt2
import llama3
import prepare_data
import qwen
from conftest import randomize
from errors import BadInput

transformers = pytest.importorskip("transformers")

V, PAD = 101, 100   # the tiny models' vocabulary; its last id pads (the batches' tokens are all below it)
SMALL = dict(vocab_size=V, block_size=64, n_layer=2)
MODELS = {   # a tied and an untied head in each of Llama and Qwen; GPT-2 is always tied, DeepSeek-V3 untied
    "gpt2": lambda: gpt2.GPT(gpt2.Config(**SMALL, n_head=2, n_embd=32)),
    "llama3": lambda: llama3.Llama(llama3.Config(**SMALL, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)),
    "llama3-untied": lambda: llama3.Llama(llama3.Config(**SMALL, n_head=4, n_kv_head=2, n_embd=32,
                                                        intermediate_size=48, tie_word_embeddings=False)),
    "qwen3": lambda: qwen.Qwen(qwen.Config(**SMALL, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=48)),
    "qwen3_moe-untied": lambda: qwen.Qwen(qwen.Config(**SMALL, n_head=4, n_kv_head=2, n_embd=32, n_experts=6,
                                                      moe_intermediate_size=16, tie_word_embeddings=False)),
    "deepseek_v3": lambda: deepseek.DeepSeek(deepseek.Config(
        **SMALL, n_embd=48, n_head=3, intermediate_size=64, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, n_experts_per_tok=2, n_group=4, topk_group=2,
        moe_intermediate_size=16, first_k_dense_replace=1)),
}
LABELS = ["neg", "neutral", "pos"]


def padded_batch():
    """(3, 12) ids of 12, 7 and 1 real tokens, padded on the right with PAD."""
    ids = torch.randint(0, PAD, (3, 12), generator=torch.Generator().manual_seed(1))
    for row, n in enumerate((12, 7, 1)):
        ids[row, n:] = PAD
    return ids


def module_of(model):
    return {gpt2.GPT: gpt2, llama3.Llama: llama3, qwen.Qwen: qwen, deepseek.DeepSeek: deepseek}[type(model)]


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(classifier.attach_head(MODELS[request.param](), len(LABELS)), seed=2).eval()
    directory = tmp_path_factory.mktemp(request.param)
    classifier.save_pretrained(model, directory, LABELS, PAD)
    return request.param, model, directory


def test_logits_equal_transformers(saved):
    name, model, directory = saved
    moe = {"experts_implementation": "eager"} if "moe" in name or "deepseek" in name else {}
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32, **moe).eval()
    architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
    assert architecture.endswith("ForSequenceClassification") and type(ref).__name__ == architecture
    assert ref.config.id2label == dict(enumerate(LABELS)) and ref.config.pad_token_id == PAD
    ids = padded_batch()
    with torch.no_grad():
        ours, theirs = classifier.pooled_logits(model, ids, PAD), ref(ids, attention_mask=ids != PAD).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: pooled logits vs transformers max |diff| {diff:.2e}")
    assert ours.shape == (3, len(LABELS)) and diff <= 1e-4
    keys = load_file(directory / "model.safetensors").keys()
    assert "score.weight" in keys and "lm_head.weight" not in keys
    assert all(k.startswith("transformer." if name == "gpt2" else "model.") for k in keys - {"score.weight"})


def test_from_pretrained_round_trips(saved, tmp_path):
    name, model, directory = saved
    again = classifier.from_pretrained(module_of(model), directory).eval()
    ids = padded_batch()
    with torch.no_grad():
        assert torch.equal(classifier.pooled_logits(again, ids, PAD), classifier.pooled_logits(model, ids, PAD))
    assert again.num_labels == len(LABELS)
    assert getattr(again.config, "tie_word_embeddings", True) == getattr(model.config, "tie_word_embeddings", True)
    classifier.save_pretrained(again, tmp_path, LABELS, PAD)   # and saves again, the same files
    assert load_file(tmp_path / "model.safetensors").keys() == load_file(directory / "model.safetensors").keys()


@pytest.mark.parametrize("name", ["gpt2", "llama3"])
def test_a_transformers_classifier_loads_in_ours(tmp_path, name):
    config = {"gpt2": transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2),
              "llama3": transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2,
                                                 max_position_embeddings=64)}[name]
    config.num_labels, config.pad_token_id = len(LABELS), PAD
    ref = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    randomize(ref, seed=4).eval().save_pretrained(tmp_path)
    ours = classifier.from_pretrained({"gpt2": gpt2, "llama3": llama3}[name], tmp_path).eval()
    ids = padded_batch()
    with torch.no_grad():
        diff = (classifier.pooled_logits(ours, ids, PAD) - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_from_pretrained_refuses_a_wrong_checkpoint(tmp_path):
    classifier.save_pretrained(classifier.attach_head(MODELS["llama3"](), 3), tmp_path, LABELS, PAD)
    config, state = json.loads((tmp_path / "config.json").read_text()), load_file(tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config | {"num_labels": 2, "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(BadInput, match=r"config.json: num_labels 2 disagrees with the weights' 'score.weight'"):
        classifier.from_pretrained(llama3, tmp_path)
    del state["score.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(BadInput, match="lack key 'score.weight'"):
        classifier.from_pretrained(llama3, tmp_path)


def test_pooling_reads_the_last_non_pad_token():
    P = 9
    ids = torch.tensor([[5, 7, P, P], [1, 2, 3, 4], [P, 3, 4, P], [P, P, P, P]])
    # a stand-in model whose logits at (b, t) are (t, b): the pooled row shows which position was read
    fake = lambda x: (torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="xy"), -1), None)
    pooled = classifier.pooled_logits(fake, ids, P)
    assert pooled[:, 0].tolist() == [1, 3, 2, 0] and pooled[:, 1].tolist() == [0, 1, 2, 3]   # all pad: 0, as HF


def test_attach_head_unties_gpt2_and_refuses_mtp():
    model = classifier.attach_head(MODELS["gpt2"](), 4)
    assert model.lm_head.weight.shape == (4, 32) and model.wte.weight.shape == (V, 32)
    assert model(padded_batch())[0].shape == (3, 12, 4)
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        classifier.attach_head(deepseek.DeepSeek(deepseek.Config(n_layer=1, mtp_loss_weight=0.3)), 2)


# ---- a tiny task trains, through prepare() and ClassData


def test_tiny_gpt2_learns_whether_a_byte_occurs(tmp_path):
    g = np.random.default_rng(0)
    rows = []
    for i in range(1200):
        text = "".join(g.choice(list("abcdefgh"), g.integers(6, 17)))
        if i % 2:   # the marker anywhere but first: the label is in the middle of the text, not at its end
            at = g.integers(1, len(text))
            text = text[:at] + "x" + text[at + 1:]
        rows.append({"text": text, "label": "yes" if i % 2 else "no"})
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = classifier.prepare(tmp_path / "x.jsonl", "bytes", out_dir=tmp_path / "data", val_fraction=0.2)
    data = classifier.ClassData(out, vocab_size=257)
    assert data.labels == ["no", "yes"] and data.pad_id == 256 and (data.n("train"), data.n("val")) == (960, 240)
    torch.manual_seed(0)
    model = classifier.attach_head(gpt2.GPT(gpt2.Config(vocab_size=257, block_size=32, n_layer=1, n_head=2,
                                                        n_embd=32)), 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        loss, _ = classifier.loss(model, data.batch("train", step, 32), data.pad_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        _, stats = classifier.loss(model, (data.ids["val"].long(), data.targets["val"]), data.pad_id)
    print(f"val accuracy after 60 steps: {stats['accuracy']:.3f}")
    assert stats["accuracy"] >= 0.9


# ---- prepare() and ClassData


def write_csv(path, rows, header=("text", "label")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_prepare_csv_writes_what_class_data_reads(tmp_path):
    rows = [("héllo, world", "pos"), ("a\nmultiline one", "neg"), ("x" * 40, "pos"), ("bad", "neg"),
            ("fine", "pos"), ("meh", "neg")]
    out = classifier.prepare(write_csv(tmp_path / "r.csv", rows), "bytes", out_dir=tmp_path, max_len=16,
                             val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task"] == "classification" and meta["labels"] == ["neg", "pos"] and meta["pad_id"] == 256
    assert (meta["n_train"], meta["n_val"], meta["seq_len"], meta["truncated"]) == (5, 1, 16, 1)
    assert (out / "tokenizer").is_dir()
    ids, labels = np.load(out / "train.ids.npy"), np.load(out / "train.labels.npy")
    assert ids.dtype == np.int32 and ids.shape == (5, 16) and labels.dtype == np.int64
    assert bytes(ids[0][ids[0] != 256].tolist()).decode() == "héllo, world" and labels.tolist() == [1, 0, 1, 0, 1]
    assert ids[2].tolist() == [ord("x")] * 16   # truncated: the first max_len tokens
    data = classifier.ClassData(out, vocab_size=257)
    x, y = data.batch("train", seed=3, batch_size=6)
    assert x.dtype == y.dtype == torch.int64 and x.shape == (6, 16) and y.shape == (6,)
    halves = [data.batch("train", 3, 3, part=p, parts=2) for p in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), x) and torch.equal(torch.cat([h[1] for h in halves]), y)
    np.save(out / "val.labels.npy", np.array([5], dtype=np.int64))
    with pytest.raises(BadInput, match=r"val\.labels\.npy: class 5 beyond the 2 labels"):
        classifier.ClassData(out)
    (out / "val.ids.npy").write_bytes(b"not an array")
    with pytest.raises(BadInput, match=r"val\.ids\.npy: not a readable"):
        classifier.ClassData(out)


def test_prepare_jsonl_integer_labels_sort_by_value(tmp_path):
    rows = [{"t": f"text {i}", "y": y} for i, y in enumerate([10, 2, 0, 1, "2", 10, 0, 1, 2, 0, 10])]
    path = tmp_path / "n.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    out = classifier.prepare(path, "bytes", "t", "y", name="n", out_dir=tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["labels"] == ["0", "1", "2", "10"] and (meta["n_train"], meta["n_val"]) == (10, 1)
    assert np.load(out / "train.labels.npy").tolist() == [3, 2, 0, 1, 2, 3, 0, 1, 2, 0]


@pytest.mark.parametrize("case", ["json", "field", "column", "empty", "one_label", "val_label"])
def test_prepare_bad_input_is_one_line(tmp_path, case):
    good = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(9)]
    lines = [json.dumps(r) for r in good]
    path, expected = tmp_path / "d.jsonl", None
    if case == "json":
        lines[1] = '{"text": "t1", "label":'
        expected = f"{path}:2: not valid JSON"
    elif case == "field":
        lines[2] = json.dumps({"text": "t2"})
        expected = f"{path}:3: 'label' is missing"
    elif case == "column":
        path = write_csv(tmp_path / "d.csv", [("t", "a")] * 4, header=("text", "y"))
        expected = f"{path}: no column 'label' (columns: text, y)"
    elif case == "empty":
        lines[4] = json.dumps({"text": "  ", "label": "a"})
        expected = f"{path}:5: 'text' is empty"
    elif case == "one_label":
        lines = [json.dumps({"text": f"t{i}", "label": "a"}) for i in range(9)] + [json.dumps(good[1])]
        expected = f"{path}: the train split has 1 label ('a'); need at least 2"
    else:
        lines[-1] = json.dumps({"text": "t", "label": "c"})
        expected = f"{path}:9: val label 'c' is not in the train split's labels ['a', 'b']"
    if path.suffix == ".jsonl":
        path.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadInput) as e:
        classifier.prepare(path, "bytes", out_dir=tmp_path / "data")
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
    assert not (tmp_path / "data" / "d").exists()   # checked before anything is written


def test_prepare_again_replaces_the_dataset(tmp_path):
    if "train.ids.npy" not in prepare_data.DATASET_FILES:
        pytest.skip("prepare_data.DATASET_FILES does not list classifier's files yet: a second run is refused")
    path = write_csv(tmp_path / "r.csv", [("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")])
    classifier.prepare(path, "bytes", out_dir=tmp_path)
    path = write_csv(path, [("a", "x"), ("b", "y"), ("c", "x"), ("dd", "y"), ("e", "y")])
    out = classifier.prepare(path, "bytes", out_dir=tmp_path)
    assert classifier.ClassData(out).n("train") == 4
