"""The text LM's corpus and tokenizer (``benchmarks/textlm.py``) are a function of the
installed packages only: the perplexities of ``llm_quality.py`` are comparable across
runs and machines because the same files give the same documents, split and vocabulary."""
from __future__ import annotations

from tests.helpers import load_benchmark


def test_corpus_and_tokenizer_are_deterministic() -> None:
    textlm = load_benchmark("textlm")
    docs = textlm.documents(("networkx",))  # one small source tree keeps this fast
    assert docs == textlm.documents(("networkx",))
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    paragraphs = [d for _, text in docs for d in text.split("\n\n")]
    assert len(docs) > 50 and sum(map(len, paragraphs)) > 200_000
    assert any(textlm.is_heldout(n) for n in names) and not all(textlm.is_heldout(n) for n in names)
    texts = [t for n, t in docs if not textlm.is_heldout(n)][:40]
    first, second = textlm.build_tokenizer(texts), textlm.build_tokenizer(texts)
    assert first.to_str() == second.to_str()
    sample = docs[0][1][:500]
    assert first.decode(first.encode(sample).ids) == sample  # byte-level: lossless


def test_kv_heads_repeated_compute_the_same_function() -> None:
    """Torch-Pruning is compared on ``as_mha(model)`` because it cannot build the
    grouped-query model's graph: that is fair only if both give the same logits."""
    import torch

    textlm = load_benchmark("textlm")
    gqa = textlm.new_model(seed=3).eval()
    with torch.no_grad():  # weights unlike the initialisation's, so a mis-ordered repeat shows
        for p in gqa.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    mha = textlm.as_mha(gqa)
    assert mha.config.num_key_value_heads == gqa.config.num_attention_heads > gqa.config.num_key_value_heads
    ids = torch.randint(0, gqa.config.vocab_size, (2, 24))
    with torch.no_grad():
        want = gqa(input_ids=ids, use_cache=False).logits
        got = mha(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
