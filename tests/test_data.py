import torch

from sponlab.io.data import BlockSpec, builtin_corpus, make_blocks, wants_bos
from sponlab.model.tiny import tiny_tokenizer


def test_builtin_corpus_splits_are_disjoint_real_text():
    corpus = builtin_corpus(seed=0)
    assert set(corpus) == {"calib", "train", "val", "test"}
    sets = {k: set(v) for k, v in corpus.items()}
    # evaluation text never appears in calibration/training text, nor val in test
    for a, b in [
        ("val", "test"),
        ("val", "calib"),
        ("val", "train"),
        ("test", "calib"),
        ("test", "train"),
    ]:
        assert not sets[a] & sets[b], (a, b)
    # calib/train are disjoint sets of C4 lines (the file repeats a few boilerplate lines verbatim)
    assert len(sets["calib"] & sets["train"]) < 0.02 * len(sets["train"])
    assert sum(len(d) for d in corpus["test"]) > 500_000  # characters of Wikipedia text
    assert all("<doc" not in d for d in corpus["val"][:50])


def test_make_blocks_shape_bos_and_determinism():
    tok = tiny_tokenizer()
    docs = [" ".join(f"w{(i * 7 + j) % 500}" for j in range(40)) for i in range(20)]
    spec = BlockSpec(block_len=16, count=5, bos=True, seed=1)
    blocks = make_blocks(docs, tok, spec)
    assert blocks.shape == (5, 16) and blocks.dtype == torch.long
    assert torch.all(blocks[:, 0] == tok.bos_token_id)
    assert torch.equal(blocks, make_blocks(docs, tok, spec))
    assert not torch.equal(blocks, make_blocks(docs, tok, BlockSpec(16, 5, True, seed=2)))
    assert wants_bos(tok, False) is False
