"""Active learning: every registered strategy passes one contract test; specific behaviour of
entropy, k-center, near-duplicate suppression, errors and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training_backend.active import acquisition
from training_backend.active.acquisition import STRATEGIES, create_strategy, get_strategy, rank
from training_backend import cli
from training_backend.errors import InputError, ProjectError
from training_backend.project.store import Project

ROOT = Path(__file__).resolve().parents[1]
H = W = 8
SCORE_KEYS = ("entropy", "entropy_lesion", "bald", "tta_var", "cam_disagreement",
              "burden_disagreement", "uncertainty_mean", "disagreement")


def _unit(i: int, dim: int = 6, eps: float = 0.0, j: int = 5) -> np.ndarray:
    """Basis vector e_i (plus eps * e_j, to make a near-duplicate)."""
    v = np.zeros(dim, np.float32)
    v[i] = 1.0
    v[j] += eps
    return v


def _write(project: Project, cid: str, scores: dict, features: np.ndarray | None) -> None:
    k = len(project.classes)
    pred = np.zeros((H, W), np.uint8)
    prob = np.full((k + 1, H, W), 1.0 / (k + 1), np.float32)  # (K+1, H, W)
    cam = np.zeros((k, H, W), np.float32)  # (K, H, W)
    project.write_outputs(cid, "fake-model", pred, prob, cam, np.zeros((H, W), np.float32),
                          scores=scores, features=features)


def _build(path: Path, cases: list[dict]) -> tuple[Project, dict[str, str]]:
    """A tiny project; each case dict: name, status (full/sparse/image/none), split, scores
    (a number for every strategy key, or a dict, or None for no outputs), features."""
    project = Project.create(path, ["lesion"], ["normal", "abnormal"])
    ids = {}
    for i, c in enumerate(cases):
        img = np.random.default_rng(i).integers(0, 255, (H, W), dtype=np.uint8)
        label = "abnormal" if c.get("status") == "image" else None
        cid = project.add_case(img, c["name"], image_label=label, split=c.get("split", "train"))
        ids[c["name"]] = cid
        mask = np.zeros((H, W), np.uint8)
        mask[2:4, 2:4] = 1
        if c.get("status") == "full":
            project.save_annotation(cid, mask, "full")
        elif c.get("status") == "sparse":
            project.save_annotation(cid, mask, "sparse")
        scores = c.get("scores")
        if scores is not None:
            if not isinstance(scores, dict):
                scores = {key: float(scores) for key in SCORE_KEYS}
            _write(project, cid, scores, c.get("features"))
    return project, ids


#: Contract project: the non-candidates carry the highest scores, so including one is visible.
CONTRACT_CASES = [
    {"name": "full high", "status": "full", "scores": 9.0, "features": _unit(0)},
    {"name": "holdout high", "status": "none", "split": "holdout", "scores": 10.0,
     "features": _unit(1)},
    {"name": "holdout full", "status": "full", "split": "holdout", "scores": 8.0,
     "features": _unit(2)},
    {"name": "unlabelled a", "status": "none", "scores": 0.7, "features": _unit(1, eps=0.3)},
    {"name": "unlabelled b", "status": "none", "scores": 0.2, "features": _unit(2, eps=0.3)},
    {"name": "sparse (1) é", "status": "sparse", "scores": 0.5, "features": _unit(3)},
    {"name": "image label", "status": "image", "scores": 0.9, "features": _unit(4)},
    {"name": "near dup", "status": "none", "scores": 0.85, "features": _unit(4, eps=0.01)},
    {"name": "no prediction", "status": "none", "scores": None},
]
CANDIDATES = {"unlabelled a", "unlabelled b", "sparse (1) é", "image label", "near dup",
              "no prediction"}


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("acq") / "p", CONTRACT_CASES)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_contract(contract, name):
    project, ids = contract
    names = {cid: n for n, cid in ids.items()}
    candidates = {ids[n] for n in CANDIDATES}

    first = rank(project, name, k=3, seed=7)
    assert len(first) == 3 and len({r.cid for r in first}) == 3
    assert {r.cid for r in first} <= candidates
    assert all(r.name == names[r.cid] and r.reason for r in first)
    assert [(r.cid, r.score) for r in rank(project, name, k=3, seed=7)] == \
        [(r.cid, r.score) for r in first]  # deterministic for a seed

    # k larger than the pool: every candidate exactly once; unscored ones last, score None.
    everything = rank(project, name, k=50, seed=7)
    assert sorted(r.cid for r in everything) == sorted(candidates)
    scored = [r.score is not None for r in everything]
    assert scored == sorted(scored, reverse=True)
    assert everything[-1].cid == ids["no prediction"] or not STRATEGIES[name].needs
    if STRATEGIES[name].needs:
        assert everything[-1].score is None and "no prediction yet" in everything[-1].reason

    # include_annotated adds the fully annotated training case, never holdout ones.
    wide = {r.cid for r in rank(project, name, k=50, include_annotated=True, seed=7)}
    assert wide == candidates | {ids["full high"]}

    # The architecture-contract call convention: strategy(project, candidates, k) -> [(cid, score)].
    pairs = STRATEGIES[name](project, sorted(candidates), 2)
    assert len(pairs) == 2 and {cid for cid, _ in pairs} <= candidates
    assert all(isinstance(score, float) for _, score in pairs)


def test_entropy_picks_highest_entropy_candidate(contract):
    project, ids = contract
    top = rank(project, "entropy", k=1)
    assert [r.cid for r in top] == [ids["image label"]]  # 0.9; full/holdout cases score higher
    assert top[0].score == pytest.approx(0.9) and "entropy" in top[0].reason
    # The unpacking form of the original contract still works.
    (cid, score), = rank(project, "bald", k=1)
    assert cid == ids["image label"] and score == pytest.approx(0.9)


def test_score_strategies_use_their_own_key(tmp_path):
    cases = [{"name": n, "status": "none", "features": _unit(i),
              "scores": {k: (1.0 if k == key else 0.0) for k in SCORE_KEYS}}
             for i, (n, key) in enumerate([("e", "entropy"), ("b", "bald"), ("t", "tta_var")])]
    project, ids = _build(tmp_path / "p", cases)
    assert rank(project, "entropy", k=1)[0].cid == ids["e"]
    assert rank(project, "bald", k=1)[0].cid == ids["b"]
    assert rank(project, "tta_variance", k=1)[0].cid == ids["t"]


def test_duplicate_suppression(tmp_path):
    cases = [
        {"name": "p", "scores": {"entropy": 0.9}, "features": _unit(0)},
        {"name": "q", "scores": {"entropy": 0.8}, "features": _unit(0, eps=0.05)},  # cos 0.9988
        {"name": "r", "scores": {"entropy": 0.5}, "features": _unit(1)},
    ]
    project, ids = _build(tmp_path / "p", cases)
    assert [r.cid for r in rank(project, "entropy", k=2)] == [ids["p"], ids["r"]]
    assert [r.cid for r in rank(project, "entropy", k=2, duplicate_threshold=None)] == \
        [ids["p"], ids["q"]]
    assert [r.cid for r in rank(project, "entropy", k=2, duplicate_threshold=0.999)] == \
        [ids["p"], ids["q"]]  # 0.9988 is below this stricter threshold
    # The skipped duplicate only fills the list once nothing else is left, and says so.
    full = rank(project, "entropy", k=3)
    assert [r.cid for r in full] == [ids["p"], ids["r"], ids["q"]]
    assert "near-duplicate of p" in full[2].reason


def test_duplicate_suppression_falls_back_to_top_k_without_features(tmp_path):
    cases = [{"name": n, "scores": {"entropy": s}} for n, s in (("p", 0.9), ("q", 0.8), ("r", 0.5))]
    project, ids = _build(tmp_path / "p", cases)
    ranked = rank(project, "entropy", k=2)
    assert [r.cid for r in ranked] == [ids["p"], ids["q"]]
    assert "duplicates not checked" in ranked[0].reason
    with pytest.raises(ProjectError, match="no feature vectors"):
        rank(project, "kcenter", k=2)


def test_kcenter_picks_far_apart_cases_and_avoids_near_duplicates(tmp_path):
    cases = [
        {"name": "annotated", "status": "full", "scores": 0.0, "features": _unit(0)},
        {"name": "dup of annotated", "scores": 0.0, "features": _unit(0, eps=0.02)},
        {"name": "b", "scores": 0.0, "features": _unit(1)},
        {"name": "dup of b", "scores": 0.0, "features": _unit(1, eps=0.02)},
        {"name": "opposite", "scores": 0.0, "features": -_unit(0)},
        {"name": "d", "scores": 0.0, "features": _unit(2)},
    ]
    project, ids = _build(tmp_path / "p", cases)
    ranked = rank(project, "kcenter", k=3)
    assert ranked[0].cid == ids["opposite"]  # farthest from the annotated centre
    assert ranked[0].score == pytest.approx(2.0)
    assert {r.cid for r in ranked} == {ids["opposite"], ids["b"], ids["d"]}
    assert [r.score for r in ranked] == sorted(r.score for r in ranked)[::-1]
    # Without the annotated centre (it becomes a candidate) the most central case comes first.
    wide = rank(project, "kcenter", k=2, include_annotated=True)
    assert "most central" in wide[0].reason


def test_kcenter_centres_are_the_masked_cases_a_session_took_out_of_the_pool(tmp_path):
    """A case given scribbles (taken out of the candidates, as `simulate` does with revealed
    cases) covers its neighbourhood like a full mask; an image label alone does not."""
    from training_backend.active.acquisition import get_strategy

    cases = [
        {"name": "scribbled", "status": "sparse", "scores": 0.0, "features": _unit(0)},
        {"name": "labelled", "status": "image", "scores": 0.0, "features": _unit(1)},
        {"name": "near scribbled", "scores": 0.0, "features": _unit(0, eps=0.05)},
        {"name": "near labelled", "scores": 0.0, "features": _unit(1, eps=0.05)},
    ]
    project, ids = _build(tmp_path / "p", cases)
    pool = [ids["near scribbled"], ids["near labelled"]]
    (first, score), = get_strategy("kcenter")(project, pool, 1)
    # the one near the scribbled case is covered (distance ~0.05); the one near the labelled
    # case is not (distance sqrt(2) to the scribbled centre)
    assert first == ids["near labelled"] and score == pytest.approx(2 ** 0.5, abs=0.06)


def test_features_are_read_once_per_output(tmp_path, monkeypatch):
    cases = [{"name": n, "scores": {"entropy": s}, "features": _unit(i)}
             for i, (n, s) in enumerate((("p", 0.9), ("q", 0.8), ("r", 0.5)))]
    project, ids = _build(tmp_path / "p", cases)
    first = [r.cid for r in rank(project, "kcenter", k=3)]

    def fail(cid):
        raise AssertionError(f"arrays of {cid} read again")

    monkeypatch.setattr(project, "read_outputs", fail)
    monkeypatch.setattr(project, "read_features", fail, raising=False)
    assert [r.cid for r in rank(project, "kcenter", k=3)] == first
    assert len(rank(project, "entropy", k=3)) == 3
    # A new prediction (new output id) is read.
    _write(project, ids["q"], {"entropy": 0.95}, _unit(3))
    with pytest.raises(AssertionError, match="read again"):
        rank(project, "entropy", k=3)


def test_rank_errors(tmp_path):
    project, ids = _build(tmp_path / "p", [{"name": n} for n in "abc"])
    with pytest.raises(ProjectError) as err:
        rank(project, "entropy", k=2)
    assert "no predictions yet: run `lesionseg train` or `lesionseg predict` first" in str(err.value)
    assert "\n" not in str(err.value)
    assert len(rank(project, "random", k=2)) == 2  # random needs no predictions
    _write(project, ids["a"], {"entropy": 0.3}, None)
    with pytest.raises(ProjectError, match="no 'tta_var' score"):
        rank(project, "tta_variance", k=2)
    ranked = rank(project, "entropy", k=3)
    assert ranked[0].cid == ids["a"] and [r.score for r in ranked[1:]] == [None, None]
    with pytest.raises(InputError, match="valid names: random, entropy"):
        get_strategy("entropyy")
    with pytest.raises(InputError, match="unknown option"):
        create_strategy("kcenter", duplicate_threshold=0.9)
    with pytest.raises(InputError, match="cosine similarity"):
        create_strategy("entropy", duplicate_threshold=2.5)
    with pytest.raises(InputError):
        rank(project, "random", k=-1)


def test_random_is_seeded_and_stable_per_case(tmp_path):
    project, ids = _build(tmp_path / "p", [{"name": f"n{i}"} for i in range(10)])
    a = [r.cid for r in rank(project, "random", k=10, seed=1)]
    assert a == [r.cid for r in rank(project, "random", k=10, seed=1)]
    assert a != [r.cid for r in rank(project, "random", k=10, seed=2)]
    # A new case does not reshuffle the others' relative order.
    project.add_case(np.zeros((H, W), np.uint8), "new")
    b = [r.cid for r in rank(project, "random", k=11, seed=1)]
    assert [c for c in b if c in a] == a


def main(argv: list[str]) -> int:
    """The real dispatcher with only this module's verbs (the other verb modules are tested
    elsewhere and may pull in torch)."""
    saved = cli.VERB_MODULES
    cli.VERB_MODULES = ("training_backend.cli.rank",)
    try:
        return cli.main(argv)
    finally:
        cli.VERB_MODULES = saved


def test_cli_rank_json_and_table(contract, capsys):
    project, ids = contract
    assert main(["rank", "--project", str(project.path), "--strategy", "entropy", "-k", "2",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["strategy"] == "entropy"
    assert [r["id"] for r in doc["ranked"]] == [ids["image label"], ids["unlabelled a"]]
    assert [r["rank"] for r in doc["ranked"]] == [1, 2]
    assert doc["ranked"][0]["name"] == "image label" and doc["ranked"][0]["score"] == 0.9

    assert main(["rank", "--project", str(project.path), "--strategy", "entropy", "-k", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["rank", "case", "score"] and len(out) == 7
    assert "sparse (1) é" in "\n".join(out) and out[-1].split()[1:4] == ["no", "prediction", "-"]

    assert main(["rank", "--project", str(project.path), "--strategy", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "nope" in err and "kcenter" in err

    assert main(["strategies"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == list(STRATEGIES)


def test_ranking_does_not_import_torch(contract):
    project, _ = contract
    code = ("import sys\nfrom training_backend import cli\n"
            "cli.VERB_MODULES = ('training_backend.cli.rank',)\n"
            f"assert cli.main(['rank', '--project', {str(project.path)!r}, '--strategy', 'kcenter',"
            " '--json']) == 0\nassert 'torch' not in sys.modules, 'torch imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["strategy"] == "kcenter"


def test_registry_entries_are_well_formed():
    assert set(STRATEGIES) >= {"random", "entropy", "entropy_lesion", "bald", "tta_variance",
                               "cam_disagreement", "burden_disagreement", "disagreement", "kcenter"}
    for name, s in STRATEGIES.items():
        assert s.name == name and s.description and callable(s.fn)
        assert all(n == acquisition.FEATURES or isinstance(n, str) for n in s.needs)
