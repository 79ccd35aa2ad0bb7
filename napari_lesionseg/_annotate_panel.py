"""Annotating one case: image-level labels, the mask layer, model layers and autosave.

Saving rules (``save_now``): the annotation layer is saved as a new version of the case through
``Project.save_annotation`` (atomic, versioned) when the case changes, when painting pauses for
``AUTOSAVE_MS``, or on request -- and only if it differs from what was loaded or last saved.
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
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor, QIcon, QPixmap
from qtpy.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from napari_lesionseg import _layers
from napari_lesionseg._layers import ANNOTATION, BACKGROUND_VALUE, PREDICTION, UNCERTAINTY
from napari_lesionseg._tasks import error_message, guarded, run_child, run_task

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from training_backend.store import AnnotationVersion, CaseRecord, Outputs, Project

    from napari_lesionseg._state import WorkspaceState

AUTOSAVE_MS = 1500
SPARSE_HELP = ("<b>sparse</b>: unpainted = unlabelled (ignored in training); "
               "paint <i>background</i> (0 key, value 255) explicitly.")
FULL_HELP = "<b>full</b>: unpainted = background; every lesion pixel must be painted."


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


def _caption(text: str) -> QLabel:
    label = QLabel(text)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setWordWrap(True)
    return label


def swatch(color: str, size: int = 12) -> QIcon:
    pix = QPixmap(size, size)
    pix.fill(QColor(color))
    return QIcon(pix)


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
        self._outputs: Outputs | None = None
        self._baseline: np.ndarray | None = None   # last loaded/saved mask
        self._baseline_kind = "sparse"
        self._baseline_version: int | None = None
        self._pending_source = "manual"
        # an empty full mask to be saved as it is (lesion-free confirmed, not "nothing painted")
        self._confirm_empty = False
        self._predicting = False  # a "Predict this case" child process is running
        self._preferred_kind = "sparse"
        self._token = 0
        self._shape: tuple[int, ...] | None = None
        self._connected: Labels | None = None
        self._colormap = None

        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_MS)
        self._autosave.timeout.connect(guarded(self.save_now))

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

        self._label_title = _caption("Image label <span style='color:#9aa4b1'>(Alt+1…9; "
                                     "Alt+0 clears)</span>")
        lay.addWidget(self._label_title)
        self._label_box = QGridLayout()
        lay.addLayout(self._label_box)
        self._label_buttons: dict[str, QPushButton] = {}

        self._presence_title = _caption("Lesions present <span style='color:#9aa4b1'>(click: "
                                        "unknown → present → absent)</span>")
        lay.addWidget(self._presence_title)
        self._presence_box = QGridLayout()
        lay.addLayout(self._presence_box)
        self._presence: dict[str, QCheckBox] = {}

        mode_row = QHBoxLayout()
        mode_row.addWidget(QLabel("Mask:"))
        self._sparse = QRadioButton("sparse (scribbles)")
        self._full = QRadioButton("full")
        self._sparse.setChecked(True)
        self._mode_group = QButtonGroup(self)
        self._mode_group.addButton(self._sparse)
        self._mode_group.addButton(self._full)
        self._sparse.toggled.connect(self._on_mode_toggled)
        mode_row.addWidget(self._sparse)
        mode_row.addWidget(self._full)
        mode_row.addStretch(1)
        lay.addLayout(mode_row)
        self._mode_help = QLabel(SPARSE_HELP)
        self._mode_help.setWordWrap(True)
        self._mode_help.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self._mode_help)

        lay.addWidget(_caption("Paint class <span style='color:#9aa4b1'>(1…9; 0 = background)"
                               "</span>"))
        self._paint_box = QGridLayout()
        lay.addLayout(self._paint_box)
        self._paint_group = QButtonGroup(self)
        self._paint_group.setExclusive(True)
        self._paint_group.idClicked.connect(self.select_paint_class)

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
        lay.addLayout(actions)

        toggles = QHBoxLayout()
        toggles.addWidget(QLabel("Model (H):"))
        self._show_pred = QCheckBox("prediction")
        self._show_pred.setChecked(True)
        self._show_cam = QCheckBox("CAM")
        self._show_unc = QCheckBox("uncertainty")
        for box in (self._show_pred, self._show_cam, self._show_unc):
            box.toggled.connect(self._apply_visibility)
            toggles.addWidget(box)
        toggles.addStretch(1)
        lay.addLayout(toggles)
        self._model_info = QLabel("")
        self._model_info.setWordWrap(True)
        self._model_info.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self._model_info)
        self._set_enabled(False)

    def _set_enabled(self, enabled: bool) -> None:
        for w in (self._sparse, self._full, self._accept_btn, self._edit_btn, self._undo_btn,
                  self._free_btn, self._predict_btn,
                  self._save_btn, *self._label_buttons.values(), *self._presence.values(),
                  *self._paint_group.buttons()):
            w.setEnabled(enabled)
        self._predict_btn.setEnabled(enabled and not self._predicting)

    @staticmethod
    def _clear_grid(grid: QGridLayout) -> None:
        while grid.count():
            item = grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()

    def _rebuild_class_controls(self, project: Project | None) -> None:
        for grid in (self._label_box, self._presence_box, self._paint_box):
            self._clear_grid(grid)
        for btn in self._paint_group.buttons():
            self._paint_group.removeButton(btn)
        self._label_buttons.clear()
        self._presence.clear()
        if project is None:
            return
        cols = 3
        for i, name in enumerate(project.image_classes):
            btn = QPushButton(f"{i + 1} {name}" if i < 9 else name)
            btn.setCheckable(True)
            btn.setToolTip(f"Image label: {name} (Alt+{i + 1})" if i < 9 else name)
            btn.clicked.connect(lambda _checked=False, n=name: self._toggle_image_label(n))
            self._label_buttons[name] = btn
            self._label_box.addWidget(btn, i // cols, i % cols)
        has_labels = bool(project.image_classes)
        self._label_title.setVisible(has_labels)
        for i, name in enumerate(project.classes):
            box = QCheckBox(name)
            box.setTristate(True)
            box.setCheckState(Qt.CheckState.PartiallyChecked)
            box.setIcon(swatch(_layers.class_color(project, i)))
            box.stateChanged.connect(self._on_presence_changed)
            self._presence[name] = box
            self._presence_box.addWidget(box, i // 4, i % 4)
        for i, name in enumerate(project.classes):
            btn = QPushButton(f"{i + 1} {name}" if i < 9 else name)
            btn.setCheckable(True)
            btn.setIcon(swatch(_layers.class_color(project, i)))
            self._paint_group.addButton(btn, i + 1)
            self._paint_box.addWidget(btn, i // cols, i % cols)
        bg = QPushButton("0 background")
        bg.setCheckable(True)
        bg.setIcon(swatch(_layers.BACKGROUND_COLOR))
        bg.setToolTip("sparse: paints value 255 (background); full: erases to 0")
        self._paint_group.addButton(bg, 0)
        n = len(project.classes)
        self._paint_box.addWidget(bg, n // cols, n % cols)
        self._paint_group.button(1).setChecked(True)

    # ------------------------------------------------------------------ project / case
    def _on_project(self, project: Project | None) -> None:
        self._autosave.stop()
        self._cid = self._record = self._outputs = None
        self._baseline = None
        self._token += 1
        self._rebuild_class_controls(project)
        self.layers.clear()
        self._shape = None
        self._colormap = _layers.label_colormap(project) if project is not None else None
        self._header.setText("Open a case from the list (or press N)" if project else "No project")
        self._model_info.setText("")
        self._save_status.setText("")
        self._set_enabled(False)

    def _on_case_changed(self, new: str | None, old: str | None) -> None:
        self.save_now()
        self._cid = None  # nothing editable until the new case is shown
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
            mask = np.zeros(rec.shape, dtype=np.uint8)
            kind, version = self._preferred_kind, None
        mask = np.asarray(mask, dtype=np.uint8)
        self._baseline, self._baseline_kind, self._baseline_version = mask.copy(), kind, version
        self._pending_source = "manual"
        self._confirm_empty = False
        layer = self.layers.show_annotation(mask.copy(), self._colormap)
        self._connect_layer(layer)
        self._set_kind_widgets(kind)
        self._record, self._outputs = rec, data.outputs
        self._show_labels(rec)
        self._cid = rec.id
        self._set_enabled(True)
        self._show_outputs()
        self._update_header()
        self._save_status.setText(
            f"v{version} · {data.annotation[1].author}" if version else "no annotation yet")
        self.viewer.layers.selection.active = layer
        if self._shape != tuple(rec.shape):
            self._shape = tuple(rec.shape)
            self.viewer.reset_view()
        self.select_paint_class(self._paint_group.checkedId())

    def _update_header(self) -> None:
        rec = self._record
        if rec is None:
            return
        h, w = rec.shape
        kind = "RGB" if rec.channels == 3 else "grey"
        split = " · holdout" if rec.split == "holdout" else ""
        self._header.setText(f"<b>{html.escape(rec.name)}</b> <span style='color:#9aa4b1'>({rec.id} · "
                             f"{w}×{h} {kind}{split}) — {rec.status}</span>")

    def _connect_layer(self, layer: Labels) -> None:
        if self._connected is layer:
            return
        layer.events.paint.connect(self._on_paint)
        layer.events.selected_label.connect(self._on_selected_label)
        for key in range(10):
            layer.bind_key(str(key), _digit_handler(self, key), overwrite=True)
        self._connected = layer

    # ------------------------------------------------------------------ image-level labels
    def _show_labels(self, rec: CaseRecord) -> None:
        for name, btn in self._label_buttons.items():
            btn.setChecked(rec.image_label == name)
        for name, box in self._presence.items():
            value = (rec.presence or {}).get(name)
            state = (Qt.CheckState.PartiallyChecked if value is None else
                     Qt.CheckState.Checked if value else Qt.CheckState.Unchecked)
            box.blockSignals(True)
            box.setCheckState(state)
            box.blockSignals(False)

    def image_label(self) -> str | None:
        for name, btn in self._label_buttons.items():
            if btn.isChecked():
                return name
        return None

    def presence(self) -> dict[str, bool] | None:
        out = {name: box.checkState() == Qt.CheckState.Checked
               for name, box in self._presence.items()
               if box.checkState() != Qt.CheckState.PartiallyChecked}
        return out or None

    def _toggle_image_label(self, name: str) -> None:
        current = self._record.image_label if self._record else None
        self.set_image_label(None if current == name else name)

    def set_image_label(self, name: str | None) -> None:
        """Set (or clear, ``None``) the image-level label of the current case and save it."""
        if name is not None and name not in self._label_buttons:
            return
        for n, btn in self._label_buttons.items():
            btn.setChecked(n == name)
        self._save_labels()

    def set_presence(self, name: str, present: bool | None) -> None:
        """Set one lesion class as present / absent / unknown (None) and save."""
        box = self._presence[name]
        box.setCheckState(Qt.CheckState.PartiallyChecked if present is None else
                          Qt.CheckState.Checked if present else Qt.CheckState.Unchecked)

    def _on_presence_changed(self, *_args) -> None:
        self._save_labels()

    def _save_labels(self) -> None:
        project, cid = self.state.project, self._cid
        if project is None or cid is None or self._record is None:
            return
        label, presence = self.image_label(), self.presence()
        if label == self._record.image_label and presence == self._record.presence:
            return
        try:
            self._record = project.set_image_label(cid, label, presence, author=self.state.user)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            show_error(error_message(exc))
            self._show_labels(self._record)
            return
        self._update_header()
        self._save_status.setText(f"image label saved · {time.strftime('%H:%M:%S')}")
        self.state.labels_saved(cid)

    # ------------------------------------------------------------------ mask mode and class
    def kind(self) -> str:
        return "full" if self._full.isChecked() else "sparse"

    def _set_kind_widgets(self, kind: str) -> None:
        self._sparse.blockSignals(True)
        (self._full if kind == "full" else self._sparse).setChecked(True)
        self._sparse.blockSignals(False)
        self._mode_help.setText(FULL_HELP if kind == "full" else SPARSE_HELP)
        layer = self.layers.get(ANNOTATION, Labels)
        if layer is not None:
            layer.metadata["kind"] = kind

    def set_kind(self, kind: str) -> None:
        """Switch the current mask between ``full`` and ``sparse`` (converting painted data)."""
        (self._full if kind == "full" else self._sparse).setChecked(True)

    def _on_mode_toggled(self, *_args) -> None:
        kind = self.kind()
        self._preferred_kind = kind
        self._set_kind_widgets(kind)
        layer = self.layers.get(ANNOTATION, Labels)
        if layer is None or self._cid is None:
            return
        data = np.asarray(layer.data)
        if data.any():
            converted = data.copy()
            if kind == "full":        # painted background becomes plain background
                converted[converted == BACKGROUND_VALUE] = 0
            else:                     # a full mask labels every pixel: background is explicit
                converted[converted == 0] = BACKGROUND_VALUE
            layer.data = converted
        self.select_paint_class(self._paint_group.checkedId())
        self._schedule_save()

    def select_paint_class(self, k: int) -> None:
        """Paint lesion class ``k`` (1-based) or background (``0``) in the annotation layer."""
        project = self.state.project
        if project is None or k < 0 or k > len(project.classes):
            return
        btn = self._paint_group.button(k)
        if btn is not None and not btn.isChecked():
            btn.setChecked(True)
        layer = self.layers.get(ANNOTATION, Labels)
        if layer is not None:
            value = k if k > 0 else (BACKGROUND_VALUE if self.kind() == "sparse" else 0)
            layer.selected_label = value
            if layer.mode in ("pan_zoom", "transform", "picker"):
                layer.mode = "paint"
        self._apply_visibility()

    def _on_selected_label(self, event=None) -> None:
        layer = self.layers.get(ANNOTATION, Labels)
        project = self.state.project
        if layer is None or project is None:
            return
        value = int(layer.selected_label)
        k = len(project.classes)
        if value == BACKGROUND_VALUE or 0 <= value <= k:
            btn = self._paint_group.button(0 if value in (0, BACKGROUND_VALUE) else value)
            if btn is not None and not btn.isChecked():
                btn.setChecked(True)
            return
        # napari's "new label" (M) / "+" would paint values the project does not know
        layer.selected_label = max(1, min(value, k)) if value < BACKGROUND_VALUE else k

    # ------------------------------------------------------------------ saving
    def _on_paint(self, event=None) -> None:
        if self._cid is not None:
            self._save_status.setText("unsaved changes …")
            self._autosave.start()

    def _schedule_save(self) -> None:
        if self._cid is not None:
            self._autosave.start()

    def current_mask(self) -> np.ndarray | None:
        """The annotation layer as it would be saved (uint8; in ``full`` masks 255 -> 0)."""
        layer = self.layers.get(ANNOTATION, Labels)
        if self._cid is None or layer is None or self._baseline is None:
            return None
        mask = np.asarray(layer.data)
        if mask.shape != self._baseline.shape:
            return None
        mask = mask.astype(np.uint8, copy=True)
        if self.kind() == "full":
            mask[mask == BACKGROUND_VALUE] = 0
        return mask

    def is_dirty(self) -> bool:
        """True if the annotation layer differs from the last loaded/saved version."""
        mask = self.current_mask()
        if mask is None:
            return False
        if self._baseline_version is None and not mask.any() and not self._confirm_empty:
            return False  # nothing painted on a never-annotated case
        return self.kind() != self._baseline_kind or not np.array_equal(mask, self._baseline)

    def save_now(self) -> AnnotationVersion | None:
        """Save the annotation layer as a new version if it changed; returns the new version."""
        self._autosave.stop()
        project, cid = self.state.project, self._cid
        if project is None or not self.is_dirty():
            return None
        kind, mask = self.kind(), self.current_mask()
        try:
            av = project.save_annotation(cid, mask, kind, author=self.state.user,
                                         source=self._pending_source,
                                         parent=self._baseline_version)
        except Exception as exc:  # noqa: BLE001 - shown to the user, the layer keeps the paint
            show_error(error_message(exc))
            self._save_status.setText("NOT saved — see the error message")
            return None
        self._baseline, self._baseline_kind, self._baseline_version = mask, kind, av.version
        self._pending_source = "manual"
        self._confirm_empty = False
        self._record = project.case(cid)
        if cid == self.state.case_id:
            self._update_header()
        self._save_status.setText(f"saved v{av.version} ({kind}) · {time.strftime('%H:%M:%S')}")
        self.state.labels_saved(cid)
        return av

    def undo_save(self) -> None:
        """Undo the last saved version (``Project.revert_annotation``) and show the result."""
        project, cid = self.state.project, self._cid
        if project is None or cid is None:
            return
        self.save_now()
        try:
            av = project.revert_annotation(cid, author=self.state.user)
        except Exception as exc:  # noqa: BLE001 - shown to the user; nothing was changed
            show_error(error_message(exc))
            return
        if av is None:
            show_info("Nothing to undo: this case has no earlier saved version")
            return
        mask, av = project.read_annotation(cid)
        self._baseline, self._baseline_kind, self._baseline_version = mask.copy(), av.kind, av.version
        layer = self.layers.show_annotation(mask.copy(), self._colormap)
        self._connect_layer(layer)
        self._set_kind_widgets(av.kind)
        self._record = project.case(cid)
        self._update_header()
        self._save_status.setText(f"restored v{av.parent} as v{av.version}")
        self.state.labels_saved(cid)

    # ------------------------------------------------------------------ predictions
    def _prediction_or_warn(self):
        if self._cid is None:
            return None
        if self._outputs is None:
            show_info("No prediction for this case yet — train a model first")
            return None
        return self._outputs

    def accept_prediction(self) -> AnnotationVersion | None:
        """Save the model's prediction as this case's full annotation (an empty prediction
        accepted confirms the image lesion-free: an empty full mask is saved)."""
        outputs = self.edit_prediction()
        if outputs is None:
            return None
        self._confirm_empty = not bool(np.any(outputs.pred))
        return self.save_now()

    def predict_case(self) -> bool:
        """Predict the case on screen with the project's latest model, in a child process (the
        window never imports torch); its layers refresh when the outputs are written.

        Returns:
            False when there is no case or no trained model (the user is told), else True.
        """
        project, cid = self.state.project, self._cid
        if project is None or cid is None or self._predicting:
            return False
        if project.latest_model() is None:
            show_info("No trained model yet — start a training first")
            return False
        self._save_status.setText("predicting this case …")
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

        run_task(predict_in_child, str(project.path), cid, on_done=done, on_error=failed,
                 on_finish=finished)
        return True

    def mark_lesion_free(self) -> AnnotationVersion | None:
        """Save an empty full mask: the clinician confirms the image has no lesion (a full
        annotation that trains the segmenter to leave such images empty)."""
        layer = self.layers.get(ANNOTATION, Labels)
        if self._cid is None or layer is None or self._baseline is None:
            return None
        self._set_kind_widgets("full")
        layer.data = np.zeros(self._baseline.shape, np.uint8)
        self._pending_source = "manual:lesion-free"
        self._confirm_empty = True
        return self.save_now()

    def edit_prediction(self) -> Outputs | None:
        """Copy the prediction into the annotation layer (full mask) for correction."""
        outputs = self._prediction_or_warn()
        if outputs is None:
            return None
        layer = self.layers.get(ANNOTATION, Labels)
        if layer is None:
            return None
        self._set_kind_widgets("full")
        layer.data = np.asarray(outputs.pred, dtype=np.uint8).copy()
        self._pending_source = f"prediction:{outputs.output_id}"
        self._save_status.setText("editing the prediction — autosaves")
        self._schedule_save()
        return outputs

    def _on_outputs_changed(self, case_ids: tuple) -> None:
        project, cid = self.state.project, self._cid
        if project is None or cid is None or (case_ids and cid not in case_ids):
            return
        token = self._token

        def done(outputs):
            if token == self._token and cid == self._cid:
                self._outputs = outputs
                self._show_outputs()

        run_task(project.read_outputs, cid, on_done=done)

    def _show_outputs(self) -> None:
        project = self.state.project
        if project is None:
            return
        self.layers.show_outputs(self._outputs, project.classes, self._colormap,
                                 self._visibility(project))
        has = self._outputs is not None
        self._accept_btn.setEnabled(has)
        self._edit_btn.setEnabled(has)
        if not has:
            self._model_info.setText("no model output for this case")
            return
        scores = self._outputs.scores or {}
        presence = scores.get("presence") or []
        parts = [f"{c} {p:.2f}" for c, p in zip(project.classes, presence)
                 if isinstance(p, (int, float))]
        text = f"model {self._outputs.model_id}"
        if parts:
            text += " · presence " + ", ".join(parts)
        image_class = scores.get("image_class")
        if isinstance(image_class, dict) and image_class:
            best = max(image_class, key=lambda n: image_class[n] or 0)
            text += f" · {best} {image_class[best]:.2f}"
        self._model_info.setText(text)

    def _visibility(self, project: Project) -> dict[str, bool]:
        k = self._paint_group.checkedId()
        cam_class = project.classes[k - 1] if 1 <= k <= len(project.classes) else project.classes[0]
        vis = {PREDICTION: self._show_pred.isChecked(), UNCERTAINTY: self._show_unc.isChecked()}
        for name in project.classes:
            vis[_layers.cam_layer_name(name)] = self._show_cam.isChecked() and name == cam_class
        return vis

    def _apply_visibility(self, *_args) -> None:
        project = self.state.project
        if project is None:
            return
        vis = self._visibility(project)
        for layer in self.layers.model_layers():
            layer.visible = vis.get(layer.name, False)

    def show_model_layers(self, prediction: bool | None = None, cam: bool | None = None,
                          uncertainty: bool | None = None) -> None:
        """Tick/untick the model layer toggles (None leaves one unchanged)."""
        for box, on in ((self._show_pred, prediction), (self._show_cam, cam),
                        (self._show_unc, uncertainty)):
            if on is not None:
                box.setChecked(on)

    @property
    def shown_output_id(self) -> str | None:
        """Id of the model output shown for the current case (None: none shown)."""
        return None if self._outputs is None else self._outputs.output_id

    @property
    def shown_case(self) -> str | None:
        """Id of the case whose layers are shown and editable (None while loading)."""
        return self._cid

    def toggle_model_layers(self) -> None:
        """Show/hide all model layers at once (H)."""
        boxes = (self._show_pred, self._show_cam, self._show_unc)
        any_on = any(b.isChecked() for b in boxes)
        if any_on:
            self._hidden_toggles = [b.isChecked() for b in boxes]
            for b in boxes:
                b.setChecked(False)
        else:
            for b, on in zip(boxes, getattr(self, "_hidden_toggles", [True, False, False])):
                b.setChecked(on)

    # ------------------------------------------------------------------ keyboard
    def on_key_digit(self, k: int) -> None:
        self.select_paint_class(k)

    def on_key_alt_digit(self, k: int) -> None:
        project = self.state.project
        if project is None or self._cid is None:
            return
        if k == 0:
            self.set_image_label(None)
        elif k <= len(project.image_classes):
            self.set_image_label(project.image_classes[k - 1])


def predict_in_child(project_path: str, case_id: str) -> str:
    """``lesionseg predict --cases CASE`` with the latest model, in a short-lived child process
    (runs in a worker thread; the window stays torch-free)."""
    import sys

    import training_backend

    root = str(Path(training_backend.__file__).resolve().parent.parent)
    return run_child([sys.executable, "-m", "training_backend", "predict", "--project",
                      project_path, "--cases", case_id], pythonpath=root)


def _digit_handler(panel: AnnotatePanel, k: int):
    def handler(_layer):
        panel.on_key_digit(k)
    handler.__name__ = f"lesionseg_paint_class_{k}"
    handler.__doc__ = f"Paint class {k}" if k else "Paint background"
    return handler
