"""Evaluation prompt sets (docs/methods.md §5), read from local files; a file in the wrong format fails at start.

A prompt set is named by a spec string, ``KIND:ARG`` or a bare path (kind from the file):

  pickapic:/data/test_unique-00000-of-00001.parquet   Pick-a-Pic v2 test_unique (a parquet file or a folder of
                                                    them; the ``caption`` column, deduplicated in order: 500)
  tfds:pickapic_v2:test_unique[:/data/tfds]           a built TFDS dataset's captions (jaxpref.data.sources)
  parti:/data/PartiPrompts.tsv                        PartiPrompts (tab-separated; Prompt, Category, Challenge, Note)
  hpdv2:/data/benchmark                               HPDv2 benchmark: anime.json, concept-art.json, paintings.json,
                                                    photo.json (each a JSON list of strings); the style is the category
  hpdv2:/data/benchmark/photo.json                    one HPDv2 style
  txt:/data/prompts.txt                               one prompt per line (blank lines skipped)
  shapes[:test|:validation]                           the shapes world's held-out captions (never trained on)
  data:test_unique                                    a training run's own dataset's split (data.name in
                                                    data.data_dir), resolved by ``for_run``

Every set keeps one category per prompt (Parti's Category, the HPDv2 style, ...) so results can be
broken down the way the papers report them (HPDv2 per style).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Optional, Sequence

import pyarrow.parquet as pq

from jaxpref.world import shapes
from jaxpref.data.sources import load_prompts as load_source_prompts

HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")
PARTI_COLUMNS = ("Prompt", "Category", "Challenge", "Note")
KINDS = ("pickapic", "tfds", "parti", "hpdv2", "txt", "shapes", "data")


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """Prompts in a fixed order (prompt index i seeds its images) with one category each."""
    name: str
    prompts: tuple
    categories: tuple

    def __post_init__(self):
        if len(self.prompts) != len(self.categories):
            raise ValueError(f"prompt set {self.name}: {len(self.prompts)} prompts, {len(self.categories)} categories")
        if not self.prompts:
            raise ValueError(f"prompt set {self.name}: no prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    def take(self, n: Optional[int]) -> "PromptSet":
        """The first n prompts (all if n is None or larger)."""
        if n is None or n >= len(self):
            return self
        return PromptSet(f"{self.name}[:{n}]", self.prompts[:n], self.categories[:n])


def _bad(path: str, expected: str, found: str) -> ValueError:
    return ValueError(f"{path}: not a valid prompt file; expected {expected}; found {found}")


def _dedupe(prompts: Sequence[str], categories: Sequence[str]) -> tuple[tuple, tuple]:
    """First occurrence wins, order kept (Pick-a-Pic's test_unique still repeats a few captions)."""
    seen = {}
    for p, c in zip(prompts, categories):
        seen.setdefault(p, c)
    return tuple(seen), tuple(seen.values())


# ---------------------------------------------------------------------------------------------
# Readers, one per format.

def read_txt(path: str) -> PromptSet:
    """One prompt per line (UTF-8), blank lines skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except UnicodeDecodeError as e:
        raise _bad(path, "UTF-8 text, one prompt per line", f"undecodable bytes ({e})") from e
    prompts = tuple(line for line in lines if line)
    if not prompts:
        raise _bad(path, "UTF-8 text, one prompt per line", "no non-empty line")
    return PromptSet(os.path.basename(path), prompts, ("",) * len(prompts))


def read_parti(path: str) -> PromptSet:
    """PartiPrompts.tsv: a header row with Prompt, Category, Challenge, Note, tab-separated."""
    expected = f"a tab-separated file with header columns {list(PARTI_COLUMNS)}"
    try:
        with open(path, encoding="utf-8") as f:
            rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    except UnicodeDecodeError as e:
        raise _bad(path, expected, f"undecodable bytes ({e})") from e
    if not rows or rows[0][:2] != list(PARTI_COLUMNS[:2]):
        raise _bad(path, expected, f"header {rows[0] if rows else 'none'}")
    header = rows[0]
    prompts, categories = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0].strip():
            raise _bad(path, expected, f"line {n} with {len(row)} columns: {row!r}")
        prompts.append(row[header.index("Prompt")].strip())
        categories.append(row[header.index("Category")].strip())
    return PromptSet("partiprompts", tuple(prompts), tuple(categories))


def _read_json_list(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _bad(path, "a JSON list of prompt strings (HPDv2 benchmark format)", f"invalid JSON ({e})") from e
    if not isinstance(data, list) or not data or not all(isinstance(p, str) for p in data):
        raise _bad(path, "a non-empty JSON list of prompt strings (HPDv2 benchmark format)", type(data).__name__)
    return data


def read_hpdv2(path: str, styles: Sequence[str] = HPDV2_STYLES) -> PromptSet:
    """HPDv2's benchmark prompts: a folder of <style>.json (all four styles) or one <style>.json."""
    if os.path.isfile(path):
        style = os.path.splitext(os.path.basename(path))[0]
        prompts = _read_json_list(path)
        return PromptSet(f"hpdv2/{style}", tuple(prompts), (style,) * len(prompts))
    missing = [s for s in styles if not os.path.isfile(os.path.join(path, f"{s}.json"))]
    if missing:
        raise _bad(path, f"a folder with {[s + '.json' for s in styles]}",
                   f"{sorted(os.listdir(path))} (missing {missing})")
    prompts, categories = [], []
    for style in styles:
        items = _read_json_list(os.path.join(path, f"{style}.json"))
        prompts += items
        categories += [style] * len(items)
    # HPDv2 scores every (style, prompt) separately, so a prompt repeated across styles stays repeated.
    return PromptSet("hpdv2", tuple(prompts), tuple(categories))


def read_pickapic_parquet(path: str) -> PromptSet:
    """Pick-a-Pic v2 captions from a parquet file or folder (only the ``caption`` column is read)."""
    files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]
    if not files:
        raise _bad(path, "a .parquet file or a folder of them (Pick-a-Pic v2 test_unique)", sorted(os.listdir(path)))
    captions = []
    for file in files:
        try:
            schema = pq.read_schema(file)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError variants
            raise _bad(file, "a parquet file with a 'caption' column", f"unreadable as parquet ({e})") from e
        if "caption" not in schema.names:
            raise _bad(file, "a parquet file with a 'caption' column", f"columns {schema.names}")
        captions += [c.decode() if isinstance(c, bytes) else str(c)
                     for c in pq.read_table(file, columns=["caption"]).column("caption").to_pylist() if c is not None]
    prompts, categories = _dedupe([c.strip() for c in captions if c.strip()], [""] * len(captions))
    return PromptSet("pickapic_v2", prompts, categories)


def tfds_parts(arg: str) -> tuple[str, str, str]:
    """A ``tfds:`` spec's ``NAME[:SPLIT[:DATA_DIR]]`` -> (name, split (default test_unique), data_dir or "")."""
    name, _, rest = arg.partition(":")
    split, _, data_dir = rest.partition(":")
    return name, split or "test_unique", data_dir


def read_tfds(arg: str) -> PromptSet:
    """``NAME:SPLIT[:DATA_DIR]`` -> unique captions of a built TFDS dataset (jaxpref.data.sources)."""
    name, split, data_dir = tfds_parts(arg)
    prompts = tuple(load_source_prompts(name, split, data_dir or None))
    return PromptSet(f"{name}/{split}", prompts, ("",) * len(prompts))


def read_shapes(split: str = "test") -> PromptSet:
    """The shapes world's held-out captions (jaxpref.world.shapes.caption_splits)."""
    if split not in ("test", "validation"):
        raise ValueError(f"prompt set shapes:{split}: supported splits are 'test' and 'validation'")
    prompts = tuple(shapes.heldout_prompts(split))
    return PromptSet(f"shapes/{split}", prompts, ("",) * len(prompts))


# ---------------------------------------------------------------------------------------------
# Specs.

def _infer_kind(path: str) -> str:
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "anime.json")):
            return "hpdv2"
        if glob.glob(os.path.join(path, "*.parquet")):
            return "pickapic"
    ext = os.path.splitext(path)[1].lower()
    kinds = {".txt": "txt", ".tsv": "parti", ".json": "hpdv2", ".parquet": "pickapic"}
    if ext in kinds:
        return kinds[ext]
    raise ValueError(f"{path}: cannot tell the prompt-set format; write it as KIND:PATH with KIND in {list(KINDS)}")


def parse_spec(spec: str) -> tuple[str, str]:
    """'parti:/x.tsv' -> ('parti', '/x.tsv'); a bare path -> (kind from the file, path); 'shapes' -> ('shapes', '')."""
    kind, sep, arg = spec.partition(":")
    if sep and kind in KINDS:
        return kind, arg
    if spec == "shapes":
        return "shapes", ""
    return _infer_kind(os.path.expanduser(spec)), spec


def for_run(spec: str, data_name: str, data_dir: Optional[str]) -> str:
    """``spec`` as a run with dataset ``data_name`` in ``data_dir`` reads it: ``data:SPLIT`` is that dataset's
    split (its held-out captions, built beside the training split), and a ``tfds:NAME:SPLIT`` spec without a
    data dir takes ``data_dir``; any other spec is returned as is."""
    kind, sep, arg = spec.partition(":")
    if kind == "data" and sep:
        arg = f"{data_name}:{arg}"
    elif kind != "tfds" or not sep:
        return spec
    name, split, given = tfds_parts(arg)
    folder = given or data_dir
    return f"tfds:{name}:{split}:{folder}" if folder else f"tfds:{name}:{split}"


def load_prompts(spec: str, limit: Optional[int] = None) -> PromptSet:
    """The prompt set of a spec (module docstring); ``limit`` keeps the first n prompts."""
    kind, arg = parse_spec(spec)
    if kind == "shapes":
        return read_shapes(arg or "test").take(limit)
    if kind == "tfds":
        return read_tfds(arg).take(limit)
    if kind == "data":
        raise ValueError(f"prompt set {spec!r} is a training run's own dataset split: a run (config.eval.prompts) or "
                         "python -m jaxpref.evaluate with that run's --checkpoint or --config reads it; elsewhere "
                         "write tfds:NAME:SPLIT:DATA_DIR")
    path = os.path.expanduser(arg)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such prompt file or folder (prompt set spec {spec!r})")
    readers = {"txt": read_txt, "parti": read_parti, "hpdv2": read_hpdv2, "pickapic": read_pickapic_parquet}
    return readers[kind](path).take(limit)
