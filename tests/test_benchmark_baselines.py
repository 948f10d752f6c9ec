"""The benchmark baselines compute what generate() computes."""

import torch
from conftest import rel_err, tiny_recurrent

import latentrt
from benchmarks.compiled_baseline import StaticDecoder


def test_static_decoder_matches_generate():
    model = tiny_recurrent(seed=12)
    prompt = [5, 6, 7, 8, 9]
    r = 3
    want = latentrt.generate(
        model, prompt, max_new_tokens=3, num_steps=r, kv_sharing="shared", init_scale=0.0, return_logits=True
    )
    # prefill exactly as the engine does, into a cache the static decoder then continues
    ids = torch.tensor([prompt])
    cache = model.new_cache(1, 8)
    chunk = cache.begin(torch.ones(1, 5, dtype=torch.bool))
    rope = model.rope(chunk)
    e = model.prelude(ids, cache, chunk, rope)
    s = torch.zeros_like(e)
    on = torch.ones(1, dtype=torch.bool)
    for t in range(r):
        cache.mark_iteration(chunk, t, on)
        s = model.core_iteration(s, e, cache, chunk, t, on, rope)
    first = model.head(s, cache, chunk, on, rope)[:, -1]
    assert rel_err(first[0], want.logits[0]) < 1e-6
    dec = StaticDecoder(model, cache, r)
    tok = first.argmax(-1)
    for i in range(1, 3):
        dec.set_token(tok, 5 + i - 1)
        logits = dec.step()
        assert rel_err(logits[0], want.logits[i]) < 1e-5
        tok = logits.argmax(-1)
