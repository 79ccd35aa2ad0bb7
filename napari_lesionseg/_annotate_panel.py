"""Annotating one case: a thin panel composing the image-label box (`_label_box`), the mask
editor with autosave and undo (`_mask_editor`) and the model-layer view (`_model_view`).

The panel loads a case in a worker, shows its name and save status, saves image labels, and
runs the actions that join the parts: accept / edit a prediction, confirm lesion-free, predict
the case on screen.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QGridLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from training_backend.errors import InputError
from training_backend.learning.starters import fitting_starters, starter_checkpoint

from napari_lesionseg import _layers
from napari_lesionseg._label_box import ImageLabelBox
from napari_lesionseg._layers import ANNOTATION
from napari_lesionseg._mask_editor import MaskEditor
from napari_lesionseg._model_view import ModelLayerView
from napari_lesionseg._tasks import error_message, run_child, run_task

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from training_backend.project.store import AnnotationVersion, CaseRecord, Outputs, Project

    from napari_lesionseg._state import WorkspaceState


@dataclass
class CaseData:
    """Everything needed to show one case, read by a worker thread."""

    record: CaseRecord
    image: np.ndarray
    limits: Any
    annotation: tuple[np.ndarray, AnnotationVersion] | None
    outputs: Outputs | None


def load_case(project: Project, cid: str) -> CaseData:
    """Read a case's image, latest annotation and latest outputs (runs in a worker).

    Args:
        project: the open project.
        cid: case id.
    """
    record = project.case(cid)
    image = project.read_image(cid)
    return CaseData(record=record, image=image, limits=_layers._contrast_limits(image),
                    annotation=project.read_annotation(cid), outputs=project.read_outputs(cid))


class AnnotatePanel(QWidget):
    """Controls for the current case; owns the annotation and model layers.

    Args:
        viewer: the napari viewer.
        state: the workspace state.
    """

    def __init__(self, viewer: napari.Viewer, state: WorkspaceState, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.state = state
        self.layers = _layers.CaseLayers(viewer)
        self._cid: str | None = None          # case shown and editable (None while loading)
        self._record: CaseRecord | None = None
        self._predicting = False  # a "Predict this case" child process is running
        self._token = 0
        self._shape: tuple[int, ...] | None = None
        self._build()
        state.project_changed.connect(self._on_project)
        state.case_changed.connect(self._on_case_changed)
        state.outputs_changed.connect(self._on_outputs_changed)
        state.save_requested.connect(self.save_now)
        self._on_project(state.project)

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self._header = QLabel("No case open")
        self._header.setWordWrap(True)
        self._header.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self._header)
        # right under the case's name: what happened to the annotation last (saved / not saved)
        self._save_status = QLabel("")
        self._save_status.setStyleSheet("font-size: 11px;")
        lay.addWidget(self._save_status)
        self.labels = ImageLabelBox(on_change=self._save_labels, on_toggle=self._toggle_image_label)
        lay.addWidget(self.labels)
        self.editor = MaskEditor(self.layers, self.state, status=self._save_status.setText,
                                 on_saved=self._on_mask_saved,
                                 on_paint_class=lambda: self.model_view.apply_visibility())
        lay.addWidget(self.editor)
        lay.addLayout(self._build_actions())
        self.model_view = ModelLayerView(self.layers, self.state, self.editor.paint_class)
        lay.addWidget(self.model_view)
        self._set_enabled(False)

    def _build_actions(self) -> QGridLayout:
        actions = QGridLayout()
        self._accept_btn = QPushButton("Accept prediction (A)")
        self._accept_btn.setToolTip("Save the model's prediction as this case's full annotation")
        self._accept_btn.clicked.connect(lambda: self.accept_prediction())
        self._edit_btn = QPushButton("Edit prediction (⇧A)")
        self._edit_btn.setToolTip("Copy the prediction into the annotation layer to correct it")
        self._edit_btn.clicked.connect(lambda: self.edit_prediction())
        self._predict_btn = QPushButton("Predict this case (⇧P)")
        self._predict_btn.setToolTip("Predict the case on screen now with the latest model")
        self._predict_btn.clicked.connect(lambda: self.predict_case())
        self._free_btn = QPushButton("Lesion-free (⇧F)")
        self._free_btn.setToolTip("Confirm that this image has no lesion: saves an empty full mask")
        self._free_btn.clicked.connect(lambda: self.mark_lesion_free())
        self._undo_btn = QPushButton("Undo last save")
        self._undo_btn.setToolTip("Restore the previous saved version (history is kept)")
        self._undo_btn.clicked.connect(lambda: self.undo_save())
        self._save_btn = QPushButton("Save now")
        self._save_btn.clicked.connect(lambda: self.save_now())
        actions.addWidget(self._accept_btn, 0, 0)
        actions.addWidget(self._edit_btn, 0, 1)
        actions.addWidget(self._free_btn, 1, 0)
        actions.addWidget(self._undo_btn, 1, 1)
        actions.addWidget(self._predict_btn, 2, 0)
        actions.addWidget(self._save_btn, 2, 1)
        return actions

    def _set_enabled(self, enabled: bool) -> None:
        for w in (self._accept_btn, self._edit_btn, self._undo_btn, self._free_btn,
                  self._predict_btn, self._save_btn, *self.labels.widgets(),
                  *self.editor.widgets()):
            w.setEnabled(enabled)
        self._predict_btn.setEnabled(enabled and not self._predicting)

    # ------------------------------------------------------------------ project / case
    def _on_project(self, project: Project | None) -> None:
        self._cid = self._record = None
        self._token += 1
        self.labels.rebuild(project)
        self.editor.rebuild(project)
        self.layers.clear()
        self._shape = None
        self._header.setText("Open a case from the list (or press N)" if project else "No project")
        self.model_view.clear()
        self._save_status.setText("")
        self._set_enabled(False)

    def _on_case_changed(self, new: str | None, old: str | None) -> None:
        self.save_now()
        self._cid = None  # nothing editable until the new case is shown
        self.editor.release()
        self._token += 1
        project = self.state.project
        if new is None or project is None:
            return
        token = self._token
        self.layers.freeze_annotation()
        self._set_enabled(False)
        self._header.setText(f"Loading {html.escape(project.case(new).name)} …")
        run_task(load_case, project, new,
                 on_done=lambda data: self._show_case(token, project, data),
                 on_error=lambda exc: self._case_failed(token, project, new, exc))

    def _case_failed(self, token: int, project: Project, cid: str, exc: BaseException) -> None:
        """A case could not be read: say so, in a notification and in the header."""
        message = error_message(exc)
        show_error(message)
        if token != self._token or project is not self.state.project:
            return
        self.layers.clear()
        self._shape = None
        self._header.setText(f"<b>Could not open {html.escape(project.case(cid).name)}</b>: "
                             f"{html.escape(message)}")

    def _show_case(self, token: int, project: Project, data: CaseData) -> None:
        if token != self._token or project is not self.state.project:
            return  # the user moved on while this case was loading
        rec = data.record
        self.layers.show_image(data.image, rec.name, data.limits)
        if data.annotation is not None:
            mask, av = data.annotation
            kind, version = av.kind, av.version
        else:
            mask, kind, version = np.zeros(rec.shape, dtype=np.uint8), None, None
        layer = self.editor.load(rec.id, mask, kind, version)
        self._record = rec
        self.labels.show_record(rec)
        self._cid = rec.id
        self._set_enabled(True)
        self._show_outputs(data.outputs)
        self._update_header()
        self._save_status.setText(
            f"v{version} · {data.annotation[1].author}" if version else "no annotation yet")
        self.viewer.layers.selection.active = layer
        if self._shape != tuple(rec.shape):
            self._shape = tuple(rec.shape)
            self.viewer.reset_view()
        self.editor.select_paint_class(self.editor.paint_class())

    def _update_header(self) -> None:
        rec = self._record
        if rec is None:
            return
        h, w = rec.shape
        kind = "RGB" if rec.channels == 3 else "grey"
        split = " · holdout" if rec.split == "holdout" else ""
        self._header.setText(f"<b>{html.escape(rec.name)}</b> <span style='color:#9aa4b1'>({rec.id} · "
                             f"{w}×{h} {kind}{split}) — {rec.status}</span>")

    def _on_mask_saved(self, cid: str) -> None:
        project = self.state.project
        if project is None:
            return
        self._record = project.case(cid)
        if cid == self.state.case_id:
            self._update_header()

    @property
    def shown_case(self) -> str | None:
        """Id of the case whose layers are shown and editable (None while loading)."""
        return self._cid

    # ------------------------------------------------------------------ image-level labels
    def image_label(self) -> str | None:
        return self.labels.image_label()

    def presence(self) -> dict[str, bool] | None:
        return self.labels.presence()

    def _toggle_image_label(self, name: str) -> None:
        current = self._record.image_label if self._record else None
        self.set_image_label(None if current == name else name)

    def set_image_label(self, name: str | None) -> None:
        """Set (or clear, ``None``) the image-level label of the current case and save it."""
        self.labels.set_image_label(name)

    def set_presence(self, name: str, present: bool | None) -> None:
        """Set one lesion class as present / absent / unknown (None) and save."""
        self.labels.set_presence(name, present)

    def _save_labels(self) -> None:
        project, cid = self.state.project, self._cid
        if project is None or cid is None or self._record is None:
            return
        label, presence = self.labels.image_label(), self.labels.presence()
        if label == self._record.image_label and presence == self._record.presence:
            return
        try:
            self._record = project.set_image_label(cid, label, presence, author=self.state.user)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            show_error(error_message(exc))
            self.labels.show_record(self._record)
            return
        self._update_header()
        self._save_status.setText(f"image label saved · {time.strftime('%H:%M:%S')}")
        self.state.labels_saved(cid)

    # ------------------------------------------------------------------ the mask (MaskEditor)
    def kind(self) -> str:
        return self.editor.kind()

    def set_kind(self, kind: str) -> None:
        """Switch the current mask between ``full`` and ``sparse`` (converting painted data)."""
        self.editor.set_kind(kind)

    def select_paint_class(self, k: int) -> None:
        """Paint lesion class ``k`` (1-based) or background (``0``) in the annotation layer."""
        self.editor.select_paint_class(k)

    def current_mask(self) -> np.ndarray | None:
        """The annotation layer as it would be saved (uint8; in ``full`` masks 255 -> 0)."""
        return self.editor.current_mask()

    def is_dirty(self) -> bool:
        """True if the annotation layer differs from the last loaded/saved version."""
        return self.editor.is_dirty()

    def save_now(self, force: bool = True) -> AnnotationVersion | None:
        """Save the annotation layer as a new version if it changed; returns the new version
        (an explicit save: on top of a version saved elsewhere meanwhile, see
        `MaskEditor.save_now`)."""
        return self.editor.save_now(force=force)

    def undo_save(self) -> None:
        """Undo the last saved version (``Project.revert_annotation``) and show the result."""
        self.editor.undo_save()

    # ------------------------------------------------------------------ predictions
    def _prediction_or_warn(self) -> Outputs | None:
        if self._cid is None:
            return None
        if self.model_view.outputs is None:
            show_info("No prediction for this case yet — train a model first")
            return None
        return self.model_view.outputs

    def accept_prediction(self) -> AnnotationVersion | None:
        """Save the model's prediction as this case's full annotation (an empty prediction
        accepted confirms the image lesion-free: an empty full mask is saved)."""
        outputs = self.edit_prediction()
        if outputs is None:
            return None
        self.editor.confirm_empty = not bool(np.any(outputs.pred))
        return self.save_now()

    def edit_prediction(self) -> Outputs | None:
        """Copy the prediction into the annotation layer (full mask) for correction."""
        outputs = self._prediction_or_warn()
        if outputs is None or self.layers.get(ANNOTATION, Labels) is None:
            return None
        self.editor.replace(outputs.pred, "full", f"prediction:{outputs.output_id}")
        self._save_status.setText("editing the prediction — autosaves")
        self.editor.schedule_save()
        return outputs

    def mark_lesion_free(self) -> AnnotationVersion | None:
        """Save an empty full mask: the clinician confirms the image has no lesion (a full
        annotation that trains the segmenter to leave such images empty)."""
        shape = self.editor.shape()
        if self._cid is None or shape is None or self.layers.get(ANNOTATION, Labels) is None:
            return None
        self.editor.replace(np.zeros(shape, np.uint8), "full", "manual:lesion-free",
                            confirm_empty=True)
        return self.save_now()

    def predict_case(self) -> bool:
        """Predict the case on screen with the project's latest model, in a child process (the
        window never imports torch); its layers refresh when the outputs are written. A project
        without a trained model is predicted by a starter model that fits its lesion classes
        (`training_backend.learning.starters`), when one is installed.

        Returns:
            False when there is no case or no model, or the starter's model file does not
            match its card (the user is told), else True.
        """
        project, cid = self.state.project, self._cid
        if project is None or cid is None or self._predicting:
            return False
        model, with_what = None, "this case"
        if project.latest_model() is None:
            fit, why = fitting_starters(project.classes)
            if not fit:
                show_info(f"No trained model yet — start a training first ({why})")
                return False
            try:  # its model file against its card: a broken install is one clear line
                model = str(starter_checkpoint(fit[0].name))
            except InputError as exc:
                show_error(str(exc))
                return False
            with_what = f"this case with {fit[0].name}"
        self._save_status.setText(f"predicting {with_what} …")
        self._predicting = True
        self._predict_btn.setEnabled(False)

        def done(_out: str) -> None:
            if project is not self.state.project:
                return  # another project was opened meanwhile
            project.refresh()
            if cid == self._cid:
                self._save_status.setText("prediction updated")
            self.state.outputs_changed.emit((cid,))

        def failed(exc: BaseException) -> None:
            if cid == self._cid:
                self._save_status.setText("")
            show_error(f"Could not predict {project.case(cid).name}: {error_message(exc)}")

        def finished() -> None:
            self._predicting = False
            self._predict_btn.setEnabled(self._cid is not None)

        run_task(predict_in_child, str(project.path), cid, model, on_done=done, on_error=failed,
                 on_finish=finished)
        return True

    # ------------------------------------------------------------------ model layers (ModelLayerView)
    def _on_outputs_changed(self, case_ids: tuple) -> None:
        project, cid = self.state.project, self._cid
        if project is None or cid is None or (case_ids and cid not in case_ids):
            return
        token = self._token

        def done(outputs):
            if token == self._token and cid == self._cid:
                self._show_outputs(outputs)

        run_task(project.read_outputs, cid, on_done=done)

    def _show_outputs(self, outputs: Outputs | None) -> None:
        if self.state.project is None:
            return
        self.model_view.show_outputs(outputs, self.editor.colormap)
        self._accept_btn.setEnabled(outputs is not None)
        self._edit_btn.setEnabled(outputs is not None)

    def show_model_layers(self, prediction: bool | None = None, cam: bool | None = None,
                          uncertainty: bool | None = None) -> None:
        """Tick/untick the model layer toggles (None leaves one unchanged)."""
        self.model_view.show_model_layers(prediction, cam, uncertainty)

    def toggle_model_layers(self) -> None:
        """Show/hide all model layers at once (H)."""
        self.model_view.toggle_all()

    @property
    def shown_output_id(self) -> str | None:
        """Id of the model output shown for the current case (None: none shown)."""
        outputs = self.model_view.outputs
        return None if outputs is None else outputs.output_id

    # ------------------------------------------------------------------ keyboard
    def on_key_digit(self, k: int) -> None:
        self.editor.select_paint_class(k)

    def on_key_alt_digit(self, k: int) -> None:
        project = self.state.project
        if project is None or self._cid is None:
            return
        if k == 0:
            self.set_image_label(None)
        elif k <= len(project.image_classes):
            self.set_image_label(project.image_classes[k - 1])


def predict_in_child(project_path: str, case_id: str, model: str | None = None) -> str:
    """``lesionseg predict --cases CASE`` with the latest model (or ``model``), in a short-lived
    child process (runs in a worker thread; the window stays torch-free)."""
    import sys

    import training_backend

    root = str(Path(training_backend.__file__).resolve().parent.parent)
    return run_child([sys.executable, "-m", "training_backend", "predict", "--project",
                      project_path, "--cases", case_id, *(["--model", model] if model else [])],
                     pythonpath=root)
