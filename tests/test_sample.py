"""sample.py: filtering equals transformers' warpers, the cache changes nothing, the CLI streams and stops."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bpe
import errors
import gpt2
import llama3
import prepare_data
import sample
import train

from conftest import randomize

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


def tiny_llama(seed=0):
    model = llama3.Llama(llama3.Config(vocab_size=257, block_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                       eos_token_id=256)).eval()
    return randomize(model, seed=seed, scale=0.3)


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_asks_for_the_last_logits_and_picks_the_tokens_of_the_full_ones(family, use_cache):
    """generate passes last_only=True; the tokens are those of recomputing every position's logits each step."""
    model = tiny_model() if family == "gpt2" else tiny_llama()
    prompt = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))
    for sampling in (dict(temperature=0), dict(temperature=1.0, top_k=20, top_p=0.9)):
        got = sample.generate(model, prompt, 30, use_cache=use_cache, generator=torch.Generator().manual_seed(3),
                              **sampling)
        seq, generator = prompt, torch.Generator().manual_seed(3)
        for _ in range(30):
            with torch.no_grad():
                nxt = sample.sample_next(model(seq)[0][:, -1], generator=generator, **sampling)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        assert torch.equal(torch.stack(list(got), dim=1), seq[:, prompt.size(1):])


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


def padded_model(vocab_size=320, favorite=300):
    """A gpt2 whose vocab is padded past the bytes tokenizer's 257 ids, and whose logits always favor `favorite`."""
    model = gpt2.GPT(gpt2.Config(vocab_size=vocab_size, block_size=64, n_layer=1, n_head=1, n_embd=8,
                                 eos_token_id=256)).eval()
    with torch.no_grad():
        model.ln_f.weight.zero_()
        model.ln_f.bias.copy_(torch.linspace(-1, 1, 8))   # every position's final hidden state is this vector
        model.wte.weight[favorite] = 10 * model.ln_f.bias
    return model


def test_sampleable_masks_what_the_tokenizer_cannot_decode():
    tok = bpe.train("", 257, special_tokens={"<|endoftext|>": 256})
    allowed = sample.sampleable(tok, 320, eos_ids={310})
    assert allowed.tolist() == [True] * 257 + [False] * 53 + [True] + [False] * 9
    assert sample.sampleable(tok, 257) is None and sample.sampleable(tok, 100) is None   # nothing to mask


def test_undecodable_ids_are_never_sampled(capsys):
    model, tok = padded_model(), bpe.train("", 257, special_tokens={"<|endoftext|>": 256})
    prompt = torch.tensor([[104, 105]])
    assert {int(t) for t in sample.generate(model, prompt, 5, temperature=0)} == {300}   # unmasked: the padding id
    allowed = sample.sampleable(tok, 320)
    greedy = [int(t) for t in sample.generate(model, prompt, 5, temperature=0, allowed=allowed)]
    g = torch.Generator().manual_seed(0)
    sampled = [int(t) for t in sample.generate(model, prompt, 50, temperature=2.0, top_k=None, generator=g,
                                               allowed=allowed, eos_ids={256})]
    assert max(greedy + sampled) < 257
    # and the CLI's stream, which used to fail with KeyError: 300 in the decoder
    args = argparse.Namespace(max_new_tokens=5, temperature=0, top_k=None, top_p=None, no_cache=False)
    new = sample.stream(model, tok, [104, 105], args, None)
    assert new == greedy and capsys.readouterr().out == tok.decode(greedy)


def test_nan_weights_are_one_line_not_a_multinomial_error():
    model = tiny_model()
    with torch.no_grad():
        model.ln_f.weight[0] = float("nan")
    for temperature in (0, 1.0):   # argmax would pick junk, multinomial would raise (on CUDA: a device assert)
        with pytest.raises(errors.BadInput, match="logits are NaN or infinite.*--dtype float32"):
            list(sample.generate(model, torch.tensor([[1, 2]]), 3, temperature=temperature))


@pytest.mark.parametrize("argv,message", [
    (["--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0"),
    (["--temperature", "nan"], "--temperature nan: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf: expected a finite number >= 0"),
    (["--top_p", "0"], "--top_p 0.0: expected a number in (0, 1]"),
    (["--top_p", "1.5"], "--top_p 1.5: expected a number in (0, 1]"),
    (["--top_p", "nan"], "--top_p nan: expected a number in (0, 1]"),
    (["--top_k", "-1"], "--top_k -1: expected an integer >= 0"),
    (["--max_new_tokens", "-1"], "--max_new_tokens -1: expected an integer >= 0"),
    (["--num_samples", "0"], "--num_samples 0: expected an integer >= 1"),
    (["--seed", "-1"], "--seed -1: expected an integer in [0, 2**64)"),
    (["--seed", str(2**64)], f"--seed {2**64}: expected an integer in [0, 2**64)"),
    (["--rope_scale_factor", "0"], "--rope_scale_factor 0.0: expected a finite number > 0"),
    (["--rope_scale_factor", "inf"], "--rope_scale_factor inf: expected a finite number > 0"),
    (["--prompt", "a", "--prompt_file", "p.txt"], "--prompt and --prompt_file both given"),
    (["--chat", "--prompt", "a"], "--prompt with --chat"),
    (["--chat", "--prompt_file", "p.txt"], "--prompt_file with --chat"),
    (["--system", "be brief"], "--system is the system prompt of --chat"),
    (["--draft_tokens", "0"], "--draft_tokens 0: expected an integer >= 1"),
    (["--quantize", "int3"], "--quantize int3: expected int8 or int4"),
    (["--draft", "d", "--no_cache"], "--draft with --no_cache"),
    (["--compile", "--no_cache"], "--compile with --no_cache"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_flags_are_checked_before_anything_loads(argv, message):
    with pytest.raises(errors.BadInput, match=re.escape(message)):
        sample.parse_args(["no/such-model", *argv])


def test_flags_at_their_bounds_are_accepted():
    args = sample.parse_args(["x", "--temperature", "0", "--top_p", "1", "--top_k", "0", "--max_new_tokens", "0",
                              "--seed", str(2**64 - 1), "--chat", "--system", "be brief"])
    assert (args.temperature, args.top_p, args.top_k, args.max_new_tokens) == (0, 1, None, 0)


def test_main_raises_bad_input_and_keeps_tracebacks_of_bugs(cli_dir, tmp_path, monkeypatch):
    with pytest.raises(errors.BadInput, match="config.json: not found.*pass --model gpt2 or llama3"):
        sample.main([str(tmp_path)])
    # a programming error is no bad input: it keeps its type and its traceback
    monkeypatch.setattr(sample, "stream", lambda *a, **kw: int("a bug"))
    with pytest.raises(ValueError, match="invalid literal"):
        sample.main([str(cli_dir / "ckpt"), "--prompt", "a"])


# ---- bad input at the CLI: one line `error: ...` naming the flag or file, exit status 1, no traceback

ROOT = Path(__file__).resolve().parent.parent
# id: (argv, with {d} for the cli_dir fixture's folder; what the error line must contain). In a subprocess: what
# only the real entry point shows (argv decoding, environment variables, devices, the exit status) and one case of
# each kind of file; each run pays ~1.5 s for importing torch, so the rest run in-process (MAIN_CASES).
CLI_CASES = {
    "temperature": (["{d}/ckpt", "--temperature", "-1"], "--temperature -1.0: expected a finite number >= 0"),
    "dtype": (["{d}/ckpt", "--dtype", "float8"], "--dtype 'float8'"),
    "device-absent": (["{d}/ckpt", "--device", "cuda"], "--device cuda: this machine has no CUDA device"),
    "prompt-argv-not-utf8": (["{d}/ckpt", "--prompt", b"caf\xe9"], "--prompt: not valid UTF-8 text"),
    "prompt-file-latin1": (["{d}/ckpt", "--prompt_file", "{d}/latin1.txt"],
                           "--prompt_file {d}/latin1.txt: not UTF-8 text (at byte 3)"),
    "source-missing-dir": (["./missing_dir"], "'./missing_dir': no such directory"),
    "hub-id-offline": (["tiny-org/not-cached"], "tiny-org/not-cached@main: HF_HUB_OFFLINE is set"),
    "config-lacks-key": (["{d}/no_n_embd"], "{d}/no_n_embd/config.json: lacks key 'n_embd'"),
    "no-tokenizer": (["{d}/no_tokenizer"], "{d}/no_tokenizer: no tokenizer found"),
    "weights-truncated": (["{d}/truncated"], "{d}/truncated/model.safetensors: not a readable safetensors file"),
    "weights-nan": (["{d}/nan"], "the model's logits are NaN or infinite"),
}
MAIN_CASES = {   # the same, through errors.run(sample.main) in this process
    "prompt-file-dir": (["{d}/ckpt", "--prompt_file", "{d}"], "--prompt_file {d}: Is a directory"),
    "prompt-file-missing": (["{d}/ckpt", "--prompt_file", "{d}/nope.txt"],
                            "--prompt_file {d}/nope.txt: No such file or directory"),
    "rope-on-gpt2": (["{d}/ckpt", "--rope_scale_factor", "8"], "--rope_scale_factor does not apply to gpt2.py"),
    "chat-on-gpt2": (["{d}/ckpt", "--chat"], "--chat: gpt2.py has no chat format"),
    "model-unknown": (["{d}/ckpt", "--model", "mistral"], "--model 'mistral': expected one of gpt2, llama3, qwen, deepseek"),
    "source-empty": ([""], "the source is empty"),
    "source-file": (["{d}/ckpt/config.json"], "{d}/ckpt/config.json: is a file"),
    "source-path-like": (["{d}/ckpt/nope/"], "'{d}/ckpt/nope/': no such directory"),
    "hub-id-odd": (["owner/na me"], "'owner/na me': neither a local directory nor a hub repo id"),
    "hub-id-double-dash": (["own--er/name"], "'own--er/name': neither a local directory nor a hub repo id"),
    "preset-offline": (["gpt2-medium"], "openai-community/gpt2-medium@main: HF_HUB_OFFLINE is set"),
    "config-missing": (["{d}/empty"], "{d}/empty/config.json: not found"),
    "config-not-json": (["{d}/not_json"], "{d}/not_json/config.json: not valid JSON"),
    "config-not-object": (["{d}/list"], "{d}/list/config.json: expected a JSON object, got list"),
    "model-type-absent": (["{d}/no_type"], "{d}/no_type/config.json: lacks key 'model_type'"),
    "model-type-unknown": (["{d}/mamba"], "{d}/mamba/config.json: model_type 'mamba'; the model files here implement"),
    "config-wrong-type": (["{d}/str_n_head"], "{d}/str_n_head/config.json: 'n_head' is '1': expected an integer"),
    "no-weights": (["{d}/no_weights"], "{d}/no_weights: no weights"),
    "tokenizer-corrupt": (["{d}/bad_tokenizer"], "{d}/bad_tokenizer/tokenizer.bpe, line 1: expected 'bpe v1'"),
    "empty-prompt-no-specials": (["{d}/no_specials"], "the prompt is empty and the tokenizer has no BOS"),
    "prompt-beyond-vocab": (["{d}/small_vocab", "--prompt", "zzz"], "prompt token id 122 is beyond the model's"),
}


def _edit_json(path, edit):
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """A good tiny checkpoint (ckpt) and one broken copy of it per kind of bad file."""
    import shutil
    d = tmp_path_factory.mktemp("cli")
    tok = bpe.train("", 257, special_tokens={"<|endoftext|>": 256})

    def checkpoint(name, model, tokenizer=tok):
        model.save_pretrained(d / name)
        tokenizer.save(d / name / bpe.SAVE_NAME)

    checkpoint("ckpt", gpt2.GPT(gpt2.Config(vocab_size=257, block_size=64, n_layer=1, n_head=1, n_embd=8,
                                            eos_token_id=256)))
    for name in ("not_json", "list", "mamba", "no_type", "no_n_embd", "str_n_head", "no_tokenizer",
                 "bad_tokenizer", "truncated", "no_weights"):
        shutil.copytree(d / "ckpt", d / name)
    (d / "not_json" / "config.json").write_text("{")
    (d / "list" / "config.json").write_text("[]")
    _edit_json(d / "mamba" / "config.json", lambda c: c.update(model_type="mamba"))
    _edit_json(d / "no_type" / "config.json", lambda c: c.pop("model_type"))
    _edit_json(d / "no_n_embd" / "config.json", lambda c: c.pop("n_embd"))
    _edit_json(d / "str_n_head" / "config.json", lambda c: c.update(n_head="1"))
    (d / "no_tokenizer" / bpe.SAVE_NAME).unlink()
    (d / "bad_tokenizer" / bpe.SAVE_NAME).write_text("<html>a login page</html>")
    weights = d / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    (d / "no_weights" / "model.safetensors").unlink()
    nan = gpt2.GPT.from_pretrained(str(d / "ckpt"))
    with torch.no_grad():
        nan.ln_f.weight.fill_(float("nan"))
    checkpoint("nan", nan)
    checkpoint("no_specials", gpt2.GPT(gpt2.Config(vocab_size=256, block_size=64, n_layer=1, n_head=1, n_embd=8)),
               bpe.train("", 256))
    checkpoint("small_vocab", tiny_model(vocab_size=100, eos=99))
    (d / "empty").mkdir()
    (d / "latin1.txt").write_bytes("café".encode("latin-1"))
    return d


def _fill(argv, d):
    return [a.replace("{d}", str(d)) if isinstance(a, str) else a for a in argv]


@pytest.fixture(scope="module")
def cli_runs(cli_dir):
    """{case: (exit status, stdout + stderr)} of CLI_CASES and a good run, two or more at a time."""
    from concurrent.futures import ThreadPoolExecutor
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9", "NANOLLM_CACHE": str(cli_dir / "cache"),
            "HF_HOME": str(cli_dir / "hf"), "HOME": str(cli_dir / "home"), "CUDA_VISIBLE_DEVICES": "",
            "OMP_NUM_THREADS": "1"}

    def run(argv):
        r = subprocess.run([sys.executable, "sample.py", *_fill(argv, cli_dir)], cwd=ROOT, env=env,
                           capture_output=True, timeout=300)
        return r.returncode, (r.stdout + r.stderr).decode("utf-8", errors="replace").replace(str(cli_dir), "{d}")

    cases = {name: argv for name, (argv, _) in CLI_CASES.items()}
    cases["ok"] = ["{d}/ckpt", "--prompt", "hi", "--max_new_tokens", "4"]   # the errors come from what each breaks
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1))) as pool:
        return dict(zip(cases, pool.map(run, cases.values())))


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_is_one_error_line(cli_runs, case):
    rc, out = cli_runs[case]
    assert rc == 1 and "Traceback" not in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: ") and CLI_CASES[case][1] in last, out


def test_cli_samples_the_good_checkpoint(cli_runs):
    rc, out = cli_runs["ok"]
    assert rc == 0 and out.startswith("hi"), out


@pytest.mark.parametrize("case", MAIN_CASES)
def test_main_bad_input_is_one_error_line(cli_dir, case, monkeypatch, capsys):
    # huggingface_hub read HF_HUB_OFFLINE and HF_HOME when imported: its constants, then
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cli_dir / "hf"))
    argv, message = MAIN_CASES[case]
    with pytest.raises(SystemExit) as e:
        errors.run(sample.main, _fill(argv, cli_dir))
    line = str(e.value.code).replace(str(cli_dir), "{d}")
    assert line.startswith("error: ") and "\n" not in line and message in line
    assert capsys.readouterr().out == ""


def test_preset_is_fetched_from_the_hub_and_sampled(tmp_path, monkeypatch, capsys):
    """`sample.py gpt2` end to end: preset -> hub id -> download (a local fake hub) -> official layout -> text."""
    from conftest import shared_file
    from test_hub import FakeHub, use_hub
    gpt2_files = shared_file("gpt2", "encoder.json").parent
    model = tiny_model(vocab_size=50257, eos=50256)
    model.save_pretrained(tmp_path / "repo")
    files = {p.name: p.read_bytes() for p in (tmp_path / "repo").iterdir()}
    # the hub's GPT-2 repo carries OpenAI's encoder.json and vocab.bpe as vocab.json and merges.txt
    files |= {"vocab.json": (gpt2_files / "encoder.json").read_bytes(),
              "merges.txt": (gpt2_files / "vocab.bpe").read_bytes()}
    server = FakeHub(files, repo=gpt2.HUB_IDS["gpt2"])
    use_hub(monkeypatch, server.url, tmp_path / "hf")
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


def test_qwen3_chat_without_thinking(tmp_path, monkeypatch, capsys):
    """sample.py --chat --no_thinking on a Qwen3 checkpoint: each prompt ends with the empty think block."""
    import qwen
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok = bpe.train("user assistant hello there, how are you? fine thanks\n\n" * 20, 290, special_tokens=specials)
    torch.manual_seed(0)
    model = qwen.Qwen(qwen.Config(vocab_size=300, block_size=128, n_layer=1, n_head=2, n_kv_head=1, n_embd=16,
                                  intermediate_size=32, eos_token_id=tok.special_tokens["<|im_end|>"])).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    tok.save(tmp_path / bpe.SAVE_NAME)
    turns = iter(["hello there", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(turns))
    sample.main([str(tmp_path), "--chat", "--no_thinking", "--temperature", "0", "--max_new_tokens", "6"])
    ids = qwen.encode_chat(tok, [{"role": "user", "content": "hello there"}], enable_thinking=False)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    eos = sample.eos_ids_of(model, tok)
    out = [int(t) for t in sample.generate(model, torch.tensor([ids]), 6, temperature=0, eos_ids=eos,
                                           allowed=sample.sampleable(tok, 300))]
    assert capsys.readouterr().out == tok.decode([t for t in out if t not in eos])
    with pytest.raises(errors.BadInput, match="--no_thinking switches off a chat model's thinking: add --chat"):
        sample.parse_args([str(tmp_path), "--no_thinking"])


def test_no_thinking_needs_a_chat_format_with_thinking(tmp_path):
    import llama3
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = bpe.train("user assistant hello", 270, special_tokens=specials)
    llama3.Llama(llama3.Config(vocab_size=280, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
                 ).save_pretrained(tmp_path)
    tok.save(tmp_path / bpe.SAVE_NAME)
    with pytest.raises(errors.BadInput, match=r"--no_thinking: llama3.py's chat format has no thinking to switch off"):
        sample.load(str(tmp_path), chat=True, no_thinking=True)
