"""The model-layer view of the annotate panel: which model layers show (prediction, CAM,
uncertainty; H toggles all) and one line about the model's output for the case."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from qtpy.QtWidgets import QCheckBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from napari_lesionseg import _layers
from napari_lesionseg._layers import PREDICTION, UNCERTAINTY

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.store import Outputs, Project

    from napari_lesionseg._state import WorkspaceState


class ModelLayerView(QWidget):
    """Shows a case's model outputs as layers, with their visibility toggles.

    Args:
        layers: the case layers.
        state: the workspace state (the project).
        paint_class: the paint class (1-based; the CAM of that class is the one shown).
    """

    def __init__(self, layers: _layers.CaseLayers, state: WorkspaceState,
                 paint_class: Callable[[], int], parent: QWidget | None = None):
        super().__init__(parent)
        self.layers, self.state, self._paint_class = layers, state, paint_class
        self.outputs: Outputs | None = None
        self._hidden_toggles = [True, False, False]
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        toggles = QHBoxLayout()
        toggles.addWidget(QLabel("Model (H):"))
        self._show_pred = QCheckBox("prediction")
        self._show_pred.setChecked(True)
        self._show_cam = QCheckBox("CAM")
        self._show_unc = QCheckBox("uncertainty")
        for box in (self._show_pred, self._show_cam, self._show_unc):
            box.toggled.connect(self.apply_visibility)
            toggles.addWidget(box)
        toggles.addStretch(1)
        lay.addLayout(toggles)
        self._info = QLabel("")
        self._info.setWordWrap(True)
        self._info.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self._info)

    def clear(self) -> None:
        """No case: no outputs, no line."""
        self.outputs = None
        self._info.setText("")

    def show_outputs(self, outputs: Outputs | None, colormap) -> None:
        """Show a case's latest outputs (None: none) as layers and one line of scores.

        Args:
            outputs: the outputs, or None.
            colormap: the project's label colormap (for the prediction layer).
        """
        self.outputs = outputs
        project = self.state.project
        if project is None:
            return
        self.layers.show_outputs(outputs, project.classes, colormap, self._visibility(project))
        if outputs is None:
            self._info.setText("no model output for this case")
            return
        self._info.setText(describe_outputs(outputs, project.classes))

    def _visibility(self, project: Project) -> dict[str, bool]:
        k = self._paint_class()
        cam_class = project.classes[k - 1] if 1 <= k <= len(project.classes) else project.classes[0]
        vis = {PREDICTION: self._show_pred.isChecked(), UNCERTAINTY: self._show_unc.isChecked()}
        for name in project.classes:
            vis[_layers.cam_layer_name(name)] = self._show_cam.isChecked() and name == cam_class
        return vis

    def apply_visibility(self, *_args) -> None:
        """Show the model layers the toggles (and the paint class, for CAMs) ask for."""
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

    def toggle_all(self) -> None:
        """Show/hide all model layers at once (H); showing restores the last choice."""
        boxes = (self._show_pred, self._show_cam, self._show_unc)
        if any(b.isChecked() for b in boxes):
            self._hidden_toggles = [b.isChecked() for b in boxes]
            for b in boxes:
                b.setChecked(False)
        else:
            for b, on in zip(boxes, self._hidden_toggles):
                b.setChecked(on)


def describe_outputs(outputs: Outputs, classes: list[str]) -> str:
    """``model <id> · presence lesion 0.93 · malignant 0.81`` (what the scores say)."""
    scores = outputs.scores or {}
    presence = scores.get("presence") or []
    parts = [f"{c} {p:.2f}" for c, p in zip(classes, presence) if isinstance(p, (int, float))]
    text = f"model {outputs.model_id}"
    if parts:
        text += " · presence " + ", ".join(parts)
    image_class = scores.get("image_class")
    if isinstance(image_class, dict) and image_class:
        best = max(image_class, key=lambda n: image_class[n] or 0)
        text += f" · {best} {image_class[best]:.2f}"
    return text
