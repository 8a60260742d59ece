"""The embedded "shapes" world: a procedural text-to-image task with an exact reward.

A stand-in for Pick-a-Pic + PickScore that runs anywhere in seconds, so the whole pipeline can learn
preference on a CPU:

- captions from a small grammar: "a red circle on a blue background", "two green squares on a white
  background", ... (`all_captions`, `parse_caption`, `caption_splits` for train / held-out prompts);
- `render(scene, rng, size, flaws)`: a 32x32 (configurable) uint8 RGB image with random position, size,
  colour jitter and a little noise, optionally with flaws (wrong colour / count / shape / background,
  clutter, blur, heavy noise);
- `reward_batch(images, captions) -> [B]`: how well an image matches its caption, in [0, 1], computed
  from pixels only, so it also scores blurry model generations (background from border pixels, colour
  precision of the object pixels, count from connected components of the caption-colour mask, shape from
  the fill ratio of each component's bounding box).

Everything is numpy and deterministic given the seed.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

# Palette in uint8 RGB. Pairwise distances (in [0,1] units) are >= 0.45, well above the reward's colour
# tolerance, so every colour is recognisable after blur and noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (150, 30, 200),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
OBJECT_COLORS = ("red", "green", "blue", "yellow", "purple", "white", "black")
BACKGROUNDS = ("white", "black", "gray", "blue")
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
COUNTS = tuple(COUNT_WORDS)
_WORD_COUNTS = {w: c for c, w in COUNT_WORDS.items()}

# Every word the grammar can produce (the tokenizer maps each to one token).
GRAMMAR_WORDS = tuple(sorted(set(
    list(COUNT_WORDS.values()) + list(PALETTE) + list(SHAPES) + [s + "s" for s in SHAPES]
    + ["on", "background"])))

FLAWS = ("color", "count", "shape", "background", "clutter", "blur", "noise")
SCENE_FLAWS = ("color", "count", "shape", "background", "clutter")

# Mean fill ratio (component area / bounding-box area) of each clean shape as rendered at 24-64 px;
# the reward's shape term compares against these.
FILL_RATIO = {"circle": 0.79, "square": 1.0, "triangle": 0.56}


@dataclasses.dataclass(frozen=True)
class Scene:
    """What a caption asks for."""

    color: str
    shape: str
    count: int
    background: str

    @property
    def caption(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} on a {self.background} background"


@functools.lru_cache(maxsize=4096)
def parse_caption(caption: str) -> Scene:
    """'two red squares on a blue background' -> Scene('red', 'square', 2, 'blue'). ValueError if off-grammar."""
    words = caption.strip().lower().split()
    if (len(words) != 7 or words[3:5] != ["on", "a"] or words[6] != "background" or words[0] not in _WORD_COUNTS
            or words[1] not in OBJECT_COLORS or words[5] not in BACKGROUNDS):
        raise ValueError(f"caption {caption!r} is not in the shapes grammar "
                         f"('<a|two|three> <colour> <shape[s]> on a <background> background')")
    count = _WORD_COUNTS[words[0]]
    shape = words[2][:-1] if count > 1 and words[2].endswith("s") else words[2]
    if shape not in SHAPES or (count > 1) != words[2].endswith("s") or words[1] == words[5]:
        raise ValueError(f"caption {caption!r} is not in the shapes grammar")
    return Scene(words[1], shape, count, words[5])


def all_scenes() -> list[Scene]:
    """Every valid scene (object colour != background colour), in a fixed order: 225 scenes."""
    return [Scene(c, s, n, b) for b in BACKGROUNDS for c in OBJECT_COLORS if c != b for s in SHAPES for n in COUNTS]


def all_captions() -> list[str]:
    return [s.caption for s in all_scenes()]


def caption_splits(holdout_seed: int = 0, n_validation: int = 16, n_test: int = 32) -> dict[str, list[str]]:
    """Partition the 225 captions into train / validation / test (held-out prompts never seen in training).

    The split depends only on `holdout_seed`, not on the data seed, so held-out prompts are stable across
    dataset builds. Every colour, shape, count and background still occurs in train (compositional split).
    """
    captions = all_captions()
    order = np.random.default_rng(holdout_seed).permutation(len(captions))
    held = [captions[i] for i in order[: n_validation + n_test]]
    train = [captions[i] for i in sorted(order[n_validation + n_test:])]
    for word_set, pick in ((OBJECT_COLORS, lambda s: s.color), (SHAPES, lambda s: s.shape),
                           (COUNTS, lambda s: s.count), (BACKGROUNDS, lambda s: s.background)):
        seen = {pick(parse_caption(c)) for c in train}
        if seen != set(word_set):  # cannot happen for sane sizes; keeps the split honest
            raise ValueError(f"caption_splits: held-out set too large, train lacks {set(word_set) - seen}")
    return {"train": train, "validation": sorted(held[:n_validation]), "test": sorted(held[n_validation:])}


def heldout_prompts(split: str = "test", holdout_seed: int = 0) -> list[str]:
    """Held-out evaluation prompts (captions absent from the training data)."""
    return caption_splits(holdout_seed)[split]


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _shape_mask(shape: str, cy: float, cx: float, s: float, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Pixels (centres yy, xx) covered by a shape of bounding-box side s centred at (cy, cx)."""
    h = s / 2
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= h * h
    if shape == "square":
        return (np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= h)
    if shape == "triangle":  # upright isosceles, base s, height s
        t = (yy - (cy - h)) / s  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * h)
    raise ValueError(f"unknown shape {shape!r}")


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of [H, W, C] float, reflect padding."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    out = img
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        p = np.pad(out, pad, mode="reflect")
        n = out.shape[axis]
        out = sum(k[i] * np.take(p, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
    return out


def _place(rng: np.random.Generator, sizes: Sequence[float], size: int, taken: list) -> list | None:
    """Non-overlapping centres (bounding boxes at least 2 px apart, 1 px off the border) or None."""
    out = []
    for s in sizes:
        for _ in range(50):
            lo, hi = 1 + s / 2, size - 1 - s / 2
            if hi <= lo:
                return None
            cy, cx = rng.uniform(lo, hi, size=2)
            if all(abs(cy - y) > (s + t) / 2 + 2 or abs(cx - x) > (s + t) / 2 + 2 for y, x, t in taken + out):
                out.append((cy, cx, s))
                break
        else:
            return None
    return out


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-blurred copy of a uint8 [H, W, 3] image (sigma in pixels)."""
    out = _gaussian_blur(np.asarray(image, np.float32), sigma)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sample_flaws(rng: np.random.Generator, p_clean: float = 0.15, max_flaws: int = 2) -> tuple[str, ...]:
    """A random set of 0..max_flaws distinct flaws (none with probability p_clean)."""
    if rng.random() < p_clean:
        return ()
    n = int(rng.integers(1, max_flaws + 1))
    return tuple(sorted(rng.choice(FLAWS, size=n, replace=False).tolist()))


def render(scene: Scene | str, rng: np.random.Generator, size: int = 32, flaws: Sequence[str] = (),
           noise_std: float = 3.0) -> np.ndarray:
    """Draw a scene as uint8 [size, size, 3]; each flaw in `flaws` (see FLAWS) makes it wrong in one way.

    Variation (position, object size, colour jitter, pixel noise) comes from `rng`, so the same rng state
    gives the same image.
    """
    if isinstance(scene, str):
        scene = parse_caption(scene)
    unknown = set(flaws) - set(FLAWS)
    if unknown:
        raise ValueError(f"unknown flaws {sorted(unknown)}; choose from {FLAWS}")
    colors = [scene.color] * scene.count
    shapes = [scene.shape] * scene.count
    bg = scene.background
    if "count" in flaws:
        n = int(rng.choice([c for c in (1, 2, 3, 4) if c != scene.count]))
        colors, shapes = [scene.color] * n, [scene.shape] * n
    if "color" in flaws:
        wrong = str(rng.choice([c for c in OBJECT_COLORS if c not in (scene.color, bg)]))
        if len(colors) > 1 and rng.random() < 0.4:  # one object off, the rest right
            colors[int(rng.integers(len(colors)))] = wrong
        else:
            colors = [wrong] * len(colors)
    if "shape" in flaws:
        wrong = str(rng.choice([s for s in SHAPES if s != scene.shape]))
        if len(shapes) > 1 and rng.random() < 0.4:
            shapes[int(rng.integers(len(shapes)))] = wrong
        else:
            shapes = [wrong] * len(shapes)
    if "background" in flaws:
        bg = str(rng.choice([c for c in PALETTE if c != bg and c not in colors]))

    n = len(colors)
    frac = {1: (0.28, 0.45), 2: (0.22, 0.34)}.get(n, (0.18, 0.27))
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(PALETTE[bg], np.float32) + rng.uniform(-6, 6, size=3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    placed = None
    for shrink in (1.0, 0.85, 0.7, 0.55, 0.4):
        sizes = rng.uniform(*frac, size=n) * size * shrink
        placed = _place(rng, list(np.maximum(sizes, 4.0)), size, [])
        if placed is not None:
            break
    if placed is None:
        raise ValueError(f"render: cannot place {n} objects at size {size}; use size >= 16")
    for (cy, cx, s), c, sh in zip(placed, colors, shapes):
        img[_shape_mask(sh, cy, cx, s, yy, xx)] = np.asarray(PALETTE[c], np.float32) + rng.uniform(-8, 8, size=3)
    if "clutter" in flaws:
        others = [c for c in PALETTE if c not in (scene.color, bg)]
        k = int(rng.integers(1, 4))
        extra = _place(rng, list(rng.uniform(0.12, 0.2, size=k) * size), size, placed) or []
        for cy, cx, s in extra:
            img[_shape_mask(str(rng.choice(SHAPES)), cy, cx, max(s, 3.0), yy, xx)] = PALETTE[str(rng.choice(others))]
        speck = rng.random((size, size)) < 0.02  # stray pixels of random colours
        img[speck] = rng.uniform(0, 255, size=(int(speck.sum()), 3))
    if "blur" in flaws:
        img = _gaussian_blur(img, float(rng.uniform(0.7, 1.4)) * size / 32)
    std = float(rng.uniform(25, 50)) if "noise" in flaws else noise_std
    img = img + rng.normal(0.0, std, size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# Reward

_W = {"background": 0.2, "color": 0.25, "count": 0.25, "shape": 0.3}


def _soft_near(d: np.ndarray, lo: float = 0.15, hi: float = 0.35) -> np.ndarray:
    """1 for colour distance <= lo, 0 for >= hi, linear between."""
    return np.clip((hi - d) / (hi - lo), 0.0, 1.0)


def _to_unit(images) -> np.ndarray:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return np.clip(x.astype(np.float32), 0.0, 1.0)


def _components(mask: np.ndarray) -> np.ndarray:
    """8-connected component labels of a bool [B, H, W] mask (0 = off), by max-label propagation."""
    B, H, W = mask.shape
    lab = np.where(mask, np.arange(1, H * W + 1, dtype=np.int32).reshape(1, H, W), 0)
    active = np.arange(B)  # images whose labels still change
    while active.size:
        cur = lab[active]
        p = np.pad(cur, ((0, 0), (1, 1), (1, 1)))
        nxt = cur
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                nxt = np.maximum(nxt, p[:, dy:dy + H, dx:dx + W])
        nxt = np.where(mask[active], nxt, 0)
        # Pointer jumping: a label is the flat index (+1) of a pixel of the same component whose own label is
        # at least as large, so adopting that pixel's label is safe and halves long propagation paths.
        flat = nxt.reshape(len(active), H * W)
        jumped = np.take_along_axis(flat, np.maximum(flat - 1, 0), axis=1)
        nxt = np.where(flat > 0, np.maximum(flat, jumped), 0).reshape(nxt.shape)
        changed = (nxt != cur).any(axis=(1, 2))
        lab[active] = nxt
        active = active[changed]
    return lab


def reward_terms(images, captions: Sequence[str], value_range: tuple[float, float] = (0.0, 1.0)) -> dict[str, np.ndarray]:
    """The four reward terms, each [B] in [0, 1], plus 'count_found' (components of the caption colour).

    images: [B, H, W, 3] uint8 (0..255) or float in `value_range` (e.g. (-1, 1) for model outputs).
    """
    x = np.asarray(images)
    if x.dtype != np.uint8:
        lo, hi = value_range
        x = (x.astype(np.float32) - lo) / (hi - lo)
    x = _to_unit(x)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"reward: images must be [B, H, W, 3], got {x.shape}")
    B, H, W, _ = x.shape
    if len(captions) != B:
        raise ValueError(f"reward: {B} images but {len(captions)} captions")
    scenes = [parse_caption(c if isinstance(c, str) else c.decode()) for c in captions]
    target = np.asarray([PALETTE[s.color] for s in scenes], np.float32)[:, None, None] / 255.0  # [B,1,1,3]
    bg_target = np.asarray([PALETTE[s.background] for s in scenes], np.float32)[:, None] / 255.0  # [B,1,3]

    # Background: border pixels (a ring 1/16 of the side wide) against the caption's background colour.
    r = max(1, H // 16)
    ring = np.ones((H, W), bool)
    ring[r:H - r, r:W - r] = False
    border = x[:, ring]  # [B, P, 3]
    s_bg = _soft_near(np.linalg.norm(border - bg_target, axis=-1)).mean(axis=1)

    # Objects: pixels away from the image's own background (median border colour), whatever it is.
    bg_est = np.median(border, axis=1)[:, None, None]  # [B,1,1,3]
    objness = np.clip((np.linalg.norm(x - bg_est, axis=-1) - 0.12) / 0.15, 0.0, 1.0)  # [B,H,W]
    on_target = _soft_near(np.linalg.norm(x - target, axis=-1))
    min_size = max(3, int(round(0.005 * H * W)))
    obj_mass = objness.sum(axis=(1, 2))
    s_color = np.where(obj_mass >= min_size, (objness * on_target).sum(axis=(1, 2)) / np.maximum(obj_mass, 1e-6), 0.0)

    # Count and shape from connected components of the caption-colour mask.
    mask = on_target > 0.5
    lab = _components(mask)
    keys = (np.arange(B)[:, None, None] * (H * W + 1) + lab)[mask]
    found = np.zeros(B)
    s_shape = np.zeros(B)
    if keys.size:
        uniq, inv, area = np.unique(keys, return_inverse=True, return_counts=True)
        rows, cols = np.nonzero(mask.reshape(B * H, W))
        rows = rows % H
        order = np.argsort(inv, kind="stable")
        starts = np.concatenate([[0], np.cumsum(area)[:-1]])
        h = np.maximum.reduceat(rows[order], starts) - np.minimum.reduceat(rows[order], starts) + 1
        w = np.maximum.reduceat(cols[order], starts) - np.minimum.reduceat(cols[order], starts) + 1
        fill = area / (h * w)
        img_of = uniq // (H * W + 1)
        want = np.asarray([FILL_RATIO[s.shape] for s in scenes])[img_of]
        tol = 0.07 + 0.5 / np.sqrt(area)  # rasterisation spreads the fill ratio of small shapes ~ 1/side
        comp_score = np.exp(-(((fill - want) / tol) ** 2)) * np.exp(-((np.log(w / h) / 0.5) ** 2))
        valid = area >= min_size
        found = np.bincount(img_of[valid], minlength=B).astype(np.float64)
        wsum = np.bincount(img_of[valid], weights=area[valid], minlength=B)
        s_shape = np.bincount(img_of[valid], weights=(area * comp_score)[valid], minlength=B) / np.maximum(wsum, 1)
    want_n = np.asarray([s.count for s in scenes], np.float64)
    s_count = np.exp(-np.abs(found - want_n))
    return {"background": s_bg.astype(np.float32), "color": s_color.astype(np.float32),
            "count": s_count.astype(np.float32), "shape": s_shape.astype(np.float32),
            "count_found": found.astype(np.int32)}


def reward_batch(images, captions: Sequence[str], value_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """Reward in [0, 1] of each image for its caption: float32 [B].

    images: [B, H, W, 3] uint8, or float in `value_range` (default [0, 1]; pass (-1, 1) for decoder output).
    0.2 background + 0.25 colour + 0.25 count + 0.3 shape; a clean correct render scores ~0.95-1.
    """
    t = reward_terms(images, captions, value_range)
    return sum(_W[k] * t[k] for k in _W).astype(np.float32)


def reward(image, caption: str, value_range: tuple[float, float] = (0.0, 1.0)) -> float:
    """Reward of one image [H, W, 3] for one caption (see reward_batch)."""
    return float(reward_batch(np.asarray(image)[None], [caption], value_range)[0])


def score_fn(images, captions) -> np.ndarray:
    """The scorer-callable form used by jaxpref.data.scores / experts: uint8 [B,H,W,3], captions -> [B]."""
    return reward_batch(images, [c.decode() if isinstance(c, bytes) else c for c in captions])


# ----------------------------------------------------------------------------------------------------------
# Dataset generation (used by the `shapes` TFDS builder; plain generators so they are testable alone)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([seed, *keys])


def _render_pair(cap: str, seed: int, split_key: int, i: int, retry: int, size: int, p_clean: float):
    rng = _rng(seed, split_key, i, retry)
    flaws = (sample_flaws(rng, p_clean), sample_flaws(rng, p_clean))
    return np.stack([render(cap, rng, size, f) for f in flaws]), flaws


def generate_pairs(captions: Sequence[str], n: int, seed: int, size: int = 32, tie_margin: float = 0.02,
                   split_key: int = 0, p_clean: float = 0.15, one_per_caption: bool = False, chunk: int = 128):
    """Yield (key, example) preference pairs of imperfect renders, winner first, ties dropped.

    Attempt i renders captions[i % len] twice with random flaws (`sample_flaws`), scores both with the
    reward and keeps the pair when the rewards differ by more than `tie_margin` (so about 5% of the n
    attempts are dropped). With one_per_caption, each caption gets exactly one pair (re-drawn until it is
    not a tie), as in Pick-a-Pic's *_unique splits. Examples hold uint8 images; the builder encodes them.
    """
    def example(i, cap, imgs, flaws, r):
        w = int(np.argmax(r))
        order = [w, 1 - w]
        return {"caption": cap, "images": imgs[order], "rewards": r[order],
                "flaws": [",".join(flaws[j]) for j in order],
                "uids": [f"shapes-{split_key}-{i}-{j}" for j in order], "swapped": w == 1}

    if one_per_caption:
        done, pending = {}, list(range(len(captions)))
        for retry in range(100):
            if not pending:
                break
            rendered = [_render_pair(captions[i], seed, split_key, i, retry, size, p_clean) for i in pending]
            imgs = np.concatenate([im for im, _ in rendered])
            r = reward_batch(imgs, [captions[i] for i in pending for _ in (0, 1)]).reshape(-1, 2)
            still = []
            for k, i in enumerate(pending):
                if abs(float(r[k, 0] - r[k, 1])) > tie_margin:
                    done[i] = example(i, captions[i], rendered[k][0], rendered[k][1], r[k])
                else:
                    still.append(i)
            pending = still
        for i in sorted(done):
            yield i, done[i]
        return
    for start in range(0, n, chunk):
        idx = range(start, min(n, start + chunk))
        caps = [captions[i % len(captions)] for i in idx]
        rendered = [_render_pair(c, seed, split_key, i, 0, size, p_clean) for c, i in zip(caps, idx)]
        r = reward_batch(np.concatenate([im for im, _ in rendered]), [c for c in caps for _ in (0, 1)]).reshape(-1, 2)
        for k, i in enumerate(idx):
            if abs(float(r[k, 0] - r[k, 1])) > tie_margin:  # else a tie: dropped
                yield i, example(i, caps[k], rendered[k][0], rendered[k][1], r[k])


def generate_base(captions: Sequence[str], per_caption: int, seed: int, size: int = 32, p_clean: float = 0.5):
    """Yield (key, example) single images for base-model training: per caption, a mix of clean and flawed."""
    for ci, cap in enumerate(captions):
        for k in range(per_caption):
            rng = _rng(seed, 99, ci, k)
            flaws = sample_flaws(rng, p_clean)
            img = render(cap, rng, size, flaws)
            yield ci * per_caption + k, {"caption": cap, "image": img, "flaws": ",".join(flaws),
                                         "uid": f"shapes-base-{ci}-{k}"}
