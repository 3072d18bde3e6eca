"""sample.py's speculative decoding, batched generation and compiled decoding: the tokens of plain generation.

Greedy speculative decoding must give plain greedy's tokens for any draft (always right, always wrong, a random
one); sampling must follow the target's distribution exactly, which a chi-square test checks on a 5-token
vocabulary where both distributions are known in closed form.
"""
import math
from types import SimpleNamespace

import pytest
import torch

import gpt2
import llama3
import sample

from conftest import randomize


def tiny_gpt2(seed, n_layer=2, n_embd=32):
    model = gpt2.GPT(gpt2.Config(vocab_size=257, block_size=96, n_layer=n_layer, n_head=2, n_embd=n_embd,
                                 eos_token_id=256)).eval()
    return randomize(model, seed=seed, scale=0.3)


def tiny_llama(seed, n_layer=2, n_embd=32, vocab_size=257):
    model = llama3.Llama(llama3.Config(vocab_size=vocab_size, block_size=96, n_layer=n_layer, n_head=4,
                                       n_kv_head=2, n_embd=n_embd, eos_token_id=256)).eval()
    return randomize(model, seed=seed, scale=0.3)


class AlwaysWrong(torch.nn.Module):
    """A draft whose argmax is always the target's argmax + 1: greedy, it never guesses right."""

    def __init__(self, target):
        super().__init__()
        self.target, self.config = target, target.config

    def forward(self, idx, *, cache=None, pos=0, last_only=False):
        logits, loss = self.target(idx, cache=cache, pos=pos, last_only=last_only)
        return logits.roll(1, dims=-1), loss

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        return self.target.init_cache(batch_size, max_len, device=device, dtype=dtype)


def greedy(model, prompt, n, **kw):
    return [int(t) for t in sample.generate(model, prompt, n, temperature=0, **kw)]


PAIRS = {   # target, draft
    "gpt2-smaller-gpt2": lambda: (tiny_gpt2(0), tiny_gpt2(1, n_layer=1, n_embd=16)),
    "llama-smaller-llama": lambda: (tiny_llama(0), tiny_llama(1, n_layer=1, n_embd=16)),
    "gpt2-llama-padded-vocab": lambda: (tiny_gpt2(0), tiny_llama(2, vocab_size=300)),   # same ids, wider head
    "always-right": lambda: (tiny_gpt2(0),) * 2,
    "always-wrong": lambda: (lambda t: (t, AlwaysWrong(t)))(tiny_gpt2(0)),
}


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("k", [1, 4])
def test_speculative_greedy_is_plain_greedy(pair, k):
    target, draft = PAIRS[pair]()
    prompt = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    stats = {}
    got = greedy(target, prompt, 50, draft=draft, draft_tokens=k, stats=stats)
    assert got == greedy(target, prompt, 50) and len(got) == 50
    assert stats["drafted"] > 0 and stats["rounds"] < 50
    if pair == "always-right":
        assert stats["accepted"] == stats["drafted"] and stats["rounds"] <= math.ceil(49 / (k + 1))
    if pair == "always-wrong":
        assert stats["accepted"] == 0 and stats["rounds"] == 49   # one target forward a token, as plain


@pytest.mark.parametrize("n", [0, 1, 2, 5, 13])
def test_speculative_stops_at_eos_and_after_exactly_n_tokens(n):
    target = tiny_gpt2(0)
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    plain = greedy(target, prompt, 30)
    for draft in (target, tiny_gpt2(1, n_layer=1, n_embd=16)):
        assert greedy(target, prompt, n, draft=draft, draft_tokens=3) == plain[:n]
        eos = plain[6]   # a stop token inside a fully accepted round (draft == target) ends it there
        assert greedy(target, prompt, 30, draft=draft, draft_tokens=3, eos_ids={eos}) == plain[:plain.index(eos) + 1]


def test_speculative_takes_one_prompt_with_the_cache():
    target = tiny_gpt2(0)
    with pytest.raises(sample.errors.BadInput, match="one prompt with the cache, not a batch of 2"):
        list(sample.generate(target, torch.zeros(2, 3, dtype=torch.long), 4, draft=target))
    with pytest.raises(sample.errors.BadInput, match="not --no_cache"):
        list(sample.generate(target, torch.zeros(1, 3, dtype=torch.long), 4, draft=target, use_cache=False))


# ---- the sampling rule: the tokens follow the target's distribution exactly


class Markov(torch.nn.Module):
    """A stub model over a tiny vocabulary whose next-token logits are table[last token]: its distribution of
    sequences is known in closed form. It keeps no cache (it needs none)."""

    def __init__(self, table):
        super().__init__()
        self.table, self.config = table, SimpleNamespace(vocab_size=table.size(0), block_size=64)

    def forward(self, idx, *, cache=None, pos=0, last_only=False):
        logits = self.table[idx]   # (B, T, V)
        return (logits[:, -1:] if last_only else logits), None

    def init_cache(self, batch_size, max_len, *, device=None, dtype=None):
        return None


def chi2_sf(x, df):
    """P(chi-square with df degrees of freedom > x): 1 - the regularized lower gamma P(df/2, x/2), by its series
    sum_n z^n / ((a+1)...(a+n)) * z^a e^-z / Gamma(a+1) (exact to rounding for the x and df here)."""
    a, z = df / 2, x / 2
    term = total = 1.0
    n = 0
    while term > 1e-17 * total:
        n += 1
        term *= z / (a + n)
        total += term
    return 1.0 - math.exp(a * math.log(z) - z - math.lgamma(a + 1)) * total


def chi2_p_value(counts, expected):
    """The chi-square goodness-of-fit p-value of counts against expected counts; 0 when a count falls where
    nothing is expected."""
    cells = expected > 0
    if bool((counts[~cells] > 0).any()):
        return 0.0
    stat = float(((counts[cells] - expected[cells]) ** 2 / expected[cells]).sum())
    return chi2_sf(stat, int(cells.sum()) - 1)


def pair_counts(samples, j, V):
    counts = torch.zeros(V, V)
    for s in samples:
        counts[s[j], s[j + 1]] += 1
    return counts


def pair_probs(P, first, j):
    """P(token j = a, token j + 1 = b) of the chain with transition matrix P, token 0 ~ first."""
    marginal = first @ torch.linalg.matrix_power(P, j)
    return marginal[:, None] * P


def test_speculative_sampling_follows_the_target_distribution():
    """4,000 sequences of 4 tokens with k = 2 drafted a round cover every path of the rule: kept, refused
    (resampled from the residual), all kept (the bonus token). For each pair of neighbours (tokens 0-1, 1-2,
    2-3; 25 cells, df 24) a chi-square against the target's exact pair distribution; each test's false-alarm
    rate is 1e-4, so all three pass but by 3e-4 when the rule is right. The same counts against the draft's own
    chain must fail: the test can tell the two distributions apart."""
    V, N = 5, 4_000
    g = torch.Generator().manual_seed(0)
    target, draft = Markov(torch.randn(V, V, generator=g)), Markov(torch.randn(V, V, generator=g) * 1.5)
    filters = dict(temperature=0.8, top_k=4)   # the rule compares p and q after the same filtering
    P, Q = (sample.probabilities(m.table, **filters).double() for m in (target, draft))
    prompt = torch.tensor([[2]])
    gen, stats, samples = torch.Generator().manual_seed(1), {}, []
    totals = dict(rounds=0, drafted=0, accepted=0)
    for _ in range(N):
        samples.append([int(t) for t in sample.generate(target, prompt, 4, draft=draft, draft_tokens=2,
                                                        generator=gen, stats=stats, **filters)])
        totals = {key: totals[key] + stats[key] for key in totals}
    assert 0.2 < totals["accepted"] / totals["drafted"] < 0.9   # both branches of the rule were taken often
    for j in range(3):
        counts = pair_counts(samples, j, V).double()
        p_value = chi2_p_value(counts, N * pair_probs(P, P[2], j))
        assert p_value > 1e-4, (j, p_value, counts)
        assert chi2_p_value(counts, N * pair_probs(Q, Q[2], j)) < 1e-4   # the draft's chain: told apart


def test_a_draft_equal_to_the_target_keeps_every_token_when_sampling():
    table = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    target, stats = Markov(table), {}
    got = list(sample.generate(target, torch.tensor([[0]]), 40, draft=Markov(table.clone()), draft_tokens=3,
                               generator=torch.Generator().manual_seed(0), stats=stats))
    assert len(got) == 40 and stats["accepted"] == stats["drafted"] == 29   # 9 rounds of 3 + 1, then 2 + 1


# ---- batched generation and the compiled step


@pytest.mark.parametrize("make", [lambda: tiny_gpt2(0), lambda: tiny_llama(0)], ids=["gpt2", "llama3"])
def test_batch_of_prompts_of_different_lengths_equals_one_by_one(make):
    model = make()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 1, 9, 5)]
    alone = [greedy(model, torch.tensor([p]), 16) for p in prompts]
    assert sample.generate_batch(model, prompts, 16, temperature=0) == alone
    # per-sequence stop tokens: a row stops at its own, the others run to the end
    stops = [{alone[0][3]}, set(), {alone[2][0]}, {999}]
    want = [a[:a.index(next(iter(s))) + 1] if s & set(a) else a for a, s in zip(alone, stops)]
    assert [len(w) for w in want][1:] == [16, 1, 16] and len(want[0]) <= 4
    assert sample.generate_batch(model, prompts, 16, temperature=0, eos_ids=stops) == want
    assert sample.generate_batch(model, prompts, 0) == [[]] * 4


def test_compiled_decode_gives_the_eager_tokens():
    model = tiny_gpt2(0)
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))
    eager = torch.stack(list(sample.generate(model, prompt, 12, temperature=0)), 1)
    compiled = torch.stack(list(sample.generate(model, prompt, 12, temperature=0, compile=True)), 1)
    assert torch.equal(eager, compiled)
    draft = tiny_gpt2(1, n_layer=1, n_embd=16)
    assert greedy(model, prompt[:1], 12, draft=draft, compile=True) == eager[0].tolist()


def test_cli_draft_gives_the_plain_greedy_text(tmp_path, capsys, monkeypatch):
    import bpe
    tok = bpe.train("", 257, special_tokens={"<|endoftext|>": 256})
    for name, model in (("target", tiny_gpt2(0)), ("draft", tiny_gpt2(1, n_layer=1, n_embd=16))):
        model.save_pretrained(tmp_path / name)
        tok.save(tmp_path / name / bpe.SAVE_NAME)
    argv = [str(tmp_path / "target"), "--prompt", "hi", "--max_new_tokens", "12", "--temperature", "0"]
    sample.main(argv)
    plain = capsys.readouterr().out
    sample.main(argv + ["--draft", str(tmp_path / "draft"), "--draft_tokens", "3"])
    out = capsys.readouterr()
    assert out.out == plain and "drafted tokens accepted" in out.err
    seen = []
    monkeypatch.setitem(__import__("sys").modules, "quantize",
                        SimpleNamespace(quantize=lambda m, mode: seen.append(mode) or m))
    sample.main(argv + ["--quantize", "int8"])
    assert seen == ["int8"] and capsys.readouterr().out == plain
