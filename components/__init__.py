"""
The components catalogue: each variant of the transformer's parts written from its equation, small enough to
read in one sitting, tested against an independent reference, and compared side by side by one harness.

    attention.py   scaled dot-product attention, MHA/GQA/MQA, sliding / dilated / sink windows with a rolling
                   cache, ring attention, DeepSeek sparse attention
    mla.py         multi-head latent attention, naive and absorbed
    flash.py       flash attention in plain PyTorch (tiled forward, recomputing backward)
    positions.py   learned, sinusoidal, RoPE (two layouts, four scalings), ALiBi, none
    norms.py       LayerNorm, RMSNorm, pre-norm and post-norm blocks
    ffn.py         GELU MLP, SwiGLU, GeGLU, ReGLU
    moe.py         routers (softmax, noisy, sigmoid), shared experts, capacity, balancing
    tokenizers.py  tokens per character and word, bytes per token, of the official and our trained tokenizers
                   on one passage in ten languages and on code (data/multilingual.json)
    compare.py     python -m components.compare attention|position|norm|ffn|moe|tokenizer [--quick]: the family
                   tables, the report and the command line; its parts:
    meters.py      peak memory (a CPU meter too), FLOPs and time of one call
    tinylm.py      the tiny byte-level model every training comparison trains, and its offline data
    plots.py       the report's PNGs: cost against sequence length, loss against a baseline

The model files (gpt2.py, llama3.py, ...) keep their own inline copies, so they stay standalone; the tests in
tests/test_components_parity.py hold those copies equal to the versions here.
"""
