"""Active learning: which cases should a clinician annotate next?

Ranking is pure numpy over what inference already stored per case (``scores`` in
``outputs.json`` and the pooled ``features`` vector), so it needs no model and no torch and is
fast enough to call from a GUI on every click.

Strategies live in the registry :data:`STRATEGIES` (``name -> Strategy``). Each one looks at the
*candidates* of a ranking and returns its picks best first:

- ``random`` -- seeded and stable per case (adding a case does not reshuffle the others).
- score strategies (``entropy``, ``entropy_lesion``, ``bald``, ``tta_variance``,
  ``cam_disagreement``, ``burden_disagreement``) -- highest stored score first, with batch
  selection that skips a case whose feature cosine similarity to an already selected one is above
  ``duplicate_threshold`` (default 0.98). Skipped near-duplicates are only used to fill the list
  when nothing else is left; without stored features this is a plain top-k.
- ``kcenter`` -- greedy k-center (core-set) on the unit-normalised stored features, starting with
  the fully annotated cases as centres, so each pick is the case farthest from everything already
  annotated or selected.

Which cases are candidates (:func:`rank`): every case that is not in the ``holdout`` split and has
no full annotation (sparse, image-label-only and unlabelled cases all count);
``include_annotated=True`` adds the fully annotated ones.

Cases the strategy cannot score (no prediction yet, e.g. imported after the last ``predict``, or a
prediction without the needed score/features) are never dropped: they are ranked *after* every
scored case, in seeded random order, with a reason saying why. If no candidate has a prediction
at all and the strategy needs one, :func:`rank` raises :class:`ProjectError` instead.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from training_backend.errors import InputError, ProjectError

if TYPE_CHECKING:  # pragma: no cover - typing only; acquisition never needs the store module
    from training_backend.project.store import Project

#: ``Strategy.needs`` entry meaning "the stored feature vector" (not a score key).
FEATURES = "features"
#: Cosine similarity above which a candidate counts as a near-duplicate of a selected one.
DEFAULT_DUPLICATE_THRESHOLD = 0.98
#: Splits whose cases are never proposed for annotation.
EXCLUDED_SPLITS = ("holdout",)
NO_PREDICTIONS = "no predictions yet: run `lesionseg train` or `lesionseg predict` first"
#: The strategy the window, ``lesionseg rank`` and ``lesionseg simulate`` use unless told
#: otherwise: the one that saved the most masks in simulated BUSI sessions with ``supervised``
#: (random's final Dice with 0.59x random's masks, 2 seeds; README "Simulated annotation
#: sessions"). ``burden_disagreement`` points at failures best but did not save masks there.
DEFAULT_STRATEGY = "tta_variance"

#: What a strategy function returns: ``(case id, score or None, reason)``, best first.
Pick = tuple[str, "float | None", str]


@dataclass(frozen=True)
class Ranked:
    """One proposed case.

    Iterating a ``Ranked`` yields ``(cid, score)``, so code written against the original
    ``rank(...) -> list[(cid, score)]`` contract keeps working.
    """

    cid: str
    name: str
    score: float | None  # None where the strategy could not score the case
    reason: str

    def __iter__(self) -> Iterator[Any]:
        return iter((self.cid, self.score))

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.cid, "name": self.name, "score": self.score, "reason": self.reason}


@dataclass(frozen=True)
class Strategy:
    """A registered acquisition strategy.

    Attributes:
        name: registry key (``lesionseg rank --strategy NAME``).
        description: one line for ``lesionseg strategies`` and the GUI.
        needs: score keys of ``OutputRecord.scores`` and/or ``"features"`` the strategy reads;
            empty for strategies that work without predictions (``random``).
        fn: ``fn(pool, k, **options) -> list[Pick]``: at most ``k`` distinct candidate ids of
            ``pool``, best first. Candidates it cannot score are left out (``rank`` appends them).
        options: default keyword options of ``fn`` as ``(name, value)`` pairs; the only keys
            :func:`create_strategy` accepts.
    """

    name: str
    description: str
    needs: tuple[str, ...]
    fn: Callable[..., list[Pick]]
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def option_values(self) -> dict[str, Any]:
        return dict(self.options)

    def __call__(self, project: Project, candidates: Sequence[str], k: int,
                 seed: int = 0) -> list[tuple[str, float | None]]:
        """Architecture-contract call: ``fn(project, candidates, k) -> list[(cid, score)]``.

        Only the picks the strategy can score are returned (no fill-up); see :func:`rank`.

        Args:
            project: the open project.
            candidates: case ids to choose from (order breaks ties).
            k: how many to return at most.
            seed: seed for random choices.
        """
        pool = Pool(project, candidates, seed=seed, centres=_annotated_ids(project, candidates))
        return [(cid, score) for cid, score, _ in self.fn(pool, k, **self.option_values)]


class _LRU:
    """A small thread-safe LRU map (feature vectors by output id, shared by all rankings)."""

    def __init__(self, size: int):
        self.size = size
        self._data: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, default: Any = None) -> Any:
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: tuple, value: Any) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_MISSING = object()
#: Feature vectors already read, by (project path, case id, output id): re-ranking in the GUI
#: reads no array twice. 20,000 vectors of 256 float32 values are ~20 MB.
_FEATURE_CACHE = _LRU(20_000)


def _valid_vector(feat: Any) -> np.ndarray | None:
    """``feat`` as a flat float32 vector, or None if it is missing, empty, non-finite or zero."""
    if feat is None:
        return None
    vec = np.asarray(feat, dtype=np.float32).reshape(-1)  # (F,)
    if vec.size and np.isfinite(vec).all() and float(np.linalg.norm(vec)) > 0:
        return vec
    return None


class Pool:
    """The candidates of one ranking, with their stored scores and features loaded lazily.

    Args:
        project: the open project (uses ``case``, ``output_record`` and ``read_features`` if the
            store has it, else ``read_outputs``).
        candidates: candidate case ids in project order.
        seed: seed of the per-case random keys (``random`` and tie/fill order).
        centres: non-candidate case ids already covered by annotation (``kcenter`` centres).
    """

    def __init__(self, project: Project, candidates: Sequence[str], seed: int = 0,
                 centres: Sequence[str] = ()):
        self.project = project
        self.candidates = list(candidates)
        self.seed = int(seed)
        cand = set(self.candidates)
        self.centres = [c for c in centres if c not in cand]
        self._records: dict[str, Any] = {}
        self._raw: dict[str, np.ndarray | None] = {}
        self._unit: dict[tuple[str, ...], dict[str, np.ndarray]] = {}

    def record(self, cid: str):
        """The case's latest ``OutputRecord`` (scores, no arrays), or None; cached."""
        if cid not in self._records:
            self._records[cid] = self.project.output_record(cid)
        return self._records[cid]

    def score(self, cid: str, key: str) -> float | None:
        """``scores[key]`` of the case's latest prediction as a finite float, else None."""
        rec = self.record(cid)
        scores = getattr(rec, "scores", None) if rec is not None else None
        return _as_float(scores.get(key)) if isinstance(scores, dict) else None

    def features(self, cids: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Unit-normalised feature vectors ``(F,)`` of those ``cids`` that have one.

        Vectors that are not finite or all zero, or whose length differs from the most common one
        among ``cids`` (a different model), are treated as missing.

        Args:
            cids: case ids; default: the candidates.
        """
        key = tuple(self.candidates if cids is None else cids)
        if key not in self._unit:
            raw = {cid: v for cid in key if (v := self._raw_features(cid)) is not None}
            dims = Counter(v.size for v in raw.values())
            dim = dims.most_common(1)[0][0] if dims else 0
            self._unit[key] = {cid: v.astype(np.float64) / np.linalg.norm(v)
                               for cid, v in raw.items() if v.size == dim}
        return self._unit[key]

    def _raw_features(self, cid: str) -> np.ndarray | None:
        if cid not in self._raw:
            rec = self.record(cid)
            vec = None
            if rec is not None and getattr(rec, "has_features", True):
                # Output ids are unique and their arrays immutable, so the cache never goes stale.
                key = (str(self.project.path), cid, str(getattr(rec, "output_id", "")))
                vec = _FEATURE_CACHE.get(key, _MISSING)
                if vec is _MISSING:
                    vec = _valid_vector(self._read_features(cid))
                    _FEATURE_CACHE.put(key, vec)
            self._raw[cid] = vec
        return self._raw[cid]

    def _read_features(self, cid: str) -> Any:
        # ``read_features`` reads only the (F,) vector; ``read_outputs`` reads every array.
        reader = getattr(self.project, "read_features", None)
        if reader is not None:
            return reader(cid)
        out = self.project.read_outputs(cid)
        return out.features if out is not None else None

    def random_key(self, cid: str) -> float:
        """A uniform number in [0, 1) fixed by (seed, case id), independent of the pool."""
        digest = hashlib.blake2b(f"{self.seed}\0{cid}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    def name(self, cid: str) -> str:
        return self.project.case(cid).name


# --------------------------------------------------------------------------- strategy functions

def _random(pool: Pool, k: int) -> list[Pick]:
    order = sorted(pool.candidates, key=pool.random_key, reverse=True)
    return [(cid, pool.random_key(cid), f"random (seed {pool.seed})") for cid in order[:k]]


def select_diverse(pool: Pool, ordered: Sequence[tuple[str, float]], k: int,
                   duplicate_threshold: float | None, label: str) -> list[Pick]:
    """Take the best ``k`` of ``ordered`` while skipping near-duplicates.

    A candidate is skipped when the cosine similarity of its features to an already selected
    case exceeds ``duplicate_threshold``; skipped ones fill the list (in score order) only when
    the others run out. Candidates without features are never treated as duplicates.

    Args:
        pool: the ranking's pool (for features and names).
        ordered: ``(cid, score)`` best first.
        k: how many to select.
        duplicate_threshold: cosine similarity limit; None or >= 1 disables the check.
        label: what the score is, for the reason text.
    """
    picks: list[Pick] = []
    if duplicate_threshold is None or duplicate_threshold >= 1.0:
        return [(cid, s, f"{label} {s:.4g}") for cid, s in ordered[:k]]
    feats = pool.features()
    if not any(cid in feats for cid, _ in ordered):
        return [(cid, s, f"{label} {s:.4g} (no features: duplicates not checked)")
                for cid, s in ordered[:k]]
    chosen: list[str] = []
    chosen_vecs: list[np.ndarray] = []
    skipped: list[tuple[str, float, str, float]] = []  # cid, score, similar selected cid, cosine
    for cid, s in ordered:
        if len(picks) == k:
            break
        vec = feats.get(cid)
        if vec is not None and chosen_vecs:
            sims = np.stack(chosen_vecs) @ vec  # (n_chosen,)
            j = int(np.argmax(sims))
            if sims[j] > duplicate_threshold:
                skipped.append((cid, s, chosen[j], float(sims[j])))
                continue
        picks.append((cid, s, f"{label} {s:.4g}"))
        if vec is not None:
            chosen.append(cid)
            chosen_vecs.append(vec)
    for cid, s, other, cos in skipped[: k - len(picks)]:
        picks.append((cid, s, f"{label} {s:.4g}; near-duplicate of {pool.name(other)} "
                              f"(cosine {cos:.3f})"))
    return picks


def score_strategy(key: str, label: str) -> Callable[..., list[Pick]]:
    """A strategy function ranking by ``scores[key]`` (high first) with duplicate suppression.

    Args:
        key: score key written by inference (``OutputRecord.scores``).
        label: human name of the score for the reason text.
    """

    def fn(pool: Pool, k: int,
           duplicate_threshold: float | None = DEFAULT_DUPLICATE_THRESHOLD) -> list[Pick]:
        scored = [(cid, s) for cid in pool.candidates if (s := pool.score(cid, key)) is not None]
        scored.sort(key=lambda t: -t[1])  # stable: project order breaks ties
        return select_diverse(pool, scored, k, duplicate_threshold, label)

    fn.__name__ = f"by_{key}"
    return fn


def _kcenter(pool: Pool, k: int) -> list[Pick]:
    """Greedy k-center: repeatedly take the candidate farthest from all centres so far."""
    feats = pool.features(pool.candidates + pool.centres)
    cands = [c for c in pool.candidates if c in feats]
    centres = [c for c in pool.centres if c in feats]
    if not cands or k <= 0:
        return []
    refs = cands + centres  # names for "nearest" (index into this list)
    x = np.stack([feats[c] for c in cands])  # (N, F), unit rows

    def dist_to(vecs: np.ndarray) -> np.ndarray:  # (M, F) -> (N, M) Euclidean on the sphere
        return np.sqrt(np.clip(2.0 - 2.0 * (x @ vecs.T), 0.0, None))

    picks: list[Pick] = []
    taken = np.zeros(len(cands), dtype=bool)  # (N,)
    if centres:
        d = dist_to(np.stack([feats[c] for c in centres]))  # (N, M)
        nearest = d.argmin(axis=1) + len(cands)  # (N,) index into refs
        dmin = d.min(axis=1)  # (N,)
    else:
        # No annotated case to start from: begin with the most representative candidate.
        mean = x.mean(axis=0)  # (F,)
        first = int(np.argmax(x @ mean))
        taken[first] = True
        picks.append((cands[first], float(np.linalg.norm(x[first] - mean)),
                      "most central case (no annotated case with features yet)"))
        dmin = dist_to(x[first:first + 1])[:, 0]  # (N,)
        nearest = np.full(len(cands), first)  # (N,)
    while len(picks) < min(k, len(cands)):
        i = int(np.argmax(np.where(taken, -np.inf, dmin)))  # ties: first in project order
        taken[i] = True
        picks.append((cands[i], float(dmin[i]),
                      f"feature distance {dmin[i]:.3f} to the nearest annotated/selected case "
                      f"({pool.name(refs[nearest[i]])})"))
        d_new = dist_to(x[i:i + 1])[:, 0]  # (N,)
        closer = d_new < dmin
        dmin = np.where(closer, d_new, dmin)
        nearest = np.where(closer, i, nearest)
    return picks


# --------------------------------------------------------------------------- registry

STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add a strategy to :data:`STRATEGIES` (replacing one of the same name).

    Args:
        strategy: the strategy to register.
    """
    STRATEGIES[strategy.name] = strategy
    return strategy


_DUP = (("duplicate_threshold", DEFAULT_DUPLICATE_THRESHOLD),)

register(Strategy("random", "random order (seeded); needs no predictions", (), _random))
for _name, _key, _label, _desc in (
    ("entropy", "entropy", "entropy",
     "mean pixel-wise predictive entropy over the whole image"),
    ("entropy_lesion", "entropy_lesion", "lesion entropy",
     "predictive entropy restricted to predicted lesions and their boundaries"),
    ("bald", "bald", "BALD",
     "MC-dropout mutual information (BALD): disagreement between dropout samples"),
    ("tta_variance", "tta_var", "TTA variance",
     "variance of the prediction under test-time augmentation"),
    ("cam_disagreement", "cam_disagreement", "CAM disagreement",
     "disagreement between the class activation map and the segmentation"),
    ("burden_disagreement", "burden_disagreement", "burden disagreement",
     "image-level class score disagrees with the predicted lesion burden"),
    ("disagreement", "disagreement", "sub-model disagreement",
     "the model's own uncertainty: its two sub-models disagree (caml, crii; 0 for other methods)"),
):
    register(Strategy(_name, _desc + " (near-duplicates skipped)", (_key,),
                      score_strategy(_key, _label), _DUP))
register(Strategy("kcenter", "greedy k-center (core-set) on stored features: the cases "
                  "farthest from everything annotated or already selected", (FEATURES,), _kcenter))


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``.

    Args:
        name: registry key.

    Raises:
        InputError: unknown name; the message lists the valid names.
    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise InputError(name, "unknown acquisition strategy; valid names: "
                         + ", ".join(STRATEGIES)) from None


def create_strategy(name: str, **options: Any) -> Strategy:
    """The registered strategy ``name`` with some of its options changed.

    Args:
        name: registry key.
        **options: option overrides, e.g. ``duplicate_threshold=0.95`` (None disables the
            near-duplicate check).

    Raises:
        InputError: unknown name, unknown option or invalid value.
    """
    base = get_strategy(name)
    values = base.option_values
    unknown = sorted(set(options) - set(values))
    if unknown:
        valid = ", ".join(values) or "none"
        raise InputError(name, f"unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    thr = options.get("duplicate_threshold", None)
    if thr is not None and not (isinstance(thr, (int, float)) and -1.0 <= thr <= 1.0):
        raise InputError("duplicate_threshold", f"{thr!r} is not a cosine similarity in [-1, 1]")
    values.update(options)
    return replace(base, options=tuple(values.items()))


# --------------------------------------------------------------------------- ranking

def candidate_ids(project: Project, include_annotated: bool = False) -> list[str]:
    """Case ids a ranking chooses from, in project order.

    Args:
        project: the open project.
        include_annotated: also include fully annotated cases.
    """
    return [r.id for r in project.cases()
            if r.split not in EXCLUDED_SPLITS and (include_annotated or r.status != "full")]


def _annotated_ids(project: Project, candidates: Sequence[str]) -> list[str]:
    """Training cases with a mask (full, or scribbles) that are not candidates: the ``kcenter``
    centres. An image label alone does not cover a case: in a project where every case is
    labelled and a few are masked, the labels would otherwise cover everything."""
    cand = set(candidates)
    return [r.id for r in project.cases()
            if r.status in ("full", "sparse") and r.split not in EXCLUDED_SPLITS and r.id not in cand]


def rank(project: Project, strategy: str | Strategy = DEFAULT_STRATEGY, k: int = 10,
         include_annotated: bool = False, seed: int = 0, **options: Any) -> list[Ranked]:
    """Propose up to ``k`` cases to annotate next, best first.

    Reads only stored scores/features (no torch). Candidates are the non-holdout cases without a
    full annotation (all non-holdout cases with ``include_annotated``). Candidates the strategy
    cannot score (no prediction yet, or no such score/features stored) come after all scored
    ones, in seeded random order, with ``score=None`` and a reason saying why.

    Args:
        project: the open project (re-read from disk first, to see the newest predictions).
        strategy: a registered name or a :class:`Strategy` (e.g. from :func:`create_strategy`).
        k: how many cases to propose (fewer if there are fewer candidates).
        include_annotated: also propose fully annotated cases (e.g. to review them).
        seed: seed for ``random`` and for the order of unscored cases.
        **options: strategy options, e.g. ``duplicate_threshold=0.95``.

    Returns:
        ``Ranked(cid, name, score, reason)`` records; ``[]`` when there is no candidate.

    Raises:
        InputError: unknown strategy/option, or a negative ``k``.
        ProjectError: the strategy needs predictions and no candidate has one yet, or the stored
            predictions lack the score/features it needs.
    """
    if isinstance(strategy, Strategy):
        strat = replace(strategy, options=tuple({**strategy.option_values, **options}.items()))
    else:
        strat = create_strategy(strategy, **options)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise InputError("k", f"{k!r} is not a non-negative number of cases")
    if hasattr(project, "refresh"):
        project.refresh()
    candidates = candidate_ids(project, include_annotated)
    if not candidates or k == 0:
        return []
    pool = Pool(project, candidates, seed=seed, centres=_annotated_ids(project, candidates))
    if strat.needs:
        _check_predictions(project, pool, strat)
    picks = strat.fn(pool, k, **strat.option_values)
    picked = [cid for cid, _, _ in picks]
    if len(set(picked)) != len(picked) or not set(picked) <= set(candidates) or len(picks) > k:
        raise RuntimeError(f"strategy {strat.name!r} returned invalid picks {picked[:k + 1]}")
    rest = sorted((c for c in candidates if c not in set(picked)), key=pool.random_key)
    for cid in rest[: k - len(picks)]:
        picks.append((cid, None, _unscored_reason(pool, strat, cid)))
    return [Ranked(cid, pool.name(cid), score, reason) for cid, score, reason in picks]


def _check_predictions(project: Project, pool: Pool, strat: Strategy) -> None:
    with_outputs = [c for c in pool.candidates if pool.record(c) is not None]
    if not with_outputs:
        raise ProjectError(f"{project.path}: {NO_PREDICTIONS}")
    for need in strat.needs:
        if need == FEATURES:
            if not pool.features(with_outputs):
                raise ProjectError(f"{project.path}: the stored predictions have no feature "
                                   "vectors; run `lesionseg predict` again")
        elif not any(pool.score(c, need) is not None for c in with_outputs):
            raise ProjectError(f"{project.path}: the stored predictions have no {need!r} score; "
                               "run `lesionseg predict` again")


def _unscored_reason(pool: Pool, strat: Strategy, cid: str) -> str:
    if pool.record(cid) is None:
        why = "no prediction yet"
    elif FEATURES in strat.needs and cid not in pool.features(pool.candidates + pool.centres):
        why = "no features stored"
    else:
        missing = [n for n in strat.needs if n != FEATURES and pool.score(cid, n) is None]
        why = f"no {', '.join(missing) or 'score'} stored"
    return f"{why} (random order after scored cases)"


def _as_float(value: Any) -> float | None:
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    return None


__all__ = [
    "DEFAULT_DUPLICATE_THRESHOLD", "FEATURES", "NO_PREDICTIONS", "STRATEGIES", "Pool", "Ranked",
    "Strategy", "candidate_ids", "create_strategy", "get_strategy", "rank", "register",
    "score_strategy", "select_diverse",
]
