"""dpo.py: the loss is the paper's formula, log 2 at the start; the masks cover exactly the replies, in each chat
format and in plain text; a short run raises the reward margin for every model family; bad input is one line
naming file:line."""
import copy
import json
import math

import numpy as np
import pytest
import torch

import bpe
import deepseek
import dpo
import gpt2
import llama3
import qwen
from errors import BadInput

SPECIALS = {
    "llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "deepseek": ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
}
TINY = {   # two layers of width 32 each; deepseek's with MLA and a mixture of experts in its second layer
    "gpt2": gpt2.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32),
    "llama3": llama3.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                            intermediate_size=64),
    "qwen": qwen.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, head_dim=16,
                        intermediate_size=64),
    "deepseek": deepseek.Config(vocab_size=257, block_size=64, n_layer=2, n_head=2, n_embd=32, intermediate_size=64,
                                q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                v_head_dim=8, n_routed_experts=4, moe_intermediate_size=16),
}
MODULES = {"gpt2": gpt2, "llama3": llama3, "qwen": qwen, "deepseek": deepseek}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: two threads contending with a busy machine run them ~50x slower than one (as train.py --threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chat_tokenizer_dir(path, model):
    path.mkdir(parents=True, exist_ok=True)
    bpe.train("user assistant system hello there, how are you? fine thanks\n\n" * 20, 300,
              special_tokens=SPECIALS[model]).save(path / bpe.SAVE_NAME)
    return path


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def drawn(data, split, seed, batch_size):
    """The pair indices PreferenceData.batch draws, as train.TokenData draws its offsets."""
    return torch.randint(data.n(split), (batch_size,), generator=torch.Generator().manual_seed(seed)).tolist()


# -----------------------------------------------------------------------------------------------------------
# The loss


def test_dpo_loss_is_the_papers_formula():
    pc, pr, rc, rr = [-3.0, -7.5, -2.0], [-4.0, -6.0, -1.0], [-3.5, -7.0, -2.5], [-3.0, -6.5, -0.5]
    beta = 0.2
    chosen = [beta * (a - b) for a, b in zip(pc, rc)]
    rejected = [beta * (a - b) for a, b in zip(pr, rr)]
    by_hand = sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in zip(chosen, rejected)) / 3
    loss, stats = dpo.dpo_loss(*map(torch.tensor, (pc, pr, rc, rr)), beta)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    assert stats["chosen_reward"].item() == pytest.approx(sum(chosen) / 3, abs=1e-6)
    assert stats["rejected_reward"].item() == pytest.approx(sum(rejected) / 3, abs=1e-6)
    assert stats["reward_margin"].item() == pytest.approx((sum(chosen) - sum(rejected)) / 3, abs=1e-6)
    assert stats["reward_accuracy"].item() == pytest.approx(2 / 3)   # pair 2: 0.2 * (-0.5 - 0.5) < 0


def test_sequence_logps_is_a_loop_over_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(3, 6, 11, generator=g), torch.randint(11, (3, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    expected = []
    for r in range(3):
        total = 0.0
        for t in range(1, 6):   # token t is predicted at position t - 1
            if mask[r, t]:
                row = logits[r, t - 1].tolist()
                total += row[ids[r, t]] - math.log(sum(math.exp(x) for x in row))
        expected.append(total)
    assert dpo.sequence_logps(logits, ids, mask).tolist() == pytest.approx(expected, abs=1e-5)


# -----------------------------------------------------------------------------------------------------------
# Data: prepare() writes what PreferenceData reads, and the masks cover exactly the replies


def plain_pairs(n):
    return [{"prompt": f"Q{i}: may I?\nA:", "chosen": " yes, gladly.", "rejected": " no."} for i in range(n)]


def test_plain_text_rows_are_prompt_reply_and_end_of_text(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", plain_pairs(10))
    out = dpo.prepare(jsonl, "gpt2", "bytes", out_dir=tmp_path / "data", val_fraction=0.2)
    meta = json.loads((out / "meta.json").read_text())
    assert meta | {"dataset": None} == {"task": "preference", "dataset": None, "tokenizer": "bytes", "chat_model": None,
                                        "vocab_size": 257, "eot_id": 256, "max_len": 512, "n_train": 8, "n_val": 2}
    assert np.load(out / "val.prompt_len.npy").dtype == np.int64 and np.load(out / "val.chosen.npy").dtype == np.int32
    data = dpo.PreferenceData(out, meta, 257)
    assert (data.n("train"), data.n("val")) == (8, 2)
    ids, mask = data.batch("val", seed=3, batch_size=4)
    for r, i in enumerate(drawn(data, "val", 3, 4)):   # the held-out pairs are the last ones: 8 and 9
        prompt = list(f"Q{8 + i}: may I?\nA:".encode())
        for row, reply in ((r, b" yes, gladly."), (r + 4, b" no.")):
            n = len(prompt) + len(reply) + 1
            assert ids[row, :n].tolist() == prompt + list(reply) + [256]
            assert mask[row].tolist() == [False] * len(prompt) + [True] * (len(reply) + 1) + [False] * (
                ids.size(1) - n)
    assert ids.size(1) == len(prompt) + len(b" yes, gladly.") + 1   # as wide as its longest row


@pytest.mark.parametrize("model", ["llama3", "qwen", "deepseek"])
def test_chat_mask_is_exactly_the_reply_and_its_end_of_turn(tmp_path, model):
    module = MODULES[model]
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "how are you?"}]
    rows = [{"messages": history, "chosen": "fine thanks", "rejected": {"role": "assistant", "content": "hello"}},
            {"prompt": "how are you?", "chosen": "fine", "rejected": "thanks"}]
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", rows * 2)
    out = dpo.prepare(jsonl, model, str(chat_tokenizer_dir(tmp_path / "tok", model)), out_dir=tmp_path / "data",
                      val_fraction=0.5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["chat_model"] == model and (meta["n_train"], meta["n_val"]) == (2, 2)
    tok = bpe.load(out / "tokenizer")
    end = {"llama3": ["<|eot_id|>"], "qwen": ["<|im_end|>", "\n"], "deepseek": ["<｜end▁of▁sentence｜>"]}[model]
    end = [i for s in end for i in tok.encode(s, allowed_special="all")]   # the reply's end-of-turn tokens
    prompts = [module.encode_chat(tok, history), module.encode_chat(tok, [{"role": "user", "content": "how are you?"}])]
    replies = [("fine thanks", "hello"), ("fine", "thanks")]
    data = dpo.PreferenceData(out, meta, tok.vocab_size)
    ids, mask = data.batch("train", seed=1, batch_size=6)
    assert sorted(set(drawn(data, "train", 1, 6))) == [0, 1]   # both pairs are checked
    for r, i in enumerate(drawn(data, "train", 1, 6)):
        for row, reply in ((r, replies[i][0]), (r + 6, replies[i][1])):
            assert ids[row, :len(prompts[i])].tolist() == prompts[i] and not mask[row, :len(prompts[i])].any()
            assert ids[row][mask[row]].tolist() == tok.encode(reply) + end
            assert mask[row].tolist().index(True) == len(prompts[i])   # one span, right after the prompt


def test_parts_of_a_batch_are_the_rows_of_the_whole(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q" * (1 + i % 5), "chosen": "a" * (1 + i % 7),
                                                   "rejected": "b"} for i in range(20)])
    out = dpo.prepare(jsonl, "gpt2", "bytes", out_dir=tmp_path / "data")
    data = dpo.PreferenceData(out, json.loads((out / "meta.json").read_text()), 257)
    ids, mask = data.batch("train", seed=7, batch_size=8)
    for part in range(4):
        p_ids, p_mask = data.batch("train", seed=7, batch_size=2, part=part, parts=4)
        rows = [2 * part, 2 * part + 1, 8 + 2 * part, 8 + 2 * part + 1]   # its chosen rows, then its rejected
        assert torch.equal(p_ids, ids[rows, :p_ids.size(1)]) and torch.equal(p_mask, mask[rows, :p_ids.size(1)])
        assert not mask[rows, p_ids.size(1):].any()


def test_truncation_cuts_the_end_of_the_reply(tmp_path):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "abc", "chosen": "defgh", "rejected": "xy"}] * 2)
    out = dpo.prepare(jsonl, "gpt2", "bytes", out_dir=tmp_path / "data", max_len=6)
    data = dpo.PreferenceData(out, json.loads((out / "meta.json").read_text()), 257)
    ids, mask = data.batch("train", seed=0, batch_size=1)
    assert ids.tolist() == [list(b"abcdef"), list(b"abcxy") + [256]]
    assert mask.tolist() == [[False] * 3 + [True] * 3] * 2


def test_a_damaged_array_is_named(tmp_path):
    out = dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", plain_pairs(4)), "gpt2", "bytes",
                      out_dir=tmp_path / "data")
    meta = json.loads((out / "meta.json").read_text())
    np.save(out / "train.rejected_len.npy", np.load(out / "train.rejected_len.npy").astype(np.int32))
    with pytest.raises(BadInput, match=r"train\.rejected_len\.npy: int32 \(3,\), but meta.json says int64 \(3,\)"):
        dpo.PreferenceData(out, meta, 257)
    (out / "train.rejected_len.npy").unlink()
    with pytest.raises(BadInput, match=r"train\.rejected_len\.npy: missing"):
        dpo.PreferenceData(out, meta, 257)
    with pytest.raises(BadInput, match=r"vocabulary 257 exceeds the model's vocab_size 200"):
        dpo.PreferenceData(out, meta, 200)


# -----------------------------------------------------------------------------------------------------------
# Training


def tiny(model):
    torch.manual_seed(0)
    return MODULES[model].Model(TINY[model])


def test_step_zero_loss_is_log_2_and_margin_zero(tmp_path):
    out = dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", plain_pairs(8)), "gpt2", "bytes",
                      out_dir=tmp_path / "data")
    data = dpo.PreferenceData(out, json.loads((out / "meta.json").read_text()), 257)
    model = tiny("gpt2")
    reference = copy.deepcopy(model).eval()
    loss, stats = dpo.loss(model, data.batch("train", 0, 4), lambda ids: reference(ids)[0], beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["reward_margin"].item() == 0 and stats["reward_accuracy"].item() == 0


@pytest.mark.parametrize("model", ["gpt2", "llama3", "qwen", "deepseek"])
def test_a_short_run_raises_the_reward_margin(tmp_path, model):
    """Replies " yes, gladly." over " no." after any prompt: a few dozen steps learn to prefer them, on the
    held-out prompts too. One forward of the policy per step, as DDP needs."""
    out = dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", plain_pairs(40)), "gpt2", "bytes",
                      out_dir=tmp_path / "data", val_fraction=0.25)
    data = dpo.PreferenceData(out, json.loads((out / "meta.json").read_text()), 257)
    policy = tiny(model)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    forwards = []
    policy.register_forward_hook(lambda *_: forwards.append(1))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for step in range(30):
        loss, _ = dpo.loss(policy, data.batch("train", step, 8), lambda ids: reference(ids)[0], beta=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert len(forwards) == 30
    with torch.no_grad():
        loss, stats = dpo.loss(policy, data.batch("val", 0, 10), lambda ids: reference(ids)[0], beta=0.1)
    assert stats["reward_accuracy"].item() == 1 and stats["reward_margin"].item() > 2, stats
    assert loss.item() < 0.1 * math.log(2)


# -----------------------------------------------------------------------------------------------------------
# Bad input: one line naming file:line


GOOD = {"prompt": "Q: may I?\nA:", "chosen": " yes", "rejected": " no"}
BAD = [
    ("{not json", r"pairs\.jsonl:2: not valid JSON \(Expecting property name"),
    ({"prompt": "Q", "chosen": " yes"}, r'pairs\.jsonl:2: "rejected": expected a non-empty string'),
    ({"prompt": "Q", "chosen": 3, "rejected": " no"}, r'pairs\.jsonl:2: "chosen": expected a non-empty string'),
    ({"prompt": "Q", "chosen": {"role": "user", "content": "hi"}, "rejected": " no"}, r'pairs\.jsonl:2: "chosen"'),
    ({"prompt": ["Q"], "chosen": " yes", "rejected": " no"}, r'pairs\.jsonl:2: "prompt": expected a non-empty'),
    ({"chosen": " yes", "rejected": " no"}, r'pairs\.jsonl:2: expected a JSON object with "prompt" or "messages"'),
    ([1, 2], r'pairs\.jsonl:2: expected a JSON object'),
    ({"prompt": "Q", "chosen": " same", "rejected": " same"}, r"pairs\.jsonl:2: chosen and rejected are the same text"),
    ({"prompt": "Q" * 20, "chosen": " yes", "rejected": " no"},
     r"pairs\.jsonl:2: the prompt alone is 20 tokens, leaving no room for a reply in max_len 16"),
    ({"prompt": "Q" * 10, "chosen": " yes, gladly!", "rejected": " yes, gladly?"},
     r"pairs\.jsonl:2: chosen and rejected are the same tokens after truncation to max_len 16: nothing to"),
    ({"messages": [{"role": "user", "content": "Q"}], "chosen": " yes", "rejected": " no"},
     r'pairs\.jsonl:2: "messages" needs a chat format, and gpt2\.py has none'),
]


@pytest.mark.parametrize("row, message", BAD)
def test_bad_pair_is_one_line_naming_file_and_line(tmp_path, row, message):
    jsonl = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, row, GOOD])
    with pytest.raises(BadInput, match=message) as e:
        dpo.prepare(jsonl, "gpt2", "bytes", out_dir=tmp_path / "data", max_len=16)
    assert "\n" not in str(e.value) and not (tmp_path / "data" / "pairs").exists()


def test_bad_chat_messages_are_named(tmp_path):
    qwen_dir, llama_dir = (str(chat_tokenizer_dir(tmp_path / m, m)) for m in ("qwen", "llama3"))
    tool = {"messages": [{"role": "tool", "content": "42"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(BadInput, match=r"pairs\.jsonl:2: messages\[0\] must be a dict with 'role' system, user"):
        dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", [GOOD, tool]), "qwen", qwen_dir, out_dir=tmp_path / "data")
    with pytest.raises(BadInput, match=r'pairs\.jsonl:1: "messages": expected a list of'):
        dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", [{"messages": "hi", "chosen": "a", "rejected": "b"}, GOOD]),
                    "qwen", qwen_dir, out_dir=tmp_path / "data")
    no_content = {"messages": [{"role": "user", "content": "hi"}, {"role": "user"}], "chosen": "a", "rejected": "b"}
    with pytest.raises(BadInput, match=r"pairs\.jsonl:2: messages\[1\] must be a dict with string 'role' and"):
        dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", [GOOD, no_content]), "llama3", llama_dir,
                    out_dir=tmp_path / "data")
    stripped = {"prompt": "hi", "chosen": " fine", "rejected": "fine\n"}   # Llama 3 strips the content
    with pytest.raises(BadInput, match=r"pairs\.jsonl:2: chosen and rejected are the same tokens: nothing to prefer"):
        dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", [GOOD, stripped]), "llama3", llama_dir,
                    out_dir=tmp_path / "data")
    with pytest.raises(BadInput, match=r"--tokenizer bytes: the tokenizer lacks <\|im_start\|>, <\|im_end\|>"):
        dpo.prepare(write_jsonl(tmp_path / "pairs.jsonl", [GOOD, GOOD]), "qwen", "bytes", out_dir=tmp_path / "data")


def test_too_few_pairs_and_bad_flags(tmp_path):
    one = write_jsonl(tmp_path / "pairs.jsonl", [GOOD])
    with pytest.raises(BadInput, match=r"pairs\.jsonl: 1 preference pairs; need at least 2"):
        dpo.prepare(one, "gpt2", "bytes", out_dir=tmp_path / "data")
    with pytest.raises(BadInput, match=r"--tokenizer bpe: preference tuning continues a trained model"):
        dpo.prepare(one, "gpt2", "bpe", out_dir=tmp_path / "data")
    with pytest.raises(BadInput, match=r"--max_len 1: expected an integer >= 2"):
        dpo.prepare(one, "gpt2", "bytes", out_dir=tmp_path / "data", max_len=1)
    with pytest.raises(BadInput, match=r"--dpo_jsonl .*missing\.jsonl: no such file"):
        dpo.prepare(tmp_path / "missing.jsonl", "gpt2", "bytes", out_dir=tmp_path / "data")
