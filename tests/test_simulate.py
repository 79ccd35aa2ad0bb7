"""Simulated annotation sessions: scribbles, curves, the summary, resume and ``--quick``."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import ndimage

from training_backend.active import curves
from training_backend.active.scribbles import BACKGROUND, brush_radius, synthetic_scribbles


# ----------------------------------------------------------------------------- scribbles
def _reference() -> np.ndarray:
    """Two large lesions (classes 1, 2), a one-pixel-wide lesion (class 1), a tiny one (2)."""
    yy, xx = np.mgrid[:200, :200]
    ref = np.zeros((200, 200), np.uint8)
    ref[(yy - 60) ** 2 + (xx - 60) ** 2 <= 30 ** 2] = 1
    ref[((yy - 140) / 20.0) ** 2 + ((xx - 130) / 50.0) ** 2 <= 1] = 2
    ref[20:90, 170] = 1           # thinner than the brush
    ref[180:182, 20:22] = 2       # 2 × 2 pixels
    return ref


def test_scribbles_stay_inside_their_lesion_and_away_from_it_in_the_background():
    ref = _reference()
    s = synthetic_scribbles(ref, 2, seed=3)
    assert s.dtype == np.uint8 and set(np.unique(s)) <= {0, 1, 2, BACKGROUND}
    for k in (1, 2):  # lesion strokes only on their own class
        assert np.all(ref[s == k] == k)
    lesions, n = ndimage.label(ref > 0, structure=np.ones((3, 3), bool))
    for i in range(1, n + 1):  # every lesion gets a stroke
        assert np.any((s > 0) & (s != BACKGROUND) & (lesions == i)), f"lesion {i} has no stroke"
    # background strokes: on background, and farther than the gap from every lesion
    bg = s == BACKGROUND
    assert bg.sum() > 50
    gap = max(2 * brush_radius(ref.shape) + 2, round(0.04 * 200))
    assert ndimage.distance_transform_edt(ref == 0)[bg].min() > gap - brush_radius(ref.shape) - 1
    assert np.all(ref[bg] == 0)
    # a stroke is a line, not a dot: inside the big disc it spans more than two brush widths
    ys, xs = np.nonzero((s == 1) & (lesions == lesions[60, 60]))
    assert max(np.ptp(ys), np.ptp(xs)) > 4 * brush_radius(ref.shape)
    # sparse: most of each lesion and of the background stays unlabelled
    assert (s == 1).sum() < 0.5 * (ref == 1).sum() and bg.sum() < 0.1 * (ref == 0).sum()


def test_scribbles_never_cross_a_border():
    """Each painted stroke component lies in one reference region of one class."""
    ref = _reference()
    for seed in range(5):
        s = synthetic_scribbles(ref, 2, seed=seed)
        for value in (1, 2, BACKGROUND):
            comps, n = ndimage.label(s == value)
            for i in range(1, n + 1):
                under = np.unique(ref[comps == i])
                assert len(under) == 1 and under[0] == (0 if value == BACKGROUND else value)


def test_scribbles_are_seeded_and_lesion_free_images_get_background_only():
    ref = _reference()
    a, b = synthetic_scribbles(ref, 2, seed=(1, 7)), synthetic_scribbles(ref, 2, seed=(1, 7))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_scribbles(ref, 2, seed=(2, 7)))
    free = synthetic_scribbles(np.zeros((64, 80), np.uint8), 3, seed=0)
    assert set(np.unique(free)) == {0, BACKGROUND}
    with pytest.raises(ValueError, match="above the 1 classes"):
        synthetic_scribbles(ref, 1)


# ----------------------------------------------------------------------------- curves
ROWS = [  # (strategy, seed, annotations, dice)
    *[("random", 0, n, d) for n, d in ((10, 0.4), (20, 0.5), (30, 0.6))],
    *[("random", 1, n, d) for n, d in ((10, 0.2), (20, 0.5), (30, 0.8))],
    *[("bald", s, n, d) for s in (0, 1) for n, d in ((10, 0.3), (20, 0.8), (30, 0.9))],
    *[("entropy", s, n, d) for s in (0, 1) for n, d in ((10, 0.3), (20, 0.4), (30, 0.5))],
    *[("kcenter", s, n, d) for s in (0, 1) for n, d in ((10, 0.75), (20, 0.8), (30, 0.85))],
]


def test_curve_is_the_mean_and_range_over_seeds_by_hand():
    pts = [curves.CurvePoint(n, d, st, seed) for st, seed, n, d in ROWS]
    by = curves.series(pts)
    assert list(by) == ["random", "bald", "entropy", "kcenter"]
    rnd = by["random"]
    assert [s.x for s in rnd] == [10, 20, 30]
    assert [s.mean for s in rnd] == pytest.approx([0.3, 0.5, 0.7])
    assert (rnd[0].low, rnd[0].high, rnd[0].n) == (pytest.approx(0.2), pytest.approx(0.4), 2)
    assert rnd[2].spread == pytest.approx(0.1)
    # the panel's points go through the same function; None/NaN are dropped
    assert curves.aggregate([(3, 0.5), (3, None), (1, float("nan")), (3, 0.7)]) == [
        curves.CurveStat(3.0, pytest.approx(0.6), 0.5, 0.7, 2)]
    models = {"a": {"metrics": {"val_dice": 0.5}, "n_annotations": 4},
              "b": {"metrics": {"val_dice": None}, "n_annotations": 6},
              "c": {"metrics": {"val_dice": 0.7}, "n_train": 8},      # an older record
              "d": {"metrics": {}, "n_annotations": 2}}
    assert sorted(curves.model_points(models)) == [(4, 0.5), (8, 0.7)]
    # estimated annotation time: 10 masks and 100 labels at 240 s and 5 s
    assert curves.annotation_time({"full": 10, "image_label": 100}) == 10 * 240 + 100 * 5
    assert curves.annotation_time({"sparse": 2}, {"sparse": 30}) == 60
    assert curves.annotation_count({"full": 3, "sparse": 2, "image_label": 5}) == 10


def test_fraction_of_randoms_annotations_by_hand():
    pts = [curves.CurvePoint(n, d, st, seed) for st, seed, n, d in ROWS]
    saved = curves.savings(curves.series(pts))
    # random's final Dice 0.7 at 30 cases; bald passes it between (10, 0.3) and (20, 0.8):
    # 10 + (0.7 - 0.3) / (0.8 - 0.3) * 10 = 18 cases = 0.6 of 30
    assert saved["bald"].x == pytest.approx(18.0) and saved["bald"].fraction == pytest.approx(0.6)
    assert saved["bald"].describe() == "0.60× (18.0 of 30)"
    assert saved["random"].fraction == pytest.approx(1.0)
    assert saved["entropy"].x is None and saved["entropy"].fraction is None
    assert saved["entropy"].describe().startswith("not reached")
    # already above the target at its first point: an upper bound
    assert saved["kcenter"].at_first_point and saved["kcenter"].fraction == pytest.approx(1 / 3)
    assert saved["kcenter"].describe().startswith("≤ 0.33×")
    assert curves.savings({"bald": []}) == {}
    # a reference that never segments anything gives nothing to compare with
    flat = curves.savings({"random": curves.aggregate([(2, 0.0), (4, 0.0)]),
                           "bald": curves.aggregate([(2, 0.1), (4, 0.2)])})
    assert flat["bald"].fraction is None and "no comparison" in flat["bald"].describe()


def test_summary_table_says_plainly_which_strategies_do_not_beat_random():
    from training_backend.active.sim_report import csv_text, summarise, summary_markdown

    rows = [{"strategy": st, "seed": seed, "round": n // 10 - 1, "annotations": n, "full": n,
             "sparse": 0, "image_label": 0, "cost_s": n * 240.0, "dice": d,
             "dice_per_class": {"lesion": d}, "failure_detection": (
                 {"entropy": {"spearman": 0.1 * (seed + 1), "auroc": 0.5, "n": 9}}
                 if st == "random" and n == 30 else {})}
            for st, seed, n, d in ROWS]
    summary = summarise(rows)
    assert summary["strategies"]["bald"]["fraction_of_random"] == pytest.approx(0.6)
    assert summary["strategies"]["entropy"]["fraction_of_random"] is None
    assert summary["failure_detection"]["entropy"] == {
        "spearman": pytest.approx(0.15), "auroc": 0.5, "n": 18, "seeds": 2}
    text = summary_markdown(summary, {"config": {"method": "supervised", "budget_s": 60,
                                                 "fine_tune": True}, "kind": "full"})
    assert "| bald | 30 | 0.900 ± 0.000 | 0.60× (18.0 of 30) |" in text
    assert "Not better than random: entropy." in text
    table = list(csv.reader(csv_text(rows[:1], ["lesion"]).splitlines()))
    assert table[0][:9] == ["strategy", "seed", "round", "annotations", "full", "sparse",
                            "image_label", "cost_s", "dice"] and "dice_lesion" in table[0]
    assert table[1][:4] == ["random", "0", "0", "10"] and table[1][table[0].index("presence_auc")] == ""


# ----------------------------------------------------------------------------- the loop
def _config(tmp_path, source, **kw):
    from training_backend.active.simulate import SimulationConfig

    base = dict(out=str(tmp_path / "sim"), project=str(source), strategies=["entropy"],
                start=2, step=2, rounds=3, seeds=1, budget_s=None, steps=3, image_size=32,
                threads=1, settings={"mc_samples": 1, "batch_size": 2})
    return SimulationConfig(**{**base, **kw})


@pytest.fixture
def source(tmp_path):
    from conftest import make_tiny_project

    return make_tiny_project(tmp_path / "src", layout=("none",) * 8, n_holdout=2, size=32).path


def test_a_killed_simulation_continues_without_duplicate_rows(tmp_path, source):
    from training_backend.active.sim_report import load_rows
    from training_backend.active.simulate import RoundDone, SimProgress, run_simulation, simulate

    index_before = (source / "index.json").read_bytes()
    cfg = _config(tmp_path, source)
    events = run_simulation(cfg)
    seen_round1 = False
    for event in events:  # stop in the middle of random's round 2 (after round 1 was saved)
        if isinstance(event, RoundDone) and event.row["strategy"] == "random" and event.row["round"] == 1:
            seen_round1 = True
        elif seen_round1 and isinstance(event, SimProgress):
            break
    events.close()
    first = load_rows(cfg.out)
    assert sorted((r["strategy"], r["round"]) for r in first) == [
        ("entropy", 0), ("peer", 0), ("peer", 1), ("random", 0), ("random", 1)]
    work = tmp_path / "sim" / "work" / "random-seed0"
    assert len(json.loads((work / "index.json").read_text())["cases"]) == 10  # left mid-round

    done = simulate(_config(tmp_path, source))
    rows = load_rows(cfg.out)
    keys = [(r["strategy"], r["seed"], r["round"]) for r in rows]
    assert len(keys) == len(set(keys)) == done.n_rows == 3 * 3  # random, entropy, peer × 3 rounds
    assert rows[:5] == first  # what was saved stays as it was
    by = {(r["strategy"], r["round"]): r for r in rows}
    for st in ("random", "entropy"):
        assert [by[st, i]["annotations"] for i in range(3)] == [2, 4, 6]
        assert by[st, 2]["revealed"] == by[st, 1]["revealed"] + by[st, 1]["next"]
        assert not set(by[st, 1]["picked"]) & set(by[st, 0]["revealed"])
    assert by["entropy", 0]["revealed"] == by["random", 0]["revealed"]  # the shared cold start
    assert by["peer", 2]["revealed"] == by["random", 2]["revealed"]     # the peer sees random's
    assert by["peer", 2]["steps"] == 9  # fine-tuned: 3 steps per round
    assert all(r["n_eval"] == 2 and r["dice"] is not None for r in rows)
    assert (source / "index.json").read_bytes() == index_before  # the user's project untouched
    assert not (tmp_path / "sim" / "work" / "random-seed0").exists()  # cleaned up when done
    assert sorted(p.name for p in (tmp_path / "sim" / "state").iterdir()) == [
        "entropy-seed0-r02.pt", "peer-seed0-r02.pt", "random-seed0-r02.pt", "start-seed0.pt"]


def test_other_settings_need_another_out_and_bad_options_are_one_line(tmp_path, source):
    from training_backend.errors import InputError, LesionsegError
    from training_backend.active.simulate import simulate

    simulate(_config(tmp_path, source, rounds=1, peer=False))
    with pytest.raises(LesionsegError, match="differ in rounds"):
        simulate(_config(tmp_path, source, rounds=2, peer=False))
    with pytest.raises(InputError, match="valid names"):
        _config(tmp_path, source, strategies=["nope"])
    with pytest.raises(InputError, match="cam needs image labels"):
        simulate(_config(tmp_path / "b", source, method="cam"))
    with pytest.raises(LesionsegError, match="needs more"):
        simulate(_config(tmp_path / "c", source, start=5, step=5))


def test_scribble_and_label_sessions_reveal_what_they_say(tmp_path, source):
    from training_backend.active.simulate import simulate
    from training_backend.project.store import Project

    simulate(_config(tmp_path / "s", source, annotate="scribble", rounds=2, peer=False,
                     keep_projects=True, candidates=3))
    project = Project.open(tmp_path / "s" / "sim" / "work" / "entropy-seed0")
    kinds = [r.latest.kind for r in project.cases() if r.latest is not None]
    assert kinds == ["sparse"] * 4
    rows = json.loads((tmp_path / "s" / "sim" / "results.json").read_text())["rows"]
    # round 0 predicts the 2 evaluation cases and 3 of the 6 unrevealed pool cases, the last
    # round the evaluation cases only
    assert [r["n_predicted"] for r in rows if r["strategy"] == "entropy"] == [5, 2]
    done = simulate(_config(tmp_path / "l", source, annotate="label", method="cam", rounds=2,
                            keep_projects=True, costs={"image_label": 2}))
    assert "The peer is not run" in done.summary
    project = Project.open(tmp_path / "l" / "sim" / "work" / "random-seed0")
    assert sum(r.image_label is not None for r in project.cases()) == 4
    rows = json.loads((tmp_path / "l" / "sim" / "results.json").read_text())["rows"]
    assert [r["cost_s"] for r in rows if r["strategy"] == "random"] == [4.0, 8.0]


@pytest.mark.slow
def test_quick_on_the_bundled_sample_writes_every_output(tmp_path, capsys):
    from training_backend.cli import main

    out = tmp_path / "quick"
    assert main(["simulate", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "| random |" in printed.out and "| peer |" in printed.out
    assert "tta_variance seed 1 round 2" in printed.err  # a line per round (no terminal)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # 2 seeds × (random + the default strategy + the peer) × 3 rounds
    assert len(rows) == 18
    assert {r["strategy"] for r in rows} == {"random", "tta_variance", "peer"}
    assert {r["dice_HE"] != "" for r in rows} == {True}
    for name in ("dice_vs_annotations.png", "dice_vs_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["strategies"]) == {"random", "tta_variance", "peer"}
    # a second run finds everything done and only rewrites the report
    assert main(["simulate", "--quick", "--out", str(out)]) == 0
    assert "0 done before" not in capsys.readouterr().err


def test_diverse_cold_start_and_label_everything_mask_a_few(tmp_path, source):
    from training_backend.active.simulate import diverse_cases, simulate

    # three clear groups of cases: one pick from each
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(c, 0.1, (5, 4)) for c in (0.0, 5.0, 10.0)])
    ids = [f"c{i:06d}" for i in range(15)]
    picks = diverse_cases(feats, ids, 3, seed=1)
    assert sorted(int(c[1:]) // 5 for c in picks) == [0, 1, 2]

    simulate(_config(tmp_path, source, start_mode="diversity", label_all=True, rounds=1,
                     peer=False))
    [row_random, row_entropy] = json.loads((tmp_path / "sim" / "results.json").read_text())["rows"]
    assert row_random["revealed"] == row_entropy["revealed"] and len(row_random["revealed"]) == 2
    # 2 masks and an image label on each of the 8 pool cases: 2 × 240 s + 8 × 5 s
    assert (row_random["full"], row_random["image_label"]) == (2, 8)
    assert row_random["cost_s"] == 2 * 240 + 8 * 5


def test_cli_option_errors_are_one_line(tmp_path, capsys):
    from training_backend.cli import main

    assert main(["simulate", "--out", str(tmp_path / "x"), "--quick", "--cost", "mask=soon"]) == 2
    assert main(["simulate", "--out", str(tmp_path / "x")]) == 2
    assert main(["simulate", "--out", str(tmp_path / "x"), "--quick", "--set", "seed=3"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("lesionseg simulate: error: ") for line in err)
    assert "--cost" in err[0] and "--project" in err[1] and "seed" in err[2]
