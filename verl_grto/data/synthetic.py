"""A synthetic referring-segmentation world: shape scenes and expressions that need reasoning.

Why synthetic: the whole GRTO pipeline (policy -> prompt -> tool -> mask reward) must be trainable
and testable on a CPU in minutes, with exact ground truth and a controlled domain shift. Each scene
holds 1-4 solid *non-convex* shapes (:data:`SCENE_SHAPES`: ring, cross, crescent, star) of named
colour, size and position. Non-convex on purpose: a mask that simply fills the object's box scores
about 0.5 IoU on them (0.7-1.0 on circles and squares), so a tool that segments has room to beat the
trivial answer.

Two domains, one shift that hurts the tool but not the policy's eyes:

* ``plain``: solid-colour shapes on a uniform, lightly noisy background (the tool's pre-training domain,
  the stand-in for SAM2's own training distribution);
* ``camouflage``: a cluttered background of grey-toned rectangles, ellipses and stripes; the object is
  painted with a striped / checked / graded texture in its own hue, blended half-and-half into the
  clutter, with no outline. Its hue stays readable (the policy can still tell where the red thing is),
  while its edges and interior look nothing like what the plain-trained tool has seen.

Referring expressions are small structured objects (:class:`Expr`) with a semantics
(:func:`resolve`) evaluated against the scene; the sampler keeps only expressions that resolve to
exactly one object, and only uses a superlative or a relation when it is needed to tell objects
apart ("the largest shape left of the red circle"). Superlatives need a clear margin (area ratio
:data:`AREA_RATIO`, position gap :data:`POSITION_MARGIN` of the image size); relations need the boxes
to be strictly apart, so every expression is unambiguous to a human looking at the picture.

Determinism: sample ``i`` of a split is drawn from its own generator seeded by ``(seed, split,
domain, i)``, so train and val never share a stream and a prefix of a larger split equals the
smaller split.
"""

from __future__ import annotations

import io
import json
import zlib
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from verl_grto.atomic import build_dir_once
from verl_grto.data.frame import PIXELS, check_coords
from verl_grto.data.masks import encode_rle, mask_to_box
from verl_grto.data.parquet import write_rows_atomic
from verl_grto.data.schema import GroundTruth, RLRow, build_short_instruction

DOMAINS = ("plain", "camouflage")
#: Every shape the grammar knows (hand-made scenes and real expressions may use any of them).
SHAPES = ("ring", "cross", "crescent", "star", "circle", "square", "triangle", "diamond")
#: The shapes generated scenes are drawn from: solid but non-convex, so box fill is a weak answer.
SCENE_SHAPES = ("ring", "cross", "crescent", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 190),
    "orange": (240, 135, 25),
    "cyan": (40, 200, 210),
    "pink": (245, 125, 185),
}
TEXTURES = ("solid", "stripes", "checker", "gradient")
#: Textures of camouflaged objects (plain objects are solid).
CAMOUFLAGE_TEXTURES = ("stripes", "checker", "gradient")
SUPERLATIVES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("left of", "right of", "above", "below")

#: "largest"/"smallest" need the winner's visible area to differ from the runner-up's by this factor.
AREA_RATIO = 1.25
#: "leftmost" etc. need the winner's box centre this far (fraction of the image size) from the runner-up's.
POSITION_MARGIN = 0.05
#: Two shapes may overlap by at most this fraction of the smaller one's area.
MAX_OVERLAP = 0.1
#: Half-extent of a shape, as a fraction of the image size.
HALF_SIZE_RANGE = (0.12, 0.22)
#: Chance that a new object copies a previous object's shape or colour (so attributes alone do not suffice).
SHARE_ATTRIBUTE_P = 0.4
#: Builder version: bump it whenever the generated data changes, so cached datasets are rebuilt.
GENERATOR_VERSION = 2

_PLACEMENT_TRIES = 60
_SCENE_TRIES = 20


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One shape. ``mask`` is its visible pixels (shapes drawn later occlude earlier ones)."""

    shape: str
    color: str
    texture: str
    mask: np.ndarray  # (H, W) bool
    box: tuple[float, float, float, float]  # tight box of ``mask``, x2/y2 exclusive

    @cached_property
    def area(self) -> int:
        return int(self.mask.sum())

    @cached_property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return ((x1 + x2) / 2, (y1 + y2) / 2)


@dataclass(frozen=True, eq=False)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: tuple[SceneObject, ...]
    domain: str

    @property
    def size(self) -> int:
        return int(self.image.shape[0])


@dataclass(frozen=True)
class Expr:
    """A referring expression: filter by shape/colour, then an optional relation to an anchor, then
    an optional superlative over what is left. ``shape``/``color`` None means "any"."""

    shape: str | None = None
    color: str | None = None
    superlative: str | None = None
    relation: str | None = None
    anchor: Expr | None = None

    def __post_init__(self) -> None:
        if (self.relation is None) != (self.anchor is None):
            raise ValueError("relation and anchor go together")
        if self.shape is not None and self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}")
        if self.superlative is not None and self.superlative not in SUPERLATIVES:
            raise ValueError(f"unknown superlative {self.superlative!r}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"unknown relation {self.relation!r}")

    @property
    def kind(self) -> str:
        if self.relation is not None:
            return "relation"
        return "superlative" if self.superlative is not None else "attribute"

    def text(self) -> str:
        words = ["the"]
        if self.superlative:
            words.append(self.superlative)
        if self.color:
            words.append(self.color)
        words.append(self.shape or "shape")
        if self.relation is not None and self.anchor is not None:
            words += [self.relation, self.anchor.text()]
        return " ".join(words)


@dataclass(frozen=True)
class Referring:
    expr: Expr
    target: int

    @property
    def text(self) -> str:
        return self.expr.text()


# ----------------------------------------------------------------------------------------------
# Semantics


def _related(a: SceneObject, b: SceneObject, relation: str) -> bool:
    """Whether ``a`` is ``relation`` ``b``: boxes strictly apart along the axis."""
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    return {
        "left of": ax2 <= bx1,
        "right of": ax1 >= bx2,
        "above": ay2 <= by1,
        "below": ay1 >= by2,
    }[relation]


def _superlative(scene: Scene, cands: list[int], superlative: str) -> tuple[int, ...]:
    """The winner, or every candidate too close to the winner to tell apart (ambiguous)."""
    objs = scene.objects
    if superlative in ("largest", "smallest"):
        areas = {i: objs[i].area for i in cands}
        if superlative == "largest":
            best = max(cands, key=lambda i: areas[i])
            return tuple(i for i in cands if areas[i] * AREA_RATIO > areas[best])
        best = min(cands, key=lambda i: areas[i])
        return tuple(i for i in cands if areas[i] < areas[best] * AREA_RATIO)
    axis = 0 if superlative in ("leftmost", "rightmost") else 1
    pos = {i: objs[i].center[axis] for i in cands}
    pick = min if superlative in ("leftmost", "topmost") else max
    best = pick(cands, key=lambda i: pos[i])
    margin = POSITION_MARGIN * scene.size
    return tuple(i for i in cands if abs(pos[i] - pos[best]) < margin)


def resolve(expr: Expr, scene: Scene) -> tuple[int, ...]:
    """Indices of the objects ``expr`` may refer to in ``scene`` (exactly one when unambiguous).

    A relation whose anchor is not unique refers to nothing (its presupposition fails).
    """
    cands = [
        i
        for i, o in enumerate(scene.objects)
        if (expr.shape is None or o.shape == expr.shape) and (expr.color is None or o.color == expr.color)
    ]
    if expr.relation is not None and expr.anchor is not None:
        anchor = resolve(expr.anchor, scene)
        if len(anchor) != 1:
            return ()
        a = anchor[0]
        cands = [i for i in cands if i != a and _related(scene.objects[i], scene.objects[a], expr.relation)]
    if expr.superlative is not None and cands:
        return tuple(sorted(_superlative(scene, cands, expr.superlative)))
    return tuple(cands)


def _needs_its_parts(expr: Expr, scene: Scene) -> bool:
    """True if the superlative / relation is needed: without it the expression would be ambiguous."""
    if expr.superlative is not None and len(resolve(replace(expr, superlative=None), scene)) < 2:
        return False
    return not (expr.relation is not None and len(resolve(Expr(shape=expr.shape, color=expr.color), scene)) < 2)


def _attribute_exprs(obj: SceneObject) -> list[Expr]:
    return [Expr(shape=obj.shape, color=obj.color), Expr(shape=obj.shape), Expr(color=obj.color), Expr()]


def referring_candidates(scene: Scene, target: int) -> list[Expr]:
    """Every expression of the generator's grammar that refers to ``target`` alone and needs all its parts."""
    objs = scene.objects
    bases = _attribute_exprs(objs[target])
    exprs = list(bases)
    exprs += [replace(b, superlative=s) for b in bases for s in SUPERLATIVES]
    for a in range(len(objs)):
        if a == target:
            continue
        anchors = [e for e in _attribute_exprs(objs[a])[:3] if resolve(e, scene) == (a,)]
        for base in bases:
            for rel in RELATIONS:
                if not _related(objs[target], objs[a], rel):
                    continue
                for anchor in anchors:
                    rel_expr = replace(base, relation=rel, anchor=anchor)
                    exprs += [
                        rel_expr,
                        replace(rel_expr, superlative="largest"),
                        replace(rel_expr, superlative="smallest"),
                    ]
    return [e for e in exprs if resolve(e, scene) == (target,) and _needs_its_parts(e, scene)]


def sample_referring(scene: Scene, rng: np.random.Generator) -> Referring:
    """A random object and a random expression that refers to it alone.

    The expression kind (attribute / superlative / relation) is drawn uniformly among the kinds that
    have a valid expression, so reasoning-heavy expressions are not drowned by easy ones. Raises
    ValueError if no object can be referred to uniquely (possible only in degenerate scenes).
    """
    for target in rng.permutation(len(scene.objects)):
        cands = referring_candidates(scene, int(target))
        if not cands:
            continue
        kinds = sorted({e.kind for e in cands})
        kind = kinds[int(rng.integers(len(kinds)))]
        pool = [e for e in cands if e.kind == kind]
        return Referring(expr=pool[int(rng.integers(len(pool)))], target=int(target))
    raise ValueError("no object in this scene can be referred to uniquely")


def random_expression(rng: np.random.Generator) -> Expr:
    """An expression of the grammar without a scene (text for tokenizer training, not ground truth)."""

    def attrs() -> dict[str, str | None]:
        return {
            "shape": SHAPES[int(rng.integers(len(SHAPES)))] if rng.random() < 0.8 else None,
            "color": list(COLORS)[int(rng.integers(len(COLORS)))] if rng.random() < 0.6 else None,
        }

    sup = SUPERLATIVES[int(rng.integers(len(SUPERLATIVES)))] if rng.random() < 0.4 else None
    if rng.random() < 0.35:
        anchor = Expr(**attrs())
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return Expr(**attrs(), superlative=sup, relation=rel, anchor=anchor)
    return Expr(**attrs(), superlative=sup)


# ----------------------------------------------------------------------------------------------
# Rendering


def _shape_mask(
    shape: str, cx: float, cy: float, half: float, xx: np.ndarray, yy: np.ndarray, angle: float = 0.0
) -> np.ndarray:
    """Pixels of ``shape`` centred at ``(cx, cy)`` reaching about ``half`` from it (at most ``1.2 * half``).

    ``angle`` (radians) turns the shapes that have an orientation (crescent, star, triangle unaffected).
    """
    dx, dy = xx - cx, yy - cy
    r2 = dx * dx + dy * dy
    if shape == "circle":
        return r2 <= half * half
    if shape == "square":
        s = 0.85 * half  # about the circle's area
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.2 * half
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "ring":  # a thick annulus: its box also holds the hole and the corners
        return (r2 <= half * half) & (r2 >= (0.55 * half) ** 2)
    if shape == "cross":  # a plus sign of arms 0.36 * half thick
        arm = 0.36 * half
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    if shape == "crescent":  # a disc minus a smaller disc shifted towards ``angle``
        ox, oy = 0.45 * half * np.cos(angle), 0.45 * half * np.sin(angle)
        return (r2 <= half * half) & ((dx - ox) ** 2 + (dy - oy) ** 2 > (0.8 * half) ** 2)
    if shape == "star":  # five lobes between 0.45 and 1.0 of ``half``
        theta = np.arctan2(dy, dx) - angle
        return np.sqrt(r2) <= half * (0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(texture: str, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Brightness factor in [0.5, 1] at pixel centres ``xx``, ``yy`` (1-D): a strong pattern inside the
    object that does not change the colour's name."""
    if texture == "solid":
        return np.ones_like(xx)
    period = float(rng.integers(3, 7))
    if texture == "stripes":
        return np.where(((xx + yy) // period) % 2 == 0, 1.0, 0.5)
    if texture == "checker":
        return np.where((xx // period + yy // period) % 2 == 0, 1.0, 0.5)
    if texture == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        return 0.5 + 0.5 * (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    raise ValueError(f"unknown texture {texture!r}")


def _clutter(rng: np.random.Generator, size: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """A cluttered grey-toned background, float (H, W, 3): overlapping rectangles and ellipses with
    sharp edges, a few striped patches and noise. Grey-toned (low saturation) so an object's hue still
    stands out; full of edges so a tool that only learnt "segment the region that differs from a flat
    background" is lost."""

    def tone() -> np.ndarray:
        return (rng.uniform(50, 210) + rng.uniform(-18, 18, size=3)).astype(np.float32)

    canvas = np.broadcast_to(tone(), (size, size, 3)).copy()
    for _ in range(int(rng.integers(8, 14))):
        cx, cy = rng.uniform(0, size, size=2)
        rx, ry = rng.uniform(0.05, 0.3, size=2) * size
        if rng.random() < 0.5:
            patch = (np.abs(xx - cx) <= rx) & (np.abs(yy - cy) <= ry)
        else:
            patch = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
        if rng.random() < 0.3:
            period = float(rng.integers(3, 8))
            patch &= ((xx if rng.random() < 0.5 else yy) // period) % 2 == 0
        canvas[patch] = tone()
    return canvas


def _pick_attributes(rng: np.random.Generator, placed: list[tuple[str, str]]) -> tuple[str, str]:
    shape = SCENE_SHAPES[int(rng.integers(len(SCENE_SHAPES)))]
    color = list(COLORS)[int(rng.integers(len(COLORS)))]
    if placed and rng.random() < SHARE_ATTRIBUTE_P:
        other_shape, other_color = placed[int(rng.integers(len(placed)))]
        if rng.random() < 0.5:
            shape = other_shape
        else:
            color = other_color
    return shape, color


def _place(
    rng: np.random.Generator, n: int, size: int, xx: np.ndarray, yy: np.ndarray
) -> list[tuple[str, str, np.ndarray]]:
    """Up to ``n`` (shape, colour, full mask) with at most light overlap, fully inside the image."""
    placed: list[tuple[str, str, np.ndarray]] = []
    lo, hi = HALF_SIZE_RANGE
    for _ in range(n):
        shape, color = _pick_attributes(rng, [(s, c) for s, c, _ in placed])
        for _ in range(_PLACEMENT_TRIES):
            half = rng.uniform(lo, hi) * size
            reach = 1.2 * half  # the widest shape (diamond) reaches this far from its centre
            cx, cy = rng.uniform(reach + 1, size - reach - 1, size=2)
            mask = _shape_mask(shape, cx, cy, half, xx, yy, angle=float(rng.uniform(0, 2 * np.pi)))
            area = int(mask.sum())
            if area == 0:
                continue
            if all(int((mask & m).sum()) <= MAX_OVERLAP * min(area, int(m.sum())) for _, _, m in placed):
                placed.append((shape, color, mask))
                break
    return placed


def make_scene(
    rng: np.random.Generator, domain: str, size: int = 112, max_objects: int = 4, min_objects: int = 2
) -> Scene:
    """A random scene of ``min(min_objects, max_objects)``..``max_objects`` shapes in ``domain``.

    ``max_objects=1`` gives the single-object curriculum scenes tiny policies learn first.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}, expected one of {DOMAINS}")
    if max_objects < 1 or size < 32:
        raise ValueError(f"need max_objects >= 1 and size >= 32, got {max_objects}, {size}")
    lo_n = max(1, min(min_objects, max_objects))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for _ in range(_SCENE_TRIES):
        n = int(rng.integers(lo_n, max_objects + 1))
        placed = _place(rng, n, size, xx, yy)
        if len(placed) >= lo_n:
            break
    else:
        raise RuntimeError(f"could not place {lo_n} objects in a {size}px image")

    if domain == "plain":
        base = (rng.uniform(70, 180) + rng.uniform(-12, 12, size=3)).astype(np.float32)
        canvas = np.broadcast_to(base, (size, size, 3)).copy()
    else:
        canvas = _clutter(rng, size, xx, yy)
    canvas += rng.normal(0.0, 6.0 if domain == "plain" else 4.0, size=canvas.shape).astype(np.float32)

    visible = []
    union_later = np.zeros((size, size), dtype=bool)
    for _, _, mask in reversed(placed):
        visible.append(mask & ~union_later)
        union_later |= mask
    visible.reverse()

    objects = []
    for (shape, color, mask), vis in zip(placed, visible, strict=True):
        rgb = np.asarray(COLORS[color], dtype=np.float32) + rng.uniform(-15, 15, size=3).astype(np.float32)
        if domain == "plain":  # later objects overwrite earlier ones: what shows is the visible mask
            texture = "solid"
            canvas[mask] = rgb[None, :]
        else:  # textured in its own hue, blended into the clutter, no outline
            texture = CAMOUFLAGE_TEXTURES[int(rng.integers(len(CAMOUFLAGE_TEXTURES)))]
            paint = rgb[None, :] * _texture(texture, rng, xx[mask], yy[mask])[:, None]
            canvas[mask] = 0.5 * canvas[mask] + 0.5 * paint
        box = mask_to_box(vis)
        if box is None:  # cannot happen while overlap is capped; guard against future edits
            raise RuntimeError("an object is fully occluded")
        objects.append(SceneObject(shape=shape, color=color, texture=texture, mask=vis, box=tuple(box)))

    canvas += rng.normal(0.0, 3.0, size=canvas.shape).astype(np.float32)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return Scene(image=image, objects=tuple(objects), domain=domain)


# ----------------------------------------------------------------------------------------------
# Rows and files


def _stream(*parts: str) -> int:
    return zlib.crc32("/".join(parts).encode())


def png_bytes(image: np.ndarray) -> bytes:
    """PNG-encode an (H, W, 3) uint8 image (deterministic: no timestamps in PNG)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # noisy images barely compress anyway
    return buf.getvalue()


def make_sample(
    seed: int,
    domain: str,
    split: str,
    index: int,
    size: int = 112,
    max_objects: int = 4,
    min_objects: int = 2,
) -> tuple[Scene, Referring]:
    """Sample ``index`` of a split: its scene and expression, from a generator of its own."""
    rng = np.random.default_rng([seed, _stream(split), _stream(domain), index])
    for _ in range(_SCENE_TRIES):
        scene = make_scene(rng, domain, size=size, max_objects=max_objects, min_objects=min_objects)
        try:
            return scene, sample_referring(scene, rng)
        except ValueError:
            continue
    raise RuntimeError(f"no referable scene for sample {index} of {domain}/{split} seed {seed}")


def generate_split(
    n: int,
    seed: int,
    domain: str,
    split: str,
    size: int = 112,
    max_objects: int = 4,
    min_objects: int = 2,
    coords: str = PIXELS,
) -> list[RLRow]:
    """``n`` verl RL rows: a scene, one uniquely referring expression, its visible mask and box.

    ``coords``: the coordinate convention the rows ask for (:mod:`verl_grto.data.frame`; ``norm1000`` for
    the tiny Qwen3-VL), named in the ground truth and the instruction; the scenes are the same."""
    rows = []
    suffix = "" if check_coords(coords) == PIXELS else f"-{coords}"
    tag = f"syn-{domain}-{size}px-m{min(min_objects, max_objects)}to{max_objects}-s{seed}-{split}{suffix}"
    for i in range(n):
        scene, ref = make_sample(seed, domain, split, i, size=size, max_objects=max_objects, min_objects=min_objects)
        target = scene.objects[ref.target]
        gt = GroundTruth(
            mask_rle=encode_rle(target.mask), boxes=[list(target.box)], image_size=(size, size), answer_coords=coords
        )
        rows.append(
            RLRow(
                data_source=f"grto/synthetic/{domain}",
                instruction=build_short_instruction(ref.text, coords),
                image_png=png_bytes(scene.image),
                ground_truth=gt,
                index=i,
                sample_id=f"{tag}-{i:06d}",
                split=split,
                expression=ref.text,
                extra={
                    # every object's box, for the random-object baseline (verl_grto.eval.baselines)
                    "object_boxes": json.dumps([list(o.box) for o in scene.objects]),
                    "expression_kind": ref.expr.kind,
                },
            )
        )
    return rows


def write_synthetic(
    out_dir: Path,
    n_train: int,
    n_val: int,
    seed: int,
    domain: str,
    size: int = 112,
    max_objects: int = 4,
    min_objects: int = 2,
    coords: str = PIXELS,
) -> dict[str, Path]:
    """Write ``train.parquet`` and ``val.parquet`` (verl's RL format) into ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        rows = generate_split(
            n, seed, domain, split, size=size, max_objects=max_objects, min_objects=min_objects, coords=coords
        )
        paths[split] = write_rows_atomic((r.to_record() for r in rows), out_dir / f"{split}.parquet")
    return paths


def ensure_synthetic(
    root: Path,
    domain: str,
    n_train: int,
    n_val: int,
    seed: int,
    size: int = 112,
    max_objects: int = 4,
    min_objects: int = 2,
    coords: str = PIXELS,
) -> dict[str, Path]:
    """Like :func:`write_synthetic` into a directory under ``root`` named by the settings, built only if
    missing (atomically, under a file lock, so concurrent callers build it once)."""
    lo = min(min_objects, max_objects)
    suffix = "" if check_coords(coords) == PIXELS else f"_{coords}"
    target = Path(root) / f"synthetic_{domain}_{size}px_m{lo}to{max_objects}_n{n_train}-{n_val}_s{seed}{suffix}"
    stamp = {
        "builder": "synthetic",
        "version": GENERATOR_VERSION,
        "domain": domain,
        "size": size,
        "min_objects": lo,
        "max_objects": max_objects,
        "n_train": n_train,
        "n_val": n_val,
        "seed": seed,
        **({} if coords == PIXELS else {"coords": coords}),
    }

    def build(tmp: Path) -> None:
        write_synthetic(
            tmp,
            n_train,
            n_val,
            seed,
            domain,
            size=size,
            max_objects=max_objects,
            min_objects=min_objects,
            coords=coords,
        )

    build_dir_once(target, stamp, build)
    return {"train": target / "train.parquet", "val": target / "val.parquet"}
