"""Simulated annotation sessions: does the active-learning loop save a clinician's annotations?

``lesionseg simulate`` (`run_simulation`) runs the product's real loop headless, with a
simulated annotator who reveals the hidden reference (imported with ``--reference``):

1. **set-up** (once per ``--out``): the source project's images and references are copied into
   ``OUT/work/base`` (the user's project is only read); an evaluation part is kept out of the
   pool (the source's ``holdout`` cases, else ``eval_fraction`` of the cases, stratified by
   reference label, seeded by ``eval_seed``) and marked ``holdout``, so training never sees it;
   ``label_all`` reveals every pool case's image label first ("label everything, mask a few").
2. **round 0**, per seed: a cold-start set of ``start`` cases (``random``, or ``diversity``:
   k-means on 16×16 thumbnails, the case nearest each centre) is revealed, a model is trained
   for ``budget_s`` (or ``steps``), it predicts the evaluation part and the unrevealed pool
   cases (``candidates``: a seeded random subset of them) as ``lesionseg predict`` does, and it
   is evaluated on the evaluation part. Round 0 is the same for every strategy of a seed, so it
   is trained once.
3. **rounds 1..rounds-1**, per strategy: the strategy ranks those candidates from the previous
   round's predictions (`acquisition`), the top ``step`` are revealed (a full mask,
   synthetic scribbles from the reference mask — `scribbles` — or the image label), a model is
   trained — fine-tuned from the previous round's (default) or from scratch — and evaluated.
   ``random`` always runs beside the chosen strategies.
4. **the peer** (`peer`): a plain MONAI network and loop, trained each round on the cases
   ``random`` revealed (random order), for the same budget, fine-tuned or from scratch alike.

Each completed (strategy, seed, round) is a row of ``OUT/results.json`` / ``results.csv``,
rewritten atomically after every round together with the state the next round needs (its
checkpoint and its picks): a killed simulation rerun with the same ``--out`` continues after the
last completed round, rebuilding its working project from the base and the recorded picks.
The report (plots, summary) is `sim_report`'s.

Why fine-tuning is the default: it is what the window's loop does (each training continues
from the latest model), and with the same budget per round a model that keeps its weights
learns the new cases instead of relearning the old ones.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from training_backend.active import acquisition
from training_backend.project.atomic import atomic_path
from training_backend.config import KIND_WORDS, METHOD_CATALOG, TrainConfig
from training_backend.active.curves import DEFAULT_COSTS_S, KINDS, annotation_time
from training_backend.errors import InputError, LesionsegError, ProjectError
from training_backend.project.store import Project

#: The strategy every other is compared with; always run.
REFERENCE = "random"
#: The peer's rows are named so.
PEER = "peer"
#: ``--annotate`` → the kind of annotation revealed (`curves.KINDS`).
ANNOTATE = {"mask": "full", "scribble": "sparse", "label": "image_label"}
START_MODES = ("random", "diversity")
#: TrainConfig fields the simulation sets itself (not allowed in ``settings``).
MANAGED = ("method", "method_options", "steps", "budget_s", "image_size", "device", "threads",
           "seed", "rounds", "predict", "predict_first", "init_from", "model_id")
#: The settings that may change between a killed run and its continuation.
RUNTIME_ONLY = ("out", "device", "threads", "keep_projects")
FORMAT = "lesionseg-simulation"


@dataclass
class SimulationConfig:
    """One simulated annotation session (``lesionseg simulate`` options).

    Args:
        out: results folder (also holds the working copies; rerun with it to continue).
        project: source project with hidden reference annotations (only read).
        method: training method.
        strategies: acquisition strategies (``random`` is added first).
        annotate: what the annotator reveals: ``mask``, ``scribble`` or ``label``.
        label_all: reveal every pool case's image label before round 0.
        start: cold-start cases; ``start_mode``: ``random`` or ``diversity``.
        step: cases revealed per round; ``rounds``: rounds including round 0.
        seeds: runs per strategy (seeds 0..seeds-1: cold start, training, scribbles).
        budget_s / steps: training per round (wall-clock seconds / optimisation steps).
        fine_tune: each round continues from the previous round's model (else from scratch).
        candidates: rank a seeded random subset of this many unrevealed pool cases each round
            (None: all of them); only those and the evaluation cases are predicted.
        costs: seconds of annotation per case by kind (`curves.DEFAULT_COSTS_S`).
        eval_fraction, eval_seed: the evaluation part, when the source has no holdout cases.
        peer: train the peer (a plain MONAI loop) on random's cases each round (not with
            ``annotate="label"``: it learns from masks or scribbles only).
        image_size: training side; method_options: the method's options; settings: other
            `TrainConfig` fields (e.g. ``mc_samples``, ``batch_size``).
        device, threads: where and on how many CPU threads to train.
        keep_projects: keep each (strategy, seed)'s working project when it is done.
    """

    out: str
    project: str | None = None
    method: str = "supervised"
    strategies: list = field(default_factory=lambda: [acquisition.DEFAULT_STRATEGY])
    annotate: str = "mask"
    label_all: bool = False
    start: int = 10
    start_mode: str = "random"
    step: int = 10
    rounds: int = 8
    seeds: int = 3
    budget_s: float | None = 60.0
    steps: int | None = None
    fine_tune: bool = True
    candidates: int | None = None
    costs: dict = field(default_factory=lambda: dict(DEFAULT_COSTS_S))
    eval_fraction: float = 0.2
    eval_seed: int = 0
    peer: bool = True
    image_size: int = 128
    method_options: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    device: str = "auto"
    threads: int | None = None
    keep_projects: bool = False

    def __post_init__(self) -> None:
        if self.project is not None:
            self.project = str(Path(self.project).resolve())
        self.strategies = list(dict.fromkeys([REFERENCE, *self.strategies]))
        for name in self.strategies:
            acquisition.get_strategy(name)  # unknown: the error lists the valid names
        if self.method not in METHOD_CATALOG:
            raise InputError("--method", f"unknown method {self.method!r}; valid: "
                             + ", ".join(METHOD_CATALOG))
        if self.annotate not in ANNOTATE:
            raise InputError("--annotate", f"must be one of {', '.join(ANNOTATE)}, got {self.annotate!r}")
        if self.start_mode not in START_MODES:
            raise InputError("--start-mode", f"must be one of {', '.join(START_MODES)}")
        for name in ("start", "step", "rounds", "seeds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name}", f"must be a positive whole number, got {value!r}")
        if self.candidates is not None and (not isinstance(self.candidates, int)
                                            or self.candidates < self.step):
            raise InputError("--candidates", f"must be a whole number >= --step ({self.step})")
        if self.budget_s is None and self.steps is None:
            raise InputError("--budget-s", "give a training budget per round (or --steps)")
        if not 0.0 < self.eval_fraction < 1.0:
            raise InputError("--eval-fraction", f"must be between 0 and 1, got {self.eval_fraction!r}")
        if self.label_all and self.annotate == "label":
            raise InputError("--label-all", "--annotate label already reveals image labels")
        # a plain segmentation loop cannot learn from image labels (the summary says so)
        self.peer = bool(self.peer) and self.annotate != "label"
        unknown = sorted(set(self.costs) - set(KINDS))
        if unknown or any(float(v) < 0 for v in self.costs.values()):
            raise InputError("--cost", f"costs are seconds >= 0 for {', '.join(KINDS)}")
        self.costs = {**DEFAULT_COSTS_S, **{k: float(v) for k, v in self.costs.items()}}
        known = {f.name for f in fields(TrainConfig)}
        bad = sorted(k for k in self.settings if k not in known or k in MANAGED)
        if bad:
            raise InputError("--set", f"not a training setting simulate lets you set: {', '.join(bad)}")
        self.train_config(0, 0, None)  # invalid values fail here, before any work

    @property
    def kind(self) -> str:
        """The kind of annotation the strategies choose cases for (`curves.KINDS`)."""
        return ANNOTATE[self.annotate]

    def train_config(self, seed: int, round_: int, init_from: str | None) -> TrainConfig:
        """The `TrainConfig` of one round.

        Args:
            seed: the run's seed.
            round_: the round (names the model ``round00``, ``round01``, ...).
            init_from: checkpoint to fine-tune from, or None.
        """
        return TrainConfig(method=self.method, method_options=dict(self.method_options),
                           steps=self.steps, budget_s=self.budget_s, image_size=self.image_size,
                           device=self.device, threads=self.threads, seed=seed, predict=False,
                           init_from=init_from, model_id=f"round{round_:02d}", **self.settings)

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """What makes two runs the same simulation (everything but `RUNTIME_ONLY`)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_ONLY}


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True)
class SimStarted:
    """The plan: ``total`` trainings (ours and the peer's), ``done`` of them already recorded."""

    total: int
    done: int
    n_pool: int
    n_eval: int
    out: str


@dataclass(frozen=True)
class SimProgress:
    """Work under way: ``done`` trainings of ``total`` (fractional), and what runs now."""

    done: float
    total: int
    what: str


@dataclass(frozen=True)
class RoundDone:
    """A (strategy, seed, round) finished; its row is saved."""

    row: dict
    done: float
    total: int


@dataclass(frozen=True)
class SimFinished:
    """Every round is done and the report is written."""

    out: str
    n_rows: int
    files: tuple
    summary: str  # the Markdown of ``summary.md``


SimEvent = SimStarted | SimProgress | RoundDone | SimFinished


# ----------------------------------------------------------------------------- the run
def run_simulation(config: SimulationConfig) -> Iterator[SimEvent]:
    """Run (or continue) a simulation, yielding events; the last one is `SimFinished`.

    Args:
        config: the session's settings.

    Raises:
        LesionsegError: bad settings, a project without the reference the run needs, or an
            ``--out`` that holds a simulation with other settings.
    """
    yield from _Simulation(config).events()


def simulate(config: SimulationConfig, on_event: Callable[[SimEvent], Any] | None = None) -> SimFinished:
    """Drain `run_simulation` and return its `SimFinished`.

    Args:
        config: the session's settings.
        on_event: called with every event.
    """
    last = None
    for event in run_simulation(config):
        if on_event is not None:
            on_event(event)
        last = event
    assert isinstance(last, SimFinished)
    return last


class _Simulation:
    """State of one simulation; `events` is the loop."""

    def __init__(self, config: SimulationConfig):
        from training_backend.active import sim_report

        self.cfg = config
        self.out = Path(config.out)
        self.report = sim_report
        self.rows: list[dict] = []
        self._thumbs: dict[str, np.ndarray] = {}

    # ---- bookkeeping
    @property
    def strategies(self) -> list[str]:
        return self.cfg.strategies

    def _total(self) -> int:
        per_seed = 1 + len(self.strategies) * (self.cfg.rounds - 1)
        return self.cfg.seeds * (per_seed + (self.cfg.rounds if self.cfg.peer else 0))

    def _done(self) -> int:
        rounds0 = {r["seed"] for r in self.rows if r["round"] == 0 and r["strategy"] == REFERENCE}
        later = sum(1 for r in self.rows if r["round"] > 0 and r["strategy"] != PEER)
        return len(rounds0) + later + sum(1 for r in self.rows if r["strategy"] == PEER)

    def _last(self, strategy: str, seed: int) -> dict | None:
        mine = [r for r in self.rows if r["strategy"] == strategy and r["seed"] == seed]
        return max(mine, key=lambda r: r["round"]) if mine else None

    def _save(self, new_rows: list[dict]) -> None:
        self.rows.extend(new_rows)
        self.report.save_rows(self.out, self.rows, self.classes)

    # ---- the loop
    def events(self) -> Iterator[SimEvent]:
        self._open()
        total = self._total()
        yield SimStarted(total, self._done(), len(self.pool), len(self.eval_ids), str(self.out))
        for seed in range(self.cfg.seeds):
            if self._last(REFERENCE, seed) is None:
                yield from self._round0(seed)
            for strategy in self.strategies:
                yield from self._continue(strategy, seed)
        files = self.report.write_report(self.out, self.rows, self.meta)
        summary = (self.out / "summary.md").read_text(encoding="utf-8")
        yield SimFinished(str(self.out), len(self.rows), tuple(str(f) for f in files), summary)

    def _progress(self, fraction: float, what: str) -> SimProgress:
        return SimProgress(self._done() + min(1.0, max(0.0, fraction)), self._total(), what)

    # ---- set-up
    def _open(self) -> None:
        """Check or write ``simulation.json``, build or reuse the base project, load rows."""
        from training_backend.project.store import atomic_write_json

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        meta_path = self.out / "simulation.json"
        if meta_path.is_file():
            import json

            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise ProjectError(f"{meta_path}: not a lesionseg simulation")
            old = meta.get("config", {})
            differ = sorted(k for k, v in cfg.identity().items() if old.get(k) != v)
            if differ:
                raise ProjectError(f"{self.out}: holds a simulation with other settings (they "
                                   f"differ in {', '.join(differ)}); use another --out to start "
                                   "a new one")
        else:
            if cfg.project is None:
                raise InputError("--project", "no source project given")
            meta = {"format": FORMAT, "version": 1, "config": cfg.identity()}
            atomic_write_json(meta_path, meta)
        self.base = self._base()
        project = Project.open(self.base, mode="r")
        self.classes = list(project.classes)
        recs = project.cases()
        self.names = {r.id: r.name for r in recs}
        self.eval_ids = [r.id for r in recs if r.split == "holdout"]
        self.pool = [r.id for r in recs if r.split != "holdout" and _revealable(project, r, cfg.kind)]
        need = cfg.start + cfg.step * (cfg.rounds - 1)
        what = "label" if cfg.kind == "image_label" else "mask"
        if not self.pool:
            raise ProjectError(f"{cfg.project or self.base}: no training case has a hidden reference "
                               f"{what} to reveal (import with `lesionseg import ... --reference`)")
        if len(self.pool) < need:
            raise ProjectError(
                f"{cfg.project or self.base}: {len(self.pool)} training cases have a reference "
                f"{what} to reveal; --start + --step × "
                f"(--rounds - 1) = {need} needs more (fewer rounds or smaller steps)")
        if not self.eval_ids:
            raise ProjectError(f"{self.base}: no case left for evaluation")
        self._check_method(len([r for r in recs if r.split != "holdout"]))
        self.meta = {**meta, "classes": self.classes, "n_pool": len(self.pool),
                     "n_eval": len(self.eval_ids), "kind": cfg.kind}
        self.rows = self.report.load_rows(self.out)

    def _check_method(self, n_train: int) -> None:
        """The method must be able to learn from what round 0 reveals."""
        cfg = self.cfg
        counts = {"full": 0, "sparse": 0, "image_label": len(self.pool) if cfg.label_all else 0}
        counts[cfg.kind] += cfg.start
        counts["maskless"] = n_train - counts["full"] - counts["sparse"]
        counts["unlabelled"] = n_train - max(counts["image_label"], cfg.start)
        sup = METHOD_CATALOG[cfg.method].supervision
        if not sup.met_by(counts):
            given = KIND_WORDS[cfg.kind] + (" and image labels" if cfg.label_all else "")
            raise InputError("--method", f"{cfg.method} needs {sup.needs()}; --annotate "
                             f"{cfg.annotate} gives it {given}")

    def _base(self) -> Path:
        """``OUT/work/base``: the source's images and references, evaluation part marked."""
        base = self.out / "work" / "base"
        if Project.is_project(base) and (base / ".complete").is_file():
            return base
        tmp = self.out / "work" / "base.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)
        copy_references(Project.open(self.cfg.project, mode="r"), tmp)
        project = Project.open(tmp)
        if not any(r.split == "holdout" for r in project.cases()):
            project.set_split(evaluation_split(project, self.cfg.eval_fraction, self.cfg.eval_seed),
                              "holdout")
        if self.cfg.label_all:
            with project.batch(flush_every_s=3600):
                for rec in project.cases():
                    if rec.split != "holdout" and _revealable(project, rec, "image_label"):
                        reveal(project, rec.id, "image_label", 0)
        (tmp / ".complete").touch()
        os.replace(tmp, base)
        return base

    # ---- working projects
    def _workspace(self, name: str, revealed: list[str], seed: int) -> Project:
        """A fresh copy of the base with ``revealed`` annotated (a rerun rebuilds it so)."""
        path = self.out / "work" / name
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(self.base, path)
        (path / ".complete").unlink(missing_ok=True)
        project = Project.open(path)
        reveal_all(project, revealed, self.cfg.kind, seed)
        return project

    def _drop(self, project: Project) -> None:
        if not self.cfg.keep_projects:
            shutil.rmtree(project.path, ignore_errors=True)

    # ---- round 0 (shared by the strategies of a seed)
    def _round0(self, seed: int) -> Iterator[SimEvent]:
        t0 = time.monotonic()
        picks = self._cold_start(seed)
        project = self._workspace(f"seed{seed}-start", picks, seed)
        what = f"seed {seed} round 0 (cold start)"
        train = yield from self._train(project, seed, 0, None, what)
        last = self.cfg.rounds == 1
        candidates = [] if last else self._candidates(picks, seed, 0)
        yield from self._predict(project, train, picks, candidates, self.strategies, what)
        metrics = self._evaluate(project)
        ckpt = self._keep_checkpoint(project, train["model_id"], f"start-seed{seed}")
        rows = []
        for strategy in self.strategies:
            nxt = [] if last else self._rank(project, strategy, candidates, seed)
            rows.append(self._row(strategy, seed, 0, picks, picks, nxt, ckpt, train, metrics, t0))
        if self.cfg.peer:
            rows.append((yield from self._peer(project, seed, 0, picks, picks, None, t0)))
        self._drop(project)
        self._save(rows)
        for row in rows:
            yield RoundDone(row, self._done(), self._total())

    # ---- later rounds of one strategy
    def _continue(self, strategy: str, seed: int) -> Iterator[SimEvent]:
        last = self._last(strategy, seed)
        if last is None or last["round"] >= self.cfg.rounds - 1:
            return
        project = self._workspace(f"{strategy}-seed{seed}", last["revealed"], seed)
        for round_ in range(last["round"] + 1, self.cfg.rounds):
            t0 = time.monotonic()
            picks = list(last["next"])
            reveal_all(project, picks, self.cfg.kind, seed)
            revealed = [*last["revealed"], *picks]
            init = str(self.out / last["checkpoint"]) if self.cfg.fine_tune else None
            what = f"{strategy} seed {seed} round {round_}"
            train = yield from self._train(project, seed, round_, init, what)
            last_round = round_ == self.cfg.rounds - 1
            candidates = [] if last_round else self._candidates(revealed, seed, round_)
            yield from self._predict(project, train, revealed, candidates, [strategy], what)
            metrics = self._evaluate(project)
            nxt = [] if last_round else self._rank(project, strategy, candidates, seed)
            ckpt = self._keep_checkpoint(project, train["model_id"], f"{strategy}-seed{seed}-r{round_:02d}")
            rows = [self._row(strategy, seed, round_, revealed, picks, nxt, ckpt, train, metrics, t0)]
            stale = [] if last["checkpoint"].startswith("state/start-") else [last["checkpoint"]]
            if strategy == REFERENCE and self.cfg.peer:
                prev = self._last(PEER, seed)
                rows.append((yield from self._peer(project, seed, round_, revealed, picks, prev, t0)))
                stale += [prev["checkpoint"]] if prev is not None else []
            self._save(rows)
            for path in stale:  # the state the next round needs is saved: the old one can go
                (self.out / path).unlink(missing_ok=True)
            for row in rows:
                yield RoundDone(row, self._done(), self._total())
            last = rows[0]
        self._drop(project)

    # ---- steps of a round
    def _train(self, project: Project, seed: int, round_: int, init: str | None,
               what: str) -> Iterator[SimEvent]:
        """Train one round in this process (the predictions are `_predict`'s)."""
        from training_backend.events import Failed, Finished, Progress
        from training_backend.learning.trainer import run_training

        t0 = time.monotonic()
        cfg = self.cfg.train_config(seed, round_, init)
        for event in run_training(project.path, cfg):
            if isinstance(event, Progress):
                yield self._progress(0.7 * event.fraction, what)
            elif isinstance(event, Failed):
                if event.user_error:
                    raise LesionsegError(event.message)
                raise RuntimeError(f"training failed: {event.message}\n{event.traceback}")
            elif isinstance(event, Finished):
                return {"model_id": event.model_id, "steps": event.step,
                        "train_s": round(time.monotonic() - t0, 2)}
        raise RuntimeError("training ended without a Finished event")  # pragma: no cover

    def _predict(self, project: Project, train: dict, revealed: list[str], candidates: list[str],
                 strategies: list[str], what: str) -> Iterator[SimEvent]:
        """Predict what the round needs, as ``lesionseg predict`` does: the evaluation cases, the
        ranking's candidates, and the revealed cases when a strategy reads their features
        (``kcenter``: the annotated cases are its centres)."""
        import torch

        from training_backend.learning.inference import iter_predictions

        centres = any(acquisition.FEATURES in acquisition.get_strategy(s).needs for s in strategies)
        ids = list(dict.fromkeys([*self.eval_ids, *candidates, *(revealed if centres and candidates else [])]))
        ckpt = project.path / "models" / train["model_id"] / "latest.pt"
        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        t0 = time.monotonic()
        try:
            for item in iter_predictions(project, ckpt, ids, device=self.cfg.device):
                yield self._progress(0.7 + 0.3 * item.index / max(1, item.total), what + ", predicting")
        finally:
            torch.set_num_threads(threads)
        train["predict_s"] = round(time.monotonic() - t0, 2)
        train["n_predicted"] = len(ids)

    def _candidates(self, revealed: list[str], seed: int, round_: int) -> list[str]:
        """The unrevealed pool cases the strategies choose from this round (a seeded random
        subset of ``candidates`` of them when that is set)."""
        done = set(revealed)
        rest = [c for c in self.pool if c not in done]
        n = self.cfg.candidates
        if n and len(rest) > n:
            rng = np.random.default_rng([seed, round_, 23])
            rest = [rest[i] for i in sorted(rng.choice(len(rest), n, replace=False))]
        return rest

    def _keep_checkpoint(self, project: Project, model_id: str, name: str) -> str:
        """Copy the round's final checkpoint to ``OUT/state/NAME.pt``; its path relative to OUT."""
        src = project.path / "models" / model_id / "latest.pt"
        dest = self.out / "state" / f"{name}.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)  # follows the latest.pt link
        return str(dest.relative_to(self.out))

    def _evaluate(self, project: Project) -> dict:
        """Dice per class, lesion Dice and AUCs on the evaluation part (`metrics.evaluate_project`)."""
        from training_backend.learning.metrics import evaluate_project

        project.refresh()
        res = evaluate_project(project, split="holdout")
        pres = [v for v in (res.get("presence_auc") or {}).values() if v is not None]
        return {"dice": res["dice"],
                "dice_per_class": {c: v["dice"] for c, v in res["per_class"].items()},
                "presence_auc": float(np.mean(pres)) if pres else None,
                "image_class_auc": res.get("image_class_auc_macro"),
                "empty_rate": res.get("empty_rate"), "n_eval": res["n_cases"],
                "failure_detection": res.get("failure_detection") or {}}

    def _rank(self, project: Project, strategy: str, candidates: list[str], seed: int) -> list[str]:
        """The next ``step`` cases ``strategy`` proposes among ``candidates``."""
        project.refresh()
        k = min(self.cfg.step, len(candidates))
        picks = [cid for cid, _ in acquisition.get_strategy(strategy)(project, candidates, k, seed=seed)]
        if len(picks) < k:  # cases it could not score: random ones, seeded
            rest = [c for c in candidates if c not in set(picks)]
            np.random.default_rng([seed, len(candidates), 17]).shuffle(rest)
            picks += rest[: k - len(picks)]
        return picks[:k]

    def _cold_start(self, seed: int) -> list[str]:
        """``start`` pool cases: random, or the case nearest each k-means centre of thumbnails."""
        k = self.cfg.start
        if self.cfg.start_mode == "random":
            rng = np.random.default_rng([seed, 1])
            return [self.pool[i] for i in sorted(rng.choice(len(self.pool), k, replace=False))]
        feats = self._thumbnails()
        return diverse_cases(feats, self.pool, k, seed)

    def _thumbnails(self) -> np.ndarray:
        if not self._thumbs:
            project = Project.open(self.base, mode="r")
            for cid in self.pool:
                self._thumbs[cid] = thumbnail(project.read_image(cid))
        return np.stack([self._thumbs[c] for c in self.pool])

    # ---- the peer
    def _peer(self, project: Project, seed: int, round_: int, revealed: list[str],
              picks: list[str], prev: dict | None, t0: float) -> Iterator[SimEvent]:
        """Train and evaluate the peer on the cases revealed in ``project``; its row.

        The peer trains in a thread so that the progress bar keeps moving; closing this
        generator (Ctrl-C, a test) stops it after its current step.
        """
        import threading

        import torch

        from training_backend.learning.peer import train_peer

        init = None
        if self.cfg.fine_tune and prev is not None:
            init = torch.load(self.out / prev["checkpoint"], map_location="cpu", weights_only=True)
        progress: list[float] = [0.0]
        result: dict[str, Any] = {}
        stop = threading.Event()

        def work() -> None:
            try:
                result["model"] = train_peer(
                    project.path, budget_s=self.cfg.budget_s, steps=self.cfg.steps,
                    image_size=self.cfg.image_size, seed=seed, init=init,
                    device=self.cfg.device, on_progress=progress.append, cancel=stop.is_set)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                result["error"] = exc

        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        what = f"peer seed {seed} round {round_}"
        t_train = time.monotonic()
        worker = threading.Thread(target=work, name="lesionseg-peer", daemon=True)
        worker.start()
        try:
            while worker.is_alive():
                worker.join(0.5)
                yield self._progress(0.9 * progress[-1], what)
        finally:
            stop.set()
            worker.join()
            torch.set_num_threads(threads)
        if "error" in result:
            raise result["error"]
        model = result["model"]
        train = {"model_id": PEER, "steps": model.steps,
                 "train_s": round(time.monotonic() - t_train, 2)}
        metrics = evaluate_peer(project, model)
        dest = self.out / "state" / f"peer-seed{seed}-r{round_:02d}.pt"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(dest) as tmp:
            torch.save(model.state(), tmp)
        return self._row(PEER, seed, round_, revealed, picks, [], str(dest.relative_to(self.out)),
                         train, metrics, t0)

    # ---- rows
    def _row(self, strategy: str, seed: int, round_: int, revealed: list[str], picks: list[str],
             nxt: list[str], ckpt: str, train: dict, metrics: dict, t0: float) -> dict:
        cfg = self.cfg
        counts = {k: 0 for k in KINDS}
        counts[cfg.kind] = len(revealed)
        if cfg.label_all:
            counts["image_label"] = len(self.pool)
        return {
            "strategy": strategy, "seed": seed, "round": round_,
            "annotations": len(revealed), **counts,
            "cost_s": annotation_time(counts, cfg.costs),
            **{k: metrics.get(k) for k in ("dice", "dice_per_class", "presence_auc",
                                           "image_class_auc", "empty_rate", "n_eval")},
            "steps": train["steps"], "train_s": train["train_s"],
            "predict_s": train.get("predict_s"), "n_predicted": train.get("n_predicted"),
            "wall_s": round(time.monotonic() - t0, 2),
            "picked": list(picks), "picked_names": [self.names[c] for c in picks],
            "revealed": list(revealed), "next": list(nxt), "checkpoint": ckpt,
            "model": train["model_id"],
            "failure_detection": metrics.get("failure_detection") or {},
        }


# ----------------------------------------------------------------------------- helpers
def copy_references(source: Project, dest: str | os.PathLike) -> Project:
    """A new project at ``dest`` with the source's images and hidden references, nothing else.

    A case's reference is its reference mask and labels, or, where it has none, its visible
    image label / presence; a case whose label is negative (e.g. ``normal``) or whose presence
    is all False and that has no reference mask gets an empty one (it is lesion-free).

    Args:
        source: the user's project (read only).
        dest: the folder to create.
    """
    project = Project.create(dest, source.classes, source.image_classes,
                             name=f"{source.name} (simulation)", colors=source.colors,
                             negative_classes=source.negative_classes)
    with project.batch(flush_every_s=3600):
        for rec in source.cases():
            image = source.read_image(rec.id)
            cid = project.add_case(image, rec.name, source=rec.source, split=rec.split)
            mask = source.read_reference(rec.id)
            label = rec.reference_label or rec.image_label
            presence = rec.reference_presence or rec.presence
            lesion_free = source.is_negative(label) or (presence and not any(presence.values()))
            if mask is None and lesion_free:
                mask = np.zeros(rec.shape, np.uint8)
            project.set_reference(cid, mask=mask, image_label=label, presence=presence)
    return project


def evaluation_split(project: Project, fraction: float, seed: int) -> list[str]:
    """Case ids kept out of the pool for evaluation: ``fraction`` of each reference class.

    The classes are the reference image labels, else "has a lesion" / "lesion-free"; within
    each, a seeded shuffle. Cases without any reference cannot be scored: they stay in training
    (as images without annotation, which semi-supervised methods learn from).

    Args:
        project: the simulation's base project.
        fraction: share of each class.
        seed: shuffle seed.
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[str]] = {}
    for rec in project.cases():
        if rec.reference_label is not None:
            key = rec.reference_label
        elif rec.reference_presence:
            key = "lesion" if any(rec.reference_presence.values()) else "lesion-free"
        elif rec.has_reference:
            key = "lesion"
        else:
            continue
        by_class.setdefault(key, []).append(rec.id)
    chosen = []
    for key in sorted(by_class):
        ids = list(by_class[key])
        rng.shuffle(ids)
        chosen += ids[: int(round(fraction * len(ids)))]
    return sorted(chosen)


def _revealable(project: Project, rec, kind: str) -> bool:
    if kind == "image_label":
        return rec.reference_label is not None or bool(rec.reference_presence)
    return rec.has_reference


def reveal(project: Project, cid: str, kind: str, seed: int) -> None:
    """The simulated annotator annotates a case from its hidden reference.

    Args:
        project: the working project.
        cid: the case.
        kind: ``full`` (the reference mask), ``sparse`` (`scribbles.synthetic_scribbles` of it,
            seeded by ``seed`` and the case) or ``image_label`` (its reference label/presence).
        seed: the run's seed.
    """
    if kind == "image_label":
        rec = project.case(cid)
        label = rec.reference_label if rec.reference_label in project.image_classes else None
        project.set_image_label(cid, label, presence=rec.reference_presence, author="simulated")
        return
    mask = project.read_reference(cid)
    if kind == "sparse":
        from training_backend.active.scribbles import synthetic_scribbles

        mask = synthetic_scribbles(mask, len(project.classes), seed=(seed, int(cid.lstrip("c") or 0)))
        project.save_annotation(cid, mask, "sparse", author="simulated", source="reference:scribbles")
    else:
        project.save_annotation(cid, mask, "full", author="simulated", source="reference")


def reveal_all(project: Project, cids: list[str], kind: str, seed: int) -> None:
    """`reveal` each case, with one index write."""
    if not cids:
        return
    with project.batch(flush_every_s=3600):
        for cid in cids:
            reveal(project, cid, kind, seed)


def thumbnail(image: np.ndarray, size: int = 16) -> np.ndarray:
    """A grey ``size`` × ``size`` thumbnail, standardised, flattened (diversity cold start)."""
    from skimage.transform import resize

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(-1)
    small = resize(img, (size, size), anti_aliasing=True).ravel()
    return (small - small.mean()) / (small.std() + 1e-6)


def diverse_cases(features: np.ndarray, ids: list[str], k: int, seed: int) -> list[str]:
    """The case nearest each of ``k`` k-means centres (`scipy.cluster.vq.kmeans2`, seeded).

    Args:
        features: (N, F) one row per case of ``ids``.
        ids: case ids.
        k: how many.
        seed: k-means seed.
    """
    from scipy.cluster.vq import kmeans2

    centres, _ = kmeans2(features.astype(np.float64), k, seed=seed, minit="++")
    dist = ((features[:, None, :] - centres[None]) ** 2).sum(-1)  # (N, k)
    chosen: list[int] = []
    for j in range(k):
        for i in np.argsort(dist[:, j]):
            if i not in chosen:
                chosen.append(int(i))
                break
    return [ids[i] for i in sorted(chosen)]


def evaluate_peer(project: Project, model) -> dict:
    """The peer's Dice on the evaluation part, with `metrics.evaluate_project`'s conventions
    (per class over the cases whose reference has it; lesion-free cases give the empty rate)."""
    from training_backend.learning.metrics import case_metrics

    k = len(project.classes)
    per_class: dict[str, list[float]] = {c: [] for c in project.classes}
    empty: list[bool] = []
    n = 0
    for rec in project.cases():
        if rec.split != "holdout" or not rec.has_reference:
            continue
        ref = project.read_reference(rec.id)
        pred = model.predict(project.read_image(rec.id))
        n += 1
        present = [bool(np.any(ref == i + 1)) for i in range(k)]
        if not any(present):
            empty.append(not bool(np.any(pred > 0)))
            continue
        dice = case_metrics(pred, ref, k)["dice"]
        for i, c in enumerate(project.classes):
            if present[i]:
                per_class[c].append(dice[i])
    means = {c: (float(np.mean(v)) if v else None) for c, v in per_class.items()}
    vals = [v for v in means.values() if v is not None]
    return {"dice": float(np.mean(vals)) if vals else None, "dice_per_class": means,
            "presence_auc": None, "image_class_auc": None,
            "empty_rate": float(np.mean(empty)) if empty else None, "n_eval": n,
            "failure_detection": {}}


__all__ = ["ANNOTATE", "PEER", "REFERENCE", "RoundDone", "SimFinished", "SimProgress",
           "SimStarted", "SimulationConfig", "copy_references", "diverse_cases", "evaluate_peer",
           "evaluation_split", "reveal", "reveal_all", "run_simulation", "simulate", "thumbnail"]
