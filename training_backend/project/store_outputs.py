"""Model outputs and model records of a project (written by inference in the trainer process).

Per case, the latest outputs (``pred``, ``prob``, ``cam``, ``uncertainty`` arrays at the image's
size, optional ``features``) live under ``store.zarr/outputs/<cid>/<output_id>/`` and are listed
in ``outputs.json`` with their scores; the `KEEP_OUTPUTS` newest are kept. ``outputs.json`` also
holds the trained models (method, checkpoint, metrics). `training_backend.project.store.Project`
delegates its output and model methods here.
"""
from __future__ import annotations

import shutil
import time
import uuid
from typing import Callable

import numpy as np

from training_backend.project.records import KEEP_OUTPUTS, CaseRecord, OutputRecord, Outputs, jsonable, now_iso
from training_backend.project.store_index import ProjectFiles, write_array


class OutputStore:
    """Model outputs and model records of one project.

    Args:
        files: the project's files (indexes, lock, arrays).
        case: looks up a case record by id (raises for an unknown id).
        n_classes: number of lesion classes K.
    """

    def __init__(self, files: ProjectFiles, case: Callable[[str], CaseRecord], n_classes: int):
        self._files = files
        self._case = case
        self._k = n_classes

    def write(self, cid: str, model_id: str, pred: np.ndarray, prob: np.ndarray,
              cam: np.ndarray, uncertainty: np.ndarray, scores: dict,
              features: np.ndarray | None = None) -> str:
        """Store model outputs for a case; see `training_backend.project.store.Project.write_outputs`."""
        h, w = self._case(cid).shape
        k = self._k
        shapes = {"pred": (pred, (h, w)), "prob": (prob, (k + 1, h, w)), "cam": (cam, (k, h, w)),
                  "uncertainty": (uncertainty, (h, w))}
        for name, (arr, shape) in shapes.items():
            if tuple(np.shape(arr)) != shape:
                raise ValueError(f"outputs for {cid}: {name} has shape {np.shape(arr)}, expected {shape}")
        files = self._files
        files.require_writable()
        output_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        tmp = files.tmp_folder()
        tmp.mkdir()
        write_array(tmp / "pred", np.asarray(pred, dtype=np.uint8))
        write_array(tmp / "prob", np.asarray(prob, dtype=np.float16))
        write_array(tmp / "cam", np.clip(np.asarray(cam, dtype=np.float32), 0, 1).astype(np.float16))
        write_array(tmp / "uncertainty", np.asarray(uncertainty, dtype=np.float16))
        if features is not None:
            write_array(tmp / "features", np.asarray(features, dtype=np.float32).ravel())
        key = f"outputs/{cid}/{output_id}"
        removed: list[str] = []
        with files.mutate_outputs() as outputs:
            files.place(tmp, key)
            prev = outputs["cases"].get(cid)
            history = ([prev["key"]] + list(prev.get("older", []))) if prev else []
            outputs["cases"][cid] = {
                "case_id": cid, "output_id": output_id, "model_id": model_id, "time": now_iso(),
                "key": key, "scores": jsonable(scores), "has_features": features is not None,
                "older": history[:KEEP_OUTPUTS - 1],
            }
            removed = history[KEEP_OUTPUTS - 1:]
        for old in removed:
            shutil.rmtree(files.zarr_path / old, ignore_errors=True)
        return output_id

    def record(self, cid: str) -> OutputRecord | None:
        """Scores and metadata of the latest outputs of a case (no arrays), or None."""
        d = self._files.outputs["cases"].get(cid)
        return None if d is None else OutputRecord.from_dict(cid, d)

    def read(self, cid: str) -> Outputs | None:
        """The latest outputs of a case with their arrays, or None."""
        rec = self.record(cid)
        if rec is None:
            return None

        def load(name: str) -> np.ndarray:
            return self._files.open_array(f"{rec.key}/{name}")[...]

        return Outputs(case_id=cid, output_id=rec.output_id, model_id=rec.model_id, time=rec.time,
                       pred=load("pred"), prob=load("prob"), cam=load("cam"),
                       uncertainty=load("uncertainty"), scores=rec.scores,
                       features=load("features") if rec.has_features else None)

    def features(self, cid: str) -> np.ndarray | None:
        """Only the pooled feature vector of the latest outputs (cheap; for diversity sampling)."""
        rec = self.record(cid)
        if rec is None or not rec.has_features:
            return None
        return self._files.open_array(f"{rec.key}/features")[...]

    def register_model(self, model_id: str, info: dict) -> None:
        """Record a trained model (method, checkpoint path, metrics, ...)."""
        with self._files.mutate_outputs() as outputs:
            entry = outputs["models"].setdefault(model_id, {"created": now_iso()})
            entry.update(jsonable(info))
            entry["updated"] = now_iso()

    def models(self) -> dict[str, dict]:
        """Every recorded model: ``{model_id: info}``."""
        return {k: dict(v) for k, v in self._files.outputs["models"].items()}

    def latest_model(self) -> tuple[str, dict] | None:
        """The most recently updated model ``(model_id, info)``, or None."""
        models = self._files.outputs["models"]
        if not models:
            return None
        mid = max(models, key=lambda m: models[m].get("updated", ""))
        return mid, dict(models[mid])
