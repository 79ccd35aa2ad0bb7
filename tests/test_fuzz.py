"""CI-sized fuzzing (hypothesis, derandomized): bad inputs through import, the napari reader,
the store API and every CLI verb end in a clear one-line error or a clean skip, never a
traceback, and a rejected input never changes the project. The full run (1,500 inputs) is
``benchmarks/fuzz_inputs.py``; its figures are in the README.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import fuzz_inputs  # noqa: E402


@pytest.mark.parametrize("target", fuzz_inputs.TARGETS)
def test_generated_bad_inputs_fail_cleanly(target, tmp_path):
    tally = fuzz_inputs.run(examples=40, targets=(target,), derandomize=True, root=tmp_path)
    assert tally.total() >= 30  # hypothesis ran (a small strategy space may repeat less)
    assert tally.total("failure") == 0, "\n".join(tally.failures[:10])
    assert tally.total("rejected") > 0  # bad inputs were generated and turned down


def test_fingerprint_sees_a_changed_project(tmp_path):
    """The before/after comparison can fail: it notices a saved annotation."""
    import numpy as np

    from training_backend.project.store import Project

    p = Project.create(tmp_path / "p", ["lesion"])
    cid = p.add_case(np.zeros((8, 8), np.uint8), "a")
    before = fuzz_inputs.fingerprint(p.path)
    p.save_annotation(cid, np.ones((8, 8), np.uint8), "full")
    assert fuzz_inputs.fingerprint(p.path) != before
