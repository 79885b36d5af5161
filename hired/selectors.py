"""Token selectors: which visual tokens an image keeps, HiRED's and four others, all on HiRED's budget.

    sel = apply_selector("visionzip", layout, early, late, cfg, features=feats, seed=0)
    sel.keep     # per image (base first) sorted kept token indices, as select_tokens returns them
    sel.groups   # MergedGroups: merged slot, flat id (image * 576 + token) -> int64 [g] the flat ids it averages
    order = pack_tokens(sel.keep, layout, cfg)    # HiRED's packing order, whatever the selector

Every selector keeps exactly HiRED's count, plan.kept = min(T, valid tokens) with T = int(n * 576 * rate),
never a padding token, and returns the kept tokens per image in raster order, so hired/pack.py packs them as
HiRED's. A merged (VisionZip contextual) token sits at its group's first token in raster order. At rate 1.0
every selector is the stock model (all valid tokens). Only "hired" reads distribution="official".

- hired:     HiRED (Arif et al., AAAI-25): plan_budget from the base image's early-layer [CLS] attention,
             top-k per image by late-layer [CLS] attention (select_tokens).
- cls:       one global top-T by late-layer [CLS] attention over every image's valid tokens, scores compared
             across images as they are (FasterVLM / VisPruner's [CLS]-only ranking); reads late scores.
- uniform:   the base image gets B as in HiRED, the crops share T - B in proportion to their valid tokens
             (largest remainder), top-k by late-layer attention in each: HiRED without its early-layer split.
- random:    T valid tokens drawn uniformly without replacement by the request's seed (the random-pruning
             baseline of Wen et al. 2025, "Token pruning in multimodal LLMs: are we solving the right problem?").
- visionzip: VisionZip (Yang et al., CVPR 2025) dominant + contextual tokens inside HiRED's per-image shares:
             54/64 of a share are the top tokens by late-layer attention; the rest are contextual tokens, each
             the mean of a group of the remaining valid tokens grouped by cosine similarity of their
             feature-layer features (VisionZip groups by last-layer keys; the features are what this bundle
             has). Reads early and late scores and the features. The similarity search is a parameter
             (`nearest`, numpy's nearest_target by default; the runtime passes one on onnxruntime).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hired.budget import BudgetPlan, base_share, plan_budget, requested_total, spatial_split
from hired.config import HiredConfig
from hired.layout import AnyresLayout
from hired.scores import checked_scores
from hired.select import candidate_mask, select_tokens, top_k_mask, top_k_rows

SELECTORS = ("hired", "cls", "uniform", "random", "visionzip")
DOMINANT_SHARE = (54, 64)  # VisionZip's 54 dominant of 64 kept tokens
_NONE = np.empty(0, dtype=np.int64)
_NONE.setflags(write=False)


class MergedGroups(Mapping):
    """Merged slot (flat id image * 576 + token) -> sorted int64 [g] flat ids averaged into it, kept as arrays:
    slots int64 [m] (each group's first member), members int64 [M] (the groups back to back), ends int64 [m]
    (group j is members[ends[j - 1]:ends[j]]); sizes and starts derive from ends. Read-only; empty by default."""

    def __init__(self, slots: np.ndarray = _NONE, members: np.ndarray = _NONE, ends: np.ndarray = _NONE) -> None:
        self.slots, self.members, self.ends = slots, members, ends
        self.sizes = np.diff(ends, prepend=0)
        self.starts = ends - self.sizes
        self._index: dict[int, int] | None = None

    @classmethod
    def of(cls, groups: Mapping[int, np.ndarray]) -> MergedGroups:
        """`groups` as a MergedGroups (itself if it is one)."""
        if isinstance(groups, MergedGroups):
            return groups
        if not groups:
            return cls()
        members = [np.asarray(m, dtype=np.int64) for m in groups.values()]
        return cls(np.array(list(groups), dtype=np.int64), np.concatenate(members), np.cumsum([len(m) for m in members]))

    def __getitem__(self, slot: int) -> np.ndarray:
        if self._index is None:
            self._index = dict(zip(self.slots.tolist(), range(len(self.slots))))
        j = self._index[slot]
        return self.members[self.starts[j] : self.ends[j]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.slots.tolist())

    def __len__(self) -> int:
        return len(self.slots)


@dataclass(frozen=True)
class Selection:
    """What one image keeps. plan: per-image counts (plan.total = T); keep: 1 + n_crops sorted int64 arrays;
    groups: merged slot (flat id image * 576 + token) -> sorted int64 [g] flat ids averaged into it."""

    plan: BudgetPlan
    keep: list[np.ndarray]
    groups: Mapping[int, np.ndarray] = field(default_factory=MergedGroups)


def valid_candidates(layout: AnyresLayout) -> np.ndarray:
    """int64 [576 + sum(capacities)]: flat ids (image * 576 + token) of every token that survives unpadding
    (hired.select.candidate_mask, flattened)."""
    return np.flatnonzero(candidate_mask(layout)).astype(np.int64)


def split_flat(flat_ids: np.ndarray, layout: AnyresLayout) -> list[np.ndarray]:
    """Sorted flat ids [k] -> per image sorted token indices (1 + n_crops int64 arrays)."""
    t = layout.tokens_per_image
    bounds = np.searchsorted(flat_ids, np.arange(layout.n_images + 1) * t)  # image i's ids: bounds[i]:bounds[i + 1]
    return [flat_ids[bounds[i] : bounds[i + 1]] - i * t for i in range(layout.n_images)]


def counts_plan(total: int, keep: list[np.ndarray], distribution: str = "spatial") -> BudgetPlan:
    """The BudgetPlan that says how many tokens each image of `keep` holds (for selectors without a split)."""
    return BudgetPlan(total, len(keep[0]), tuple(len(k) for k in keep[1:]), distribution)


def select_hired(layout: AnyresLayout, early: np.ndarray, late: np.ndarray, cfg: HiredConfig) -> Selection:
    """HiRED: early-layer budget plan, late-layer top-k per image (hired.budget + hired.select)."""
    plan = plan_budget(layout, early[0], cfg)
    return Selection(plan, select_tokens(late, plan, layout))


def select_cls(layout: AnyresLayout, late: np.ndarray, kept: int, total: int) -> Selection:
    """Global top-`kept` by late-layer [CLS] attention late [n, 576] over all images' valid tokens."""
    flat = top_k_rows(late.reshape(1, -1), np.array([kept]), candidate_mask(layout).reshape(1, -1))[0]
    keep = split_flat(flat, layout)
    return Selection(counts_plan(total, keep), keep)


def uniform_plan(layout: AnyresLayout, cfg: HiredConfig) -> BudgetPlan:
    """B = min(int(T * alpha), 576) for the base image; the crops share T - B in proportion to their valid
    tokens (water-filling, largest remainder), what they cannot hold back to the base image."""
    t = layout.tokens_per_image
    total = requested_total(layout.n_images, t, cfg.rate)
    base = base_share(total, cfg.alpha, t)
    capacities = layout.capacities
    crops, leftover = spatial_split(total - base, capacities.astype(np.float64), capacities)
    return BudgetPlan(total, min(base + leftover, t), crops, "spatial")


def select_uniform(layout: AnyresLayout, late: np.ndarray, cfg: HiredConfig) -> Selection:
    """Capacity-proportional plan (uniform_plan), then top-k per image by late-layer attention."""
    plan = uniform_plan(layout, cfg)
    return Selection(plan, select_tokens(late, plan, layout))


def select_random(layout: AnyresLayout, kept: int, total: int, seed: int | None) -> Selection:
    """`kept` valid tokens drawn uniformly without replacement; the same seed draws the same tokens."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(valid_candidates(layout), size=kept, replace=False)).astype(np.int64)
    keep = split_flat(chosen, layout)
    return Selection(counts_plan(total, keep), keep)


def nearest_target(
    features: np.ndarray, rows: Sequence[np.ndarray], targets: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Per image i of features [n, N, D]: int64 [len(rows[i])], for each token rows[i] (indices into the image's
    N tokens) which of the target tokens targets[i] ([G_i] indices) it is most similar to, by cosine similarity
    of float32 values (the targets normalised; |x| is the same for every target); ties to the lower target. An
    image without targets gets no labels. numpy's BLAS; runtime.similarity.NearestTarget answers the same on
    onnxruntime."""
    out = []
    for image, image_rows, image_targets in zip(features, rows, targets):
        if not len(image_targets):
            out.append(np.empty(0, dtype=np.int64))
            continue
        tf = image[image_targets].astype(np.float32, copy=False)  # a fancy-indexed copy already
        norms = np.linalg.norm(tf, axis=1)
        tf /= np.where(norms > 0, norms, 1.0)[:, None]
        # float32 features: every token's product (reads them in place, no gather), then the rows'; other dtypes
        # (fp16 bundles): only the rows are converted
        if image.dtype == np.float32:
            sims = (image @ tf.T)[image_rows]
        else:
            sims = image[image_rows].astype(np.float32) @ tf.T
        out.append(np.argmax(sims, axis=1))
    return out


Nearest = Callable[[np.ndarray, Sequence[np.ndarray], Sequence[np.ndarray]], list[np.ndarray]]  # nearest_target's


def target_picks(r: int, n_groups: int) -> np.ndarray:
    """int64 [n_groups]: VisionZip's targets among r remaining tokens, evenly spaced (every r // n_groups-th).
    Requires 1 <= n_groups <= r."""
    if not 1 <= n_groups <= r:
        raise ValueError(f"cannot form {n_groups} groups from {r} tokens")
    return np.arange(0, r, max(1, r // n_groups))[:n_groups]


def contextual_groups(
    features: np.ndarray, rest: np.ndarray, n_groups: int, nearest: Nearest = nearest_target
) -> np.ndarray:
    """int64 [R]: the group, in [0, n_groups), of each token `rest` [R] (sorted indices into one image's
    features [576, D]): VisionZip's merging.

    n_groups targets are evenly spaced among `rest` (target_picks); every other token joins the target of highest
    cosine similarity (ties to the lower target), as `nearest` (nearest_target's contract) says.
    Requires 1 <= n_groups <= R.
    """
    picks = target_picks(len(rest), n_groups)
    (labels,) = nearest(features[None], [rest], [rest[picks]])
    return image_groups(labels, picks)


def image_groups(labels: np.ndarray, picks: np.ndarray) -> np.ndarray:
    """int64 [R]: the nearest-target labels [R] of an image's remaining tokens, each target in its own group."""
    labels = np.asarray(labels, dtype=np.int64)
    labels[picks] = np.arange(picks.shape[0])
    return labels


def dominant_count(share):
    """Dominant tokens of a share (an int or an int array of shares): floor(share * 54 / 64); the other tokens of
    the share are contextual."""
    return share * DOMINANT_SHARE[0] // DOMINANT_SHARE[1]


def select_dominant_contextual(
    layout: AnyresLayout,
    early: np.ndarray,
    late: np.ndarray,
    features: np.ndarray,
    cfg: HiredConfig,
    nearest: Nearest = nearest_target,
) -> Selection:
    """VisionZip inside HiRED's plan: per image, the dominant top tokens by late score [n, 576], then
    contextual groups of the remaining valid tokens by cosine similarity of features [n, 576, D] (`nearest`,
    called once for every image)."""
    plan = plan_budget(layout, early[0], cfg)
    shares = np.array((plan.base, *plan.crops))
    n_context = shares - dominant_count(shares)
    valid = candidate_mask(layout)
    dominant = top_k_mask(late, shares - n_context, valid)  # bool [n, 576]
    is_rest = valid & ~dominant & (n_context > 0)[:, None]  # valid, not dominant, in a grouped image
    rest = [np.flatnonzero(row) for row in is_rest]  # per image, sorted: raster order
    counts = n_context.tolist()
    picks = [target_picks(len(r), g) if g else _NONE for r, g in zip(rest, counts)]
    labels = nearest(features, rest, [r[p] for r, p in zip(rest, picks)])
    groups = MergedGroups()
    if any(counts):  # every image's groups at once: group ids offset per image, members by group in raster order
        total = sum(counts)
        first_group = np.cumsum(counts) - counts  # image i's group ids start there
        group_of = np.concatenate([image_groups(lab, p) + g0 for lab, p, g0 in zip(labels, picks, first_group)])
        small = group_of.astype(np.int16) if total <= 1 << 15 else group_of  # int16: numpy's radix sort
        by_group = np.flatnonzero(is_rest)[np.argsort(small, kind="stable")]
        sizes = np.bincount(group_of, minlength=total)
        ends = np.cumsum(sizes)
        groups = MergedGroups(by_group[ends - sizes], by_group, ends)  # slot: a group's first member
    flat = dominant.reshape(-1).copy()
    flat[groups.slots] = True  # the merged tokens take their slots
    return Selection(plan, split_flat(np.flatnonzero(flat), layout), groups)


def apply_selector(
    name: str,
    layout: AnyresLayout,
    early_scores: object,
    late_scores: object,
    cfg: HiredConfig,
    *,
    features: object = None,
    seed: int | None = None,
    nearest: Nearest = nearest_target,
) -> Selection:
    """The tokens selector `name` keeps of one image.

    early_scores, late_scores: [1 + n_crops, 576] CLS attention (finite, >= 0); features: [1 + n_crops, 576, D]
    feature-layer features (visionzip only); seed: the random selector's seed (None: fresh entropy); nearest:
    visionzip's similarity search (nearest_target's contract; runtime.similarity runs it on onnxruntime).
    Raises ValueError for an unknown selector, unusable scores, or distribution="official" with a selector
    other than hired (the published code's split is HiRED's own).
    """
    if name not in SELECTORS:
        raise ValueError(f"selector must be one of {', '.join(SELECTORS)}; got {name!r}")
    shape = (layout.n_images, layout.tokens_per_image)
    early = checked_scores(early_scores, shape, "early_scores", np.float32)
    late = checked_scores(late_scores, shape, "late_scores", np.float32)
    if name == "hired" or cfg.is_stock:
        return select_hired(layout, early, late, cfg)
    if cfg.distribution == "official":
        raise ValueError(f'distribution="official" is HiRED\'s published split; use selector="hired" with it, '
                         f'or distribution="spatial" with selector={name!r}')  # fmt: skip
    if name == "uniform":
        return select_uniform(layout, late, cfg)
    if name == "visionzip":
        feats = np.asarray(features) if features is not None else None
        if feats is None or feats.ndim != 3 or feats.shape[:2] != shape:
            got = "none" if feats is None else list(feats.shape)
            raise ValueError(f"visionzip needs features of shape [{shape[0]}, {shape[1]}, D], got {got}")
        return select_dominant_contextual(layout, early, late, feats, cfg, nearest)
    total = requested_total(layout.n_images, layout.tokens_per_image, cfg.rate)
    kept = min(total, layout.tokens_per_image + int(layout.capacities.sum()))
    if name == "cls":
        return select_cls(layout, late, kept, total)
    return select_random(layout, kept, total, seed)
