"""The shipped shapes tokenizer: a CLIP BPE tokenizer in which every grammar word is one token."""
import numpy as np
from transformers import CLIPTokenizer

from jaxpref.world import shapes
from jaxpref.data.tokenizer import SHAPES_TOKENIZER_DIR, load_tokenizer, tokenize, write_clip_tokenizer


def test_loads_with_cliptokenizer_and_words_are_whole_tokens():
    tok = CLIPTokenizer.from_pretrained(str(SHAPES_TOKENIZER_DIR))
    assert tok.model_max_length == 16
    assert tok.pad_token == tok.eos_token == "<|endoftext|>" and tok.bos_token == "<|startoftext|>"
    for w in shapes.GRAMMAR_WORDS:
        assert tok.tokenize(w) == [w + "</w>"], w
        ids = tok(w)["input_ids"]
        assert len(ids) == 3 and tok.decode(ids, skip_special_tokens=True) == w


def test_every_caption_round_trips():
    tok = load_tokenizer()
    caps = shapes.all_captions()
    ids = tokenize(tok, caps)
    assert ids.shape == (len(caps), 16) and ids.dtype == np.int32
    assert (ids[:, 0] == tok.bos_token_id).all()
    for c, row in zip(caps, ids):
        assert len(tok.tokenize(c)) == len(c.split())
        assert tok.decode(row, skip_special_tokens=True) == c
        n = len(c.split()) + 2
        assert (row[n - 1:] == tok.eos_token_id).all()  # <|endoftext|> then eot padding, as SD
    assert (tokenize(tok, [""])[0, 1:] == tok.eos_token_id).all()


def test_shipped_files_match_the_generator(tmp_path):
    write_clip_tokenizer(shapes.GRAMMAR_WORDS, tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_text() == (SHAPES_TOKENIZER_DIR / name).read_text(), name
