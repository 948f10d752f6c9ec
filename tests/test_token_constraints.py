"""latentrt/token_constraints.py: ``allowed_token_ids`` and ``bad_words`` against their definitions (vLLM's rules,
written out here per token as a reference loop), ``logits_processors`` with transformers' LogitsProcessor
signature (transformers' own processors as the oracle), through generate(), its batch rule and the serving
engine; and the errors."""

import pytest
import torch
from conftest import tiny_coconut, tiny_recurrent
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, SuppressTokensLogitsProcessor

import latentrt
from latentrt.options import GenerateOptions
from latentrt.serve import Engine
from latentrt.token_constraints import TokenConstraints, bad_word_ids
from latentrt.tokenizer import word_tokenizer


def make(family: str, seed: int = 3):
    """A tiny model of ``family`` (conftest's word-level tokenizer) and the options that make its tokens
    depend on the options alone (no random initial state); the ids of its tokenizer's words."""
    if family == "recurrent":
        model, kw = tiny_recurrent(seed=seed), dict(num_steps=3, init_scale=0.0)
    else:
        model, kw = tiny_coconut(seed=seed), dict(num_thoughts=1)
    words = [i for i in range(model.config.vocab_size) if (model.tokenizer.id_to_token(i) or "<").isalpha()]
    return model, kw, words


def vllm_bad_word_ban(words: list[list[int]], generated: list[int]) -> set[int]:
    """vLLM's rule (``_apply_bad_words_single_batch``), per token: a word's last token is banned where the
    generated tokens (not the prompt) end with the rest of it; a one-token word always."""
    banned = set()
    for w in words:
        if len(w) - 1 <= len(generated) and (len(w) == 1 or generated[len(generated) - len(w) + 1 :] == w[:-1]):
            banned.add(w[-1])
    return banned


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_each_greedy_token_is_the_argmax_of_what_the_constraints_leave(family):
    """The loop's wiring: token i is the argmax of the model's logits at i (``return_logits``: before any of
    this) over the allowed tokens less those the bad words ban after tokens[:i] (vLLM's rule above)."""
    model, det, words = make(family)
    tok, vocab = model.tokenizer, model.config.vocab_size
    kw = dict(det, max_new_tokens=12, default_stops=False, return_logits=True, allowed_token_ids=words)
    prompt = words[:4]
    plain = latentrt.generate(model, prompt, **kw)
    said = [tok.id_to_token(t) for t in plain.tokens]  # bad words from what the run says: one token, and two
    bad = [said[0], f"{said[2]} {said[3]}"]
    got = latentrt.generate(model, prompt, **kw, bad_words=bad)
    assert got.tokens != plain.tokens
    ids = bad_word_ids(tok, bad)
    assert ids[0] == [plain.tokens[0]] and ids[1] == plain.tokens[2:4]
    for i, token in enumerate(got.tokens):
        x = got.logits[i, :vocab].clone()
        for t in (set(range(vocab)) - set(words)) | vllm_bad_word_ban(ids, got.tokens[:i]):
            x[t] = float("-inf")
        assert int(x.argmax()) == token, i


def test_bad_words_look_at_the_generated_tokens_only_not_the_prompt():
    """vLLM's rule: a prompt ending with a word's first token does not ban the word's last one as the first new
    token (transformers' NoBadWordsLogitsProcessor, which reads the prompt too, would)."""
    model, det, words = make("recurrent")
    kw = dict(det, max_new_tokens=1, default_stops=False, allowed_token_ids=words)
    prompt = words[:4]
    first = latentrt.generate(model, prompt, **kw).tokens[0]
    word = f"{model.tokenizer.id_to_token(prompt[-1])} {model.tokenizer.id_to_token(first)}"
    assert latentrt.generate(model, prompt, **kw, bad_words=[word]).tokens[0] == first
    assert latentrt.generate(model, prompt, **kw, bad_words=[word.split()[1]]).tokens[0] != first


def test_allowed_token_ids_hold_for_sampled_tokens_and_every_sequence_of_a_batch():
    model, det, words = make("recurrent")
    allowed = words[1:5]
    out = latentrt.generate(
        model,
        [words[:2], words[3:8]],
        **det,
        max_new_tokens=20,
        default_stops=False,
        temperature=1.5,
        seed=4,
        allowed_token_ids=allowed,
    )
    assert all(set(t) <= set(allowed) for t in out.tokens) and all(len(t) == 20 for t in out.tokens)
    assert len({t for row in out.tokens for t in row}) > 1  # sampled: not one token over and over


def byte_level_tokenizer() -> Tokenizer:
    """A GPT-2-style byte-level BPE: a word inside a text (after a space) is other tokens than at its start."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["Every wumpus is a yumpus. Alex is a wumpus, a yumpus."] * 8, trainer)
    return tok


def test_bad_words_are_encoded_as_vllm_encodes_them():
    """``word.lstrip()`` and, where it gives another first token and as many tokens, ``" " + word.lstrip()``
    (vLLM's ``update_from_tokenizer``); no special tokens."""
    tok = byte_level_tokenizer()
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    # (as trained: 'wumpus' one token either way; ' Alex' one token, 'Alex' two; ' Every' a space token first)
    assert len(enc("wumpus")) == len(enc(" wumpus")) == 1 and enc("wumpus") != enc(" wumpus")
    assert len(enc("Alex")) == 2 and len(enc(" Alex")) == 1 and len(enc(" Every")) == 2
    got = bad_word_ids(tok, ["wumpus", "Alex", "  is", "Every", "is a"])
    want = [enc("wumpus"), enc(" wumpus"), enc("Alex"), enc("is"), enc(" is"), enc("Every"), enc("is a"), enc(" is a")]
    assert got == want


def test_bad_words_never_appear_in_a_byte_level_models_tokens():
    """End to end with a BPE tokenizer: the words the plain run says, banned, are not generated (their token
    sequences, by vLLM's rule, checked token by token)."""
    tok = byte_level_tokenizer()
    model = tiny_recurrent(seed=4, vocab_size=tok.get_vocab_size())
    model.tokenizer = tok
    kw = dict(max_new_tokens=16, default_stops=False, num_steps=3, init_scale=0.0)
    plain = latentrt.generate(model, "Alex is", **kw)
    t = plain.tokens

    def word_at(i: int, n: int) -> str | None:  # tokens[i:i+n] as a word that encodes to them again
        text = tok.decode(t[i : i + n])
        return text if text.strip() and bad_word_ids(tok, [text])[0] == t[i : i + n] else None

    said = [next(w for i in range(len(t)) if (w := word_at(i, n))) for n in (1, 2)]
    got = latentrt.generate(model, "Alex is", **kw, bad_words=said)
    assert got.tokens != plain.tokens
    ids = bad_word_ids(tok, said)
    for i in range(len(got.tokens)):
        assert got.tokens[i] not in vllm_bad_word_ban(ids, got.tokens[:i]), i


class Recorder:
    """A LogitsProcessor that records what it is given and suppresses one token."""

    def __init__(self, token: int) -> None:
        self.token, self.seen = token, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.seen.append((input_ids.tolist(), scores.shape, scores.dtype))
        scores[:, self.token] = float("-inf")
        return scores


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_logits_processors_see_each_sequences_prompt_and_tokens_and_transformers_processors_work(family):
    """Each running sequence on its own: input_ids [1, L] its prompt (no padding; Coconut's with its thought
    markers) and its tokens so far, the scores [1, W] float32; transformers' processors give what they give in
    HF's loop (the reference: the argmax of the processed logits, token by token)."""
    model, det, words = make(family)
    vocab = model.config.vocab_size
    kw = dict(det, max_new_tokens=10, default_stops=False, return_logits=True)
    prompts = [words[:5], words[6:8]]
    plain = latentrt.generate(model, prompts, **kw)
    ngram = NoRepeatNGramLogitsProcessor(2)
    free = latentrt.generate(model, prompts, **kw, logits_processors=[ngram, Recorder(plain.tokens[1][0])])
    stop = next(t for t in free.tokens[0][2:] if t not in free.tokens[1])  # one the first sequence alone says
    rec = Recorder(plain.tokens[1][0])
    got = latentrt.generate(model, prompts, **kw, logits_processors=[ngram, rec], stop=[stop])
    assert got.tokens != plain.tokens
    assert len(got.tokens[0]) < 10 == len(got.tokens[1])  # the first sequence stops early
    assert len(rec.seen) == len(got.tokens[0]) + len(got.tokens[1])  # each running sequence once a token
    width = plain.logits[0].shape[-1]
    assert all(shape == (1, width) and dtype == torch.float32 for _, shape, dtype in rec.seen)
    assert torch.equal(got.logits[1][0], plain.logits[1][0])  # the model's (a processor writes on its own copy)
    seen = [ids[0] for ids, _, _ in rec.seen]
    markers = ["<|start-latent|>", "<|latent|>", "<|end-latent|>"] if family == "coconut" else []  # one thought
    for b in range(2):  # (the rows take turns while both run)
        prompt = prompts[b] + [model.tokenizer.token_to_id(m) for m in markers]
        want = [prompt + got.tokens[b][:i] for i in range(len(got.tokens[b]))]
        assert [s for s in seen if s in want] == want
        for i, token in enumerate(got.tokens[b]):
            ids = torch.tensor([want[i]])
            x = rec(ids, ngram(ids, got.logits[b][i : i + 1].clone()))[0, :vocab]
            assert int(x.argmax()) == token, (b, i)


def test_a_processor_cannot_make_a_column_past_the_vocabulary_a_token():
    """The head's padding columns (ids >= vocab_size) stay -inf whatever a processor writes there."""
    model = tiny_recurrent(seed=2, vocab_size=37, padded_vocab_size=40)  # (the head: 40 columns)

    def unmask(input_ids, scores):
        scores[:, 37:] = 100.0
        return scores

    for sampled in (dict(), dict(temperature=1.0, seed=1)):
        out = latentrt.generate(
            model, [3, 4], max_new_tokens=6, default_stops=False, logits_processors=unmask, **sampled
        )
        assert max(out.tokens) < 37


def test_a_batch_with_constraints_equals_each_prompt_alone():
    model, det, words = make("recurrent", seed=6)
    prompts = [words[:6], words[7:9], words[2:5]]
    kw = dict(det, max_new_tokens=10, default_stops=False, temperature=0.9, seed=8, allowed_token_ids=words)
    bad = ["cat", "is a"]
    batch = latentrt.generate(model, prompts, **kw, bad_words=bad, logits_processors=NoRepeatNGramLogitsProcessor(3))
    for i, p in enumerate(prompts):
        alone = latentrt.generate(
            model, p, **dict(kw, seed=8 + i), bad_words=bad, logits_processors=NoRepeatNGramLogitsProcessor(3)
        )
        assert batch.tokens[i] == alone.tokens


@pytest.mark.parametrize("family", ["recurrent", "coconut"])
def test_the_serving_engine_equals_generate_alone_and_a_raising_processor_fails_its_request_only(family):
    model, det, words = make(family)
    base = dict(det, max_new_tokens=8, default_stops=False)

    def broken(input_ids, scores):
        if input_ids.shape[1] > 6:
            raise RuntimeError("processor broke")
        return scores

    cases = [
        dict(bad_words=["cat", "is a"], allowed_token_ids=words),
        dict(allowed_token_ids=words[2:9], temperature=0.8, seed=3),
        dict(logits_processors=[NoRepeatNGramLogitsProcessor(2), SuppressTokensLogitsProcessor(words[:3])]),
        dict(),
        dict(logits_processors=broken),
    ]
    prompts = [words[:4], words[5:7], words[1:6], words[8:10], words[3:5]]
    engine = Engine(model, max_batch=3)
    reqs = [engine.submit(p, GenerateOptions(**base, **c)) for p, c in zip(prompts, cases)]
    engine.run_until_idle()
    for req, p, c in zip(reqs[:4], prompts, cases):
        alone = latentrt.generate(model, p, **base, **c)
        assert (req.tokens, req.steps) == (alone.tokens, alone.steps), c
    assert reqs[4].finish_reason == "error" and "processor broke" in str(reqs[4].error)


def test_no_token_left_is_an_error_never_a_token():
    model, det, words = make("recurrent")
    kw = dict(det, max_new_tokens=4, default_stops=False)
    cat, a = (model.tokenizer.token_to_id(w) for w in ("cat", "a"))
    with pytest.raises(latentrt.InputError, match=rf"allowed_token_ids \[{cat}\]: bad_words exclude every one"):
        latentrt.generate(model, words[:2], **kw, allowed_token_ids=[cat], bad_words=["cat"])
    with pytest.raises(latentrt.InputError, match="stop tokens min_new_tokens holds back exclude every one"):
        latentrt.generate(model, words[:2], **kw, allowed_token_ids=[cat], stop=[cat], min_new_tokens=2)
    # found only while generating: after 'a', the only allowed token would complete the bad word 'a a'
    for sampled in (dict(), dict(temperature=1.0, seed=2)):
        with pytest.raises(
            latentrt.InputError, match=r"no token left to choose for new token 1 in sequence\(s\) \[0, 1\]"
        ):
            latentrt.generate(model, [words[:2], words[3:6]], **kw, **sampled, allowed_token_ids=[a], bad_words=["a a"])

    def one_nan(input_ids, scores):
        scores[0, 5] = float("nan")
        return scores

    def forced(input_ids, scores):  # +inf: sampling would draw from NaN probabilities (force with -inf elsewhere)
        scores[0, 5] = float("inf")
        return scores

    for broken in (lambda ids, s: s * float("nan"), one_nan, forced):
        with pytest.raises(latentrt.InputError, match="no token left to choose for new token 0"):
            latentrt.generate(model, words[:2], **kw, logits_processors=broken)


@pytest.mark.parametrize("seed", [None, 2, 3])
def test_a_served_request_left_no_token_fails_alone_with_log_probs_and_a_padded_head(seed):
    """The serving engine: the request fails with the message; the others, resident beside it, go on. Its
    token, drawn from nothing, is still a token of the vocabulary: with log-probs asked and a head wider
    than the vocabulary, a padding column once failed the whole step (found by tools.soak)."""
    model = tiny_recurrent(seed=3, vocab_size=37, padded_vocab_size=256)  # (a draw from nothing: mostly padding)
    kw = dict(num_steps=3, init_scale=0.0, max_new_tokens=4, default_stops=False)
    kw.update(temperature=1.0, seed=seed) if seed is not None else None
    a = model.tokenizer.token_to_id("a")
    engine = Engine(model)
    failing = engine.submit([5, 6], GenerateOptions(**kw, allowed_token_ids=[a], bad_words=["a a"]), top_logprobs=3)
    ok = engine.submit([7, 8, 9], GenerateOptions(**kw), top_logprobs=3)
    engine.run_until_idle()
    assert failing.finish_reason == "error" and "no token left to choose for new token 1" in str(failing.error)
    assert ok.finish_reason == "length" and ok.tokens == latentrt.generate(model, [7, 8, 9], **kw).tokens


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list of token ids"),
        (dict(allowed_token_ids=5), "allowed_token_ids must be a non-empty list"),
        (dict(allowed_token_ids=[1, True]), r"allowed_token_ids must hold token ids \(integers\), got True"),
        (dict(allowed_token_ids=[1, 999]), r"allowed_token_ids must be ids of the vocabulary \[0, \d+\), got \[999\]"),
        (dict(bad_words="wumpus"), "bad_words must be a list of strings"),
        (dict(bad_words=["cat", " "]), r"bad_words\[1\] must be a string with a word in it"),
        (dict(bad_words=["cat", 3]), r"bad_words\[1\] must be a string"),
        (dict(bad_words=["cat jabberwock"]), r"bad_words\[0\] 'cat jabberwock': \['jabberwock'\] not in the"),
        (dict(logits_processors=[print, 3]), "logits_processors must be a callable or a list of callables"),
        (dict(logits_processors=lambda ids, s: s[0]), r"must return the scores as a float tensor of shape \(1, "),
        (dict(logits_processors=lambda ids, s: None), "got NoneType"),
        (dict(bad_words=["a"], decoding="speculative"), "bad_words applies with decoding='sequential' only"),
        (dict(logits_processor=[print]), "logits_processors=.* takes transformers' LogitsProcessor callables"),
        (dict(bad_words_ids=[[1]]), "bad_words=.* takes words"),
        (dict(suppress_tokens=[1]), "SuppressTokensLogitsProcessor"),
    ],
)
def test_bad_constraints_are_clear_errors(kwargs, message):
    model, _, words = make("recurrent")
    with pytest.raises(latentrt.InputError, match=message):
        latentrt.generate(model, words[:3], max_new_tokens=2, **kwargs)


def test_bad_words_need_a_tokenizer():
    with pytest.raises(latentrt.InputError, match="bad_words needs a tokenizer"):
        model = tiny_recurrent(seed=1)
        model.tokenizer = None
        latentrt.generate(model, [5, 6], max_new_tokens=2, bad_words=["x"])


def test_the_device_state_matches_the_rule_on_random_histories():
    """TokenConstraints' vectorised match (recent tokens on the device, words right-aligned) against the rule
    written per token, for random words over four tokens (id 0, the end-of-text token, among them: no token
    yet is not token 0) and random histories of several rows."""
    g = torch.Generator().manual_seed(0)
    tok = word_tokenizer([f"w{i}" for i in range(12)])
    names = ["<|endoftext|>", "w0", "w1", "w2"]
    ids_of_names = [tok.token_to_id(n) for n in names]
    assert ids_of_names[0] == 0
    vocab = tok.get_vocab_size()
    for _ in range(30):
        words = [
            " ".join(names[int(t)] for t in torch.randint(0, 4, (int(n),), generator=g))
            for n in torch.randint(1, 4, (3,), generator=g)
        ]
        ids = torch.zeros(3, 2, dtype=torch.long)
        cons = TokenConstraints.build(GenerateOptions(bad_words=words), tok, vocab, [])(ids, torch.ones_like(ids))
        word_ids = bad_word_ids(tok, words)
        history: list[list[int]] = [[], [], []]
        for _step in range(6):
            x = cons.apply(torch.zeros(3, vocab))
            for b in range(3):
                assert set((x[b] == float("-inf")).nonzero()[:, 0].tolist()) == vllm_bad_word_ban(word_ids, history[b])
            tokens = torch.tensor([ids_of_names[int(i)] for i in torch.randint(0, 4, (3,), generator=g)])
            cons.record(tokens)
            for b in range(3):
                history[b].append(int(tokens[b]))


def test_a_sequence_that_stopped_is_asked_nothing():
    """Once a sequence stopped, what the constraints would leave it is no error: here its last token would leave
    it none (allowed {a, b}, b a stop, bad words 'b a' and 'b b'), while the other sequence goes on."""
    model, det, words = make("recurrent")
    tok = model.tokenizer
    prompts = [words[:3], words[5:9]]

    def first(p, a, b):
        return latentrt.generate(model, p, **det, max_new_tokens=1, default_stops=False, allowed_token_ids=[a, b])

    a, b = next(
        (a, b)
        for a in words
        for b in words
        if a != b and first(prompts[0], a, b).tokens == [b] and first(prompts[1], a, b).tokens == [a]
    )
    kw = dict(det, max_new_tokens=6, default_stops=False, allowed_token_ids=[a, b], stop=[b])
    bad = [f"{tok.id_to_token(b)} {tok.id_to_token(a)}", f"{tok.id_to_token(b)} {tok.id_to_token(b)}"]
    out = latentrt.generate(model, prompts, **kw, bad_words=bad)
    assert out.tokens[0] == [b] and len(out.tokens[1]) > 1
    assert out.tokens[1] == latentrt.generate(model, prompts[1], **kw, bad_words=bad).tokens
