"""Caption tokenization: CLIP BPE tokenizers (SD's, or the tiny one shipped for the shapes world).

`load_tokenizer(path=None)` returns a `transformers.CLIPTokenizer`; without a path it is the shapes
tokenizer in jaxpref/assets/shapes_tokenizer (every grammar word is one token, "red" -> "red</w>",
model_max_length 16, padding with <|endoftext|> as SD does). `tokenize` pads/truncates to that length.

`python -m jaxpref.data.tokenizer OUT_DIR` rebuilds the shipped files from the grammar.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import pathlib
import sys
from typing import Sequence

import numpy as np


SHAPES_TOKENIZER_DIR = pathlib.Path(__file__).resolve().parents[1] / "assets" / "shapes_tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable unicode map (ASCII letters map to themselves)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe(words: Sequence[str]) -> list[tuple[str, str]]:
    """BPE merges, most frequent pair first, until every word is a single '<word></w>' symbol.

    Applying merges in rank order (as CLIPTokenizer does) reproduces the training segmentation, so each
    training word encodes to exactly one token.
    """
    seqs = {w: list(w[:-1]) + [w[-1] + "</w>"] for w in sorted(set(words))}
    merges = []
    while True:
        counts = collections.Counter()
        for seq in seqs.values():
            for pair in zip(seq, seq[1:]):
                counts[pair] += 1
        if not counts:
            return merges
        best = max(counts.items(), key=lambda kv: (kv[1], [-ord(ch) for ch in "".join(kv[0])]))[0]
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out


def write_clip_tokenizer(words: Sequence[str], out_dir: str | os.PathLike, model_max_length: int = 16) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json for a CLIP BPE tokenizer.

    Vocabulary layout as CLIP's: 256 byte symbols, the same with '</w>', one entry per merge, then
    <|startoftext|> and <|endoftext|> last; any text still tokenizes (character-level past the grammar).
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = train_bpe(words)
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "do_lower_case": True,
              "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str | os.PathLike | None = None):
    """A transformers.CLIPTokenizer from a folder (vocab.json + merges.txt, or the tokenizer.json that
    transformers 5 writes); default: the shapes tokenizer."""
    from transformers import CLIPTokenizer

    folder = pathlib.Path(path) if path is not None else SHAPES_TOKENIZER_DIR
    bpe_files = (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    if not bpe_files and not (folder / "tokenizer.json").is_file():
        raise ValueError(f"tokenizer folder {folder}: expected vocab.json and merges.txt (a CLIP BPE tokenizer, "
                         "e.g. an SD checkpoint's tokenizer/ folder) or tokenizer.json")
    return CLIPTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, captions: Sequence[str | bytes], max_length: int | None = None) -> np.ndarray:
    """Captions -> token ids int32 [B, max_length] (default tokenizer.model_max_length), padded with the pad token
    (SD's: <|endoftext|>) and truncated, as SD pipelines tokenize prompts. Training, evaluation, the loaders and the
    latent cache all tokenize with this."""
    texts = [c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions]
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length or tokenizer.model_max_length,
                    return_tensors="np")["input_ids"]
    return np.asarray(ids, np.int32)


if __name__ == "__main__":
    from jaxpref.world.shapes import GRAMMAR_WORDS   # the shapes world's words (the models never import the world)

    write_clip_tokenizer(GRAMMAR_WORDS, sys.argv[1] if len(sys.argv) > 1 else SHAPES_TOKENIZER_DIR)
