"""sample.py: filtering equals transformers' warpers, the cache changes nothing, the CLI streams and stops."""
import json

import numpy as np
import pytest
import torch

import bpe
import gpt2
import prepare_data
import sample
import train

transformers = pytest.importorskip("transformers")


def tiny_model(vocab_size=257, eos=256, seed=0):
    torch.manual_seed(seed)
    model = gpt2.GPT(gpt2.Config(vocab_size=vocab_size, block_size=96, n_layer=2, n_head=2, n_embd=32,
                                 eos_token_id=eos)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.9), (None, 0.3), (40, 0.8), (1, None)])
def test_filter_equals_transformers_warpers(top_k, top_p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0)) * 3
    ref = logits.clone()
    if top_k is not None:
        ref = transformers.TopKLogitsWarper(top_k)(None, ref)
    if top_p is not None:
        ref = transformers.TopPLogitsWarper(top_p)(None, ref)
    ours = sample.filter_logits(logits, top_k, top_p)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.equal(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_cache_and_no_cache_generate_the_same_tokens():
    model = tiny_model()
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with_cache = torch.stack(list(sample.generate(model, prompt, 60, temperature=0)), 1)
    without = torch.stack(list(sample.generate(model, prompt, 60, temperature=0, use_cache=False)), 1)
    assert torch.equal(with_cache, without)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = torch.stack(list(sample.generate(model, prompt, 30, temperature=1.0, top_k=50, generator=g1)), 1)
    b = torch.stack(list(sample.generate(model, prompt, 30, temperature=1.0, top_k=50, generator=g2, use_cache=False)), 1)
    assert torch.equal(a, b)


def test_greedy_equals_transformers_generate(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    ours = torch.stack(list(sample.generate(model, prompt, 40, temperature=0)), 1)
    ref = hf.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False, pad_token_id=0)[:, 5:]
    assert torch.equal(ours, ref)


def test_stops_at_eos():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3]])
    first = [int(t) for t in sample.generate(model, prompt, 20, temperature=0)]
    eos = first[4]
    got = [int(t) for t in sample.generate(model, prompt, 20, temperature=0, eos_ids={eos})]
    assert got == first[:first.index(eos) + 1]


def test_long_prompt_is_left_truncated_with_a_warning(capsys):
    ids, new = sample.fit_prompt(list(range(100)), 30, context=96)
    assert ids == list(range(34, 100)) and new == 30
    assert "only its last 66 are kept" in capsys.readouterr().err
    ids, new = sample.fit_prompt([1, 2], 500, context=96)
    assert new == 95 and ids == [2]


def test_cli_streams_a_trained_checkpoint(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("the cat sat on the mat. " * 400)
    (src / "b.txt").write_text("the dog sat on the log. " * 40)
    data = prepare_data.prepare(input=str(src), tokenizer="bytes", out_dir=str(tmp_path / "data"))
    args, module = train.parse_args(["--model", "gpt2", "--data", str(data), "--out_dir", str(tmp_path / "out"),
                                     "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64",
                                     "--seq_len", "32", "--batch_size", "8", "--max_steps", "30", "--lr", "1e-2",
                                     "--eval_interval", "30", "--eval_iters", "1", "--sample_tokens", "20"])
    train.train(args, module)
    assert "--- sample" in capsys.readouterr().out
    ckpt = tmp_path / "out" / "last"
    sample.main([str(ckpt), "--prompt", "the cat", "--max_new_tokens", "20", "--temperature", "0"])
    out = capsys.readouterr().out
    tok = bpe.load(ckpt)
    model = gpt2.GPT.from_pretrained(str(ckpt)).eval()
    ids = [int(t) for t in sample.generate(model, torch.tensor([tok.encode("the cat")]), 20, temperature=0,
                                           eos_ids={256})]
    assert out == "the cat" + tok.decode([t for t in ids if t != 256]) + "\n"


def test_cli_bad_input(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        sample.main([str(tmp_path)])
    model = tiny_model(vocab_size=100, eos=99)
    model.save_pretrained(tmp_path / "m")
    bpe.train("", 257, special_tokens={"<|endoftext|>": 256}).save(tmp_path / "m" / bpe.SAVE_NAME)
    with pytest.raises(SystemExit, match="prompt token id 1.. is beyond the model's vocab_size 100"):
        sample.main([str(tmp_path / "m"), "--prompt", "zzz"])


def test_preset_is_fetched_from_the_hub_and_sampled(tmp_path, monkeypatch, capsys):
    """`sample.py gpt2` end to end: preset -> hub id -> download (a local fake hub) -> official layout -> text."""
    from conftest import shared_file
    from test_hub import FakeHub
    gpt2_files = shared_file("gpt2", "encoder.json").parent
    model = tiny_model(vocab_size=50257, eos=50256)
    model.save_pretrained(tmp_path / "repo")
    files = {p.name: p.read_bytes() for p in (tmp_path / "repo").iterdir()}
    files |= {name: (gpt2_files / name).read_bytes() for name in ("encoder.json", "vocab.bpe")}
    server = FakeHub(files, repo=gpt2.HUB_IDS["gpt2"])
    monkeypatch.setattr(sample.hub, "ENDPOINT", server.url)
    monkeypatch.setattr(sample.hub, "CACHE_DIR", tmp_path / "cache")
    try:
        sample.main(["gpt2", "--prompt", "Hello, world", "--max_new_tokens", "12", "--temperature", "0"])
    finally:
        server.close()
    tok = bpe.load(gpt2_files)
    ids = [int(t) for t in sample.generate(model, torch.tensor([tok.encode("Hello, world")]), 12, temperature=0,
                                           eos_ids={50256})]
    assert capsys.readouterr().out == "Hello, world" + tok.decode([t for t in ids if t != 50256]) + "\n"


def test_chat_keeps_the_history(tmp_path, monkeypatch, capsys):
    """sample.py --chat: each turn is encoded with the model's chat format and the whole history so far."""
    import llama3
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = bpe.train("user assistant hello there, how are you? fine thanks\n\n" * 20, 290, special_tokens=specials)
    torch.manual_seed(0)
    model = llama3.Llama(llama3.Config(vocab_size=300, block_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                                       eos_token_id=tok.special_tokens["<|eot_id|>"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    tok.save(tmp_path / bpe.SAVE_NAME)
    turns = iter(["hello there", "how are you?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    seen = []
    encode_chat = llama3.encode_chat
    monkeypatch.setattr(llama3, "encode_chat", lambda t, m, **kw: seen.append([dict(x) for x in m]) or encode_chat(t, m, **kw))
    sample.main([str(tmp_path), "--chat", "--temperature", "0", "--max_new_tokens", "6"])

    def reply(messages):   # greedy, independently of sample.py's chat loop
        ids = encode_chat(tok, messages)
        out = [int(t) for t in sample.generate(model, torch.tensor([ids]), 6, temperature=0, eos_ids=sample.eos_ids_of(model, tok))]
        return tok.decode([t for t in out if t not in sample.eos_ids_of(model, tok)])
    first = reply([{"role": "user", "content": "hello there"}])
    assert first.strip()   # a real reply, not an immediate end of turn
    history = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": first.strip()},
               {"role": "user", "content": "how are you?"}]
    assert seen == [history[:1], history]
    assert capsys.readouterr().out == first + reply(history)
