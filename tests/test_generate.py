"""Incremental decoding and samples: the KV cache gives the full forward's logits, generation is
deterministic, the prompts are chosen deterministically from validation documents, the Markdown."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from model.generate import (
    Prompt,
    generate,
    generate_samples,
    opening,
    prompts_jsonl,
    read_prompts,
    render_samples,
    samples_artifact_path,
    samples_markdown,
    select_prompts,
    sentence_spans,
)
from model.model import KVCache, Transformer, model_config

VOCAB = 256
EOT = "<|endoftext|>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(**overrides) -> Transformer:
    model = Transformer(model_config("tiny", vocab_size=VOCAB, **overrides))
    model.init_weights(seed=0)
    return model.eval()


def byte_bpe(texts: list[str], vocab_size: int = 300) -> Tokenizer:
    """A small byte-level BPE with an end-of-text token (like tasks/tokenizer.py's, but tiny)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


# -- KV cache ---------------------------------------------------------------------------------------


def test_prefill_through_an_empty_cache_is_the_training_forward_bitwise():
    model = tiny()
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
        cached = model.forward_cached(tokens, KVCache(model.cfg.n_layers, 32))
        assert torch.equal(cached, expected)
        assert torch.equal(model(tokens), expected)  # decoding left no state behind


def test_prefix_then_chunk_then_single_tokens_match_the_full_forward():
    model = tiny()  # 4 query heads over 2 kv heads: the grouped-query path
    tokens = torch.randint(0, VOCAB, (3, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(model.cfg.n_layers, 40)
        parts = [model.forward_cached(tokens[:, :9], cache), model.forward_cached(tokens[:, 9:16], cache)]
        parts += [model.forward_cached(tokens[:, t : t + 1], cache) for t in range(16, 40)]
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        model.forward_cached(tokens[:, :1], cache)


def test_left_padded_rows_decode_as_if_alone():
    """Rows of different lengths, left-padded and masked (KVCache.key_valid), give each row's own
    logits: the prefill, a chunk after it and the fixed-shape decode steps."""
    model = tiny()
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (12, 5, 9)]
    steps = torch.randint(0, VOCAB, (3, 6), generator=gen)
    width = 12
    padded = torch.zeros(3, width, dtype=torch.long)
    key_valid = torch.ones(3, width + 6, dtype=torch.bool)
    for r, ids in enumerate(rows):
        padded[r, width - len(ids) :] = ids
        key_valid[r, : width - len(ids)] = False
    with torch.no_grad():
        cache = KVCache(model.cfg.n_layers, width + 6, key_valid)
        prefill = model.forward_cached(padded, cache)
        chunk = model.forward_cached(steps[:, :3], cache)
        singles = [model.forward_cached(steps[:, t : t + 1], cache) for t in range(3, 6)]
        got = torch.cat([chunk, *singles], dim=1)
        for r, ids in enumerate(rows):
            alone = model(torch.cat([ids, steps[r]])[None])[0]
            torch.testing.assert_close(
                prefill[r, width - len(ids) :], alone[: len(ids)], rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(got[r], alone[len(ids) :], rtol=1e-5, atol=1e-5)


def naive_greedy(model: Transformer, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out]))[0, -1].argmax()))
    return out[len(ids) :]


def test_greedy_generation_equals_decoding_without_a_cache():
    model = tiny()
    prompt = [5, 17, 99, 3, 250, 42]
    assert generate(model, prompt, 20) == naive_greedy(model, prompt, 20)


def test_sampling_is_seeded_and_respects_top_k_and_the_stop_token():
    model = tiny()
    prompt = [1, 2, 3]
    first = generate(model, prompt, 30, temperature=1.0, top_k=20, seed=7)
    assert generate(model, prompt, 30, temperature=1.0, top_k=20, seed=7) == first
    assert generate(model, prompt, 30, temperature=1.0, top_k=20, seed=8) != first
    assert len(first) == 30
    # top-k 1 is greedy whatever the temperature and seed
    assert generate(model, prompt, 12, temperature=2.0, top_k=1, seed=3) == generate(model, prompt, 12)
    greedy = generate(model, prompt, 12)
    assert generate(model, prompt, 12, stop_id=greedy[4]) == greedy[: greedy.index(greedy[4])]
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, model.cfg.max_seq_len)


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens():
    model = tiny(max_seq_len=32)
    long_prompt = list(range(100))
    assert generate(model, long_prompt, 8) == generate(model, long_prompt[-24:], 8)


# -- prompts ----------------------------------------------------------------------------------------


def test_sentences_split_prose_lines_and_cjk_but_not_wrapped_lines():
    text = "NAME\n\nls - list files\nA sentence wrapped\nover two lines. Next one! 你好。再见。"
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "NAME",
        "ls - list files",
        "A sentence wrapped\nover two lines.",
        "Next one!",
        "你好。",
        "再见。",
    ]


def test_prompts_are_the_openings_of_the_first_documents_per_language():
    documents = [
        ("fr", "Trop court."),  # no opening of 40 characters: skipped
        ("fr", "Première phrase assez longue pour un prompt. Deuxième phrase. Troisième."),
        ("de", "Ein erster Satz, der lang genug ist für einen Prompt. Noch einer."),
        ("fr", "Un autre document français, avec une longue phrase d'ouverture. Et la suite."),
        ("fr", "Un troisième document ne sera pas pris, per_language vaut deux ici."),
        ("de", "x" * 500),  # one long word: cut hard at max_chars
    ]
    prompts = select_prompts(documents, per_language=2, min_chars=40, max_chars=120)
    assert [p.lang for p in prompts] == ["de", "de", "fr", "fr"]
    assert prompts[0].text == "Ein erster Satz, der lang genug ist für einen Prompt."
    assert prompts[1].text == "x" * 120
    assert prompts[2].text == "Première phrase assez longue pour un prompt."
    assert prompts[3].text.startswith("Un autre document")
    assert select_prompts(list(reversed(documents)), per_language=2) != prompts  # the caller's order counts
    assert select_prompts(documents, per_language=2, min_chars=40, max_chars=120) == prompts
    # short first sentences are joined until min_chars; a long first sentence is cut at a space
    assert opening("Title\nShort one. Another short one. And more text here.", 30, 200) == (
        "Title\nShort one. Another short one."
    )
    assert opening("word " * 100, 10, 52) == ("word " * 10).strip()


def test_prompts_round_trip_through_jsonl(tmp_path):
    prompts = [Prompt("ja", "日本語の文。"), Prompt("en", 'A "quoted" line\nand another.')]
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(prompts_jsonl(prompts))
    assert read_prompts(path) == prompts
    assert prompts_jsonl(prompts) == path.read_bytes()


# -- samples ----------------------------------------------------------------------------------------


def test_samples_markdown_is_deterministic_and_readable():
    texts = [
        "The cat sat on the mat. The dog ran in the park.",
        "Le chat dort. Le chien court dans le parc.",
    ] * 20
    tokenizer = byte_bpe(texts)
    model = Transformer(model_config("tiny", vocab_size=tokenizer.get_vocab_size()))
    model.init_weights(seed=0)
    model.eval()
    eot = tokenizer.token_to_id(EOT)
    prompts = [Prompt("en", "The cat sat on the mat."), Prompt("fr", "Le chat dort ```dans``` le parc.")]
    settings = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 50, "seed": 0}
    samples = generate_samples(model, tokenizer, prompts, stop_id=eot, **settings)
    assert [s.prompt for s in samples] == [p.text for p in prompts]
    encoded = [tokenizer.encode(sample.prompt, add_special_tokens=False).ids for sample in samples]
    width = max(map(len, encoded)) + 1
    for sample, ids in zip(samples, encoded, strict=True):
        # decoded in one batch: each prompt after end-of-text tokens up to the longest's length
        padded = [eot] * (width - len(ids)) + ids
        assert sample.greedy == tokenizer.decode(generate(model, padded, 12, stop_id=eot))
    markdown = samples_markdown(model, tokenizer, prompts, step=120, stop_id=eot, **settings)
    assert markdown == render_samples(samples, 120, **settings)  # the same samples again: deterministic
    assert markdown.startswith("# Samples at step 120\n")
    assert "temperature 0.8, top-k 50, seed 0" in markdown
    assert markdown.index("## en") < markdown.index("## fr")
    assert "````text\nLe chat dort ```dans``` le parc.\n````" in markdown  # fences longer than the text's
    for sample in samples:
        assert f"```text\n{sample.greedy}\n```" in markdown
        assert f"```text\n{sample.sampled}\n```" in markdown
    assert samples_artifact_path(120) == "samples/step-120.md"
