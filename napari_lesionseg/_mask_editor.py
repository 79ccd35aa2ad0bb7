"""The mask editor of the annotate panel: the annotation layer, its kind, the paint class,
autosave and undo.

Saving rules (`MaskEditor.save_now`): the annotation layer is saved as a new version of the case
through ``Project.save_annotation`` (atomic, versioned) when the case changes, when painting
pauses for ``AUTOSAVE_MS``, or on request -- and only if it differs from what was loaded or last
saved. Undo re-saves the previous version (``Project.revert_annotation``), so history is kept.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import numpy as np
from napari.layers import Labels
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QButtonGroup,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QRadioButton,
    QVBoxLayout,
    QWidget,
)

from napari_lesionseg import _layers
from napari_lesionseg._label_box import caption, clear_grid, swatch
from napari_lesionseg._layers import ANNOTATION, BACKGROUND_VALUE
from napari_lesionseg._tasks import error_message, guarded

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.store import AnnotationVersion, Project

    from napari_lesionseg._state import WorkspaceState

AUTOSAVE_MS = 1500
SPARSE_HELP = ("<b>sparse</b>: unpainted = unlabelled (ignored in training); "
               "paint <i>background</i> (0 key, value 255) explicitly.")
FULL_HELP = "<b>full</b>: unpainted = background; every lesion pixel must be painted."


class MaskEditor(QWidget):
    """Mask kind (sparse / full), paint class, and the saving of the annotation layer.

    Args:
        layers: the case layers (owns the annotation Labels layer).
        state: the workspace state (project, user, ``labels_saved``).
        status: shows one line of save status under the case's name.
        on_saved: called with the case id after a version was saved or restored.
        on_paint_class: called after the paint class changed (the CAM shown follows it).
    """

    def __init__(self, layers: _layers.CaseLayers, state: WorkspaceState,
                 status: Callable[[str], None], on_saved: Callable[[str], None],
                 on_paint_class: Callable[[], None], parent: QWidget | None = None):
        super().__init__(parent)
        self.layers, self.state = layers, state
        self._status, self._on_saved, self._on_paint_class = status, on_saved, on_paint_class
        self.cid: str | None = None               # case being edited (None: nothing editable)
        self._baseline: np.ndarray | None = None   # last loaded/saved mask
        self._baseline_kind = "sparse"
        self._baseline_version: int | None = None
        self.pending_source = "manual"
        # an empty full mask to be saved as it is (lesion-free confirmed, not "nothing painted")
        self.confirm_empty = False
        self._preferred_kind = "sparse"
        self._connected: Labels | None = None
        self._warned: tuple | None = None          # the last refused autosave's problem
        self.colormap = None
        self._autosave = QTimer(self)
        self._autosave.setSingleShot(True)
        self._autosave.setInterval(AUTOSAVE_MS)
        self._autosave.timeout.connect(guarded(self.save_now))
        self._build()

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
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
        lay.addWidget(caption("Paint class <span style='color:#9aa4b1'>(1…9; 0 = background)"
                              "</span>"))
        self._paint_box = QGridLayout()
        lay.addLayout(self._paint_box)
        self._paint_group = QButtonGroup(self)
        self._paint_group.setExclusive(True)
        self._paint_group.idClicked.connect(self.select_paint_class)

    def widgets(self) -> list[QWidget]:
        """The controls enabled only while a case is shown."""
        return [self._sparse, self._full, *self._paint_group.buttons()]

    def rebuild(self, project: Project | None) -> None:
        """Forget the case; one paint button per lesion class of ``project`` plus background."""
        self._autosave.stop()
        self.cid = None
        self._baseline = None
        clear_grid(self._paint_box)
        for btn in self._paint_group.buttons():
            self._paint_group.removeButton(btn)
        self.colormap = _layers.label_colormap(project) if project is not None else None
        if project is None:
            return
        cols = 3
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

    # ------------------------------------------------------------------ the case's mask
    def load(self, cid: str, mask: np.ndarray, kind: str | None, version: int | None) -> Labels:
        """Show a case's saved mask (kind None: nothing saved yet) as the editable layer."""
        kind = kind or self._preferred_kind
        mask = np.asarray(mask, dtype=np.uint8)
        self._baseline, self._baseline_kind, self._baseline_version = mask.copy(), kind, version
        self.pending_source = "manual"
        self.confirm_empty = False
        self._warned = None
        layer = self.layers.show_annotation(mask.copy(), self.colormap)
        self._connect_layer(layer)
        self._set_kind_widgets(kind)
        self.cid = cid
        return layer

    def release(self) -> None:
        """Nothing is editable until the next `load` (a case is loading, or failed)."""
        self.cid = None

    def paint_class(self) -> int:
        """The paint class (1-based lesion class, 0 = background)."""
        return self._paint_group.checkedId()

    def _connect_layer(self, layer: Labels) -> None:
        if self._connected is layer:
            return
        layer.events.paint.connect(self._on_paint)
        layer.events.selected_label.connect(self._on_selected_label)
        for key in range(10):
            layer.bind_key(str(key), _digit_handler(self, key), overwrite=True)
        self._connected = layer

    # ------------------------------------------------------------------ kind and paint class
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
        if layer is None or self.cid is None:
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
        self.schedule_save()

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
        self._on_paint_class()

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

    # ------------------------------------------------------------------ replacing the mask
    def replace(self, mask: np.ndarray, kind: str, source: str, confirm_empty: bool = False) -> None:
        """Put ``mask`` in the annotation layer as ``kind`` (a prediction to edit, an empty
        lesion-free mask); it is saved with ``source`` as its origin."""
        layer = self.layers.get(ANNOTATION, Labels)
        if layer is None:
            return
        self._set_kind_widgets(kind)
        layer.data = np.asarray(mask, dtype=np.uint8).copy()
        self.pending_source = source
        self.confirm_empty = confirm_empty

    # ------------------------------------------------------------------ saving
    def _on_paint(self, event=None) -> None:
        if self.cid is not None:
            self._status("unsaved changes …")
            self._autosave.start()

    def schedule_save(self) -> None:
        """Save after the autosave pause (restarted by every change)."""
        if self.cid is not None:
            self._autosave.start()

    def stop(self) -> None:
        """Cancel a pending autosave."""
        self._autosave.stop()

    def current_mask(self) -> np.ndarray | None:
        """The annotation layer as it would be saved (uint8; in ``full`` masks 255 -> 0)."""
        layer = self.layers.get(ANNOTATION, Labels)
        if self.cid is None or layer is None or self._baseline is None:
            return None
        mask = np.asarray(layer.data)
        if mask.shape != self._baseline.shape:
            return None
        mask = mask.astype(np.uint8, copy=True)
        if self.kind() == "full":
            mask[mask == BACKGROUND_VALUE] = 0
        return mask

    def shape(self) -> tuple[int, ...] | None:
        """Shape of the mask being edited (None: no case)."""
        return None if self._baseline is None or self.cid is None else self._baseline.shape

    def is_dirty(self) -> bool:
        """True if the annotation layer differs from the last loaded/saved version."""
        mask = self.current_mask()
        if mask is None:
            return False
        if self._baseline_version is None and not mask.any() and not self.confirm_empty:
            return False  # nothing painted on a never-annotated case
        return self.kind() != self._baseline_kind or not np.array_equal(mask, self._baseline)

    def save_now(self, force: bool = False) -> AnnotationVersion | None:
        """Save the annotation layer as a new version if it changed; returns the new version.

        When another window or process saved this case since it was shown, an autosave
        (``force=False``) saves nothing and says so (the paint stays on screen); an explicit
        save (``force=True``: Save now, switching case, closing) saves it on top as a new
        version and says that the other one stays in the history.

        Args:
            force: save on top of a newer version saved elsewhere.
        """
        from training_backend.errors import ConflictError

        self._autosave.stop()
        project, cid = self.state.project, self.cid
        if project is None or not self.is_dirty():
            return None
        kind, mask = self.kind(), self.current_mask()
        try:
            try:
                av = project.save_annotation(cid, mask, kind, author=self.state.user,
                                             source=self.pending_source,
                                             parent=self._baseline_version, check_latest=True)
            except ConflictError as exc:
                if not force:
                    self._warn_once(("conflict", cid), show_warning,
                                    f"{exc}: press Save now to save your edit on top (the other "
                                    f"version stays in the history)")
                    self._status("NOT saved — a newer version was saved elsewhere")
                    return None
                av = project.save_annotation(cid, mask, kind, author=self.state.user,
                                             source=self.pending_source,
                                             parent=self._baseline_version)
                show_warning(f"{exc.args[0].split(';')[0]}; your edit is saved on top as "
                             f"v{av.version}, the other version stays in the history")
        except Exception as exc:  # noqa: BLE001 - shown to the user, the layer keeps the paint
            message = error_message(exc)
            if force:
                show_error(message)
            else:  # every paint pause autosaves: one message per case and problem, not one each
                self._warn_once(("error", cid, message), show_error, message)
            self._status("NOT saved — see the error message")
            return None
        self._warned = None
        self._baseline, self._baseline_kind, self._baseline_version = mask, kind, av.version
        self.pending_source = "manual"
        self.confirm_empty = False
        self._on_saved(cid)
        self._status(f"saved v{av.version} ({kind}) · {time.strftime('%H:%M:%S')}")
        self.state.labels_saved(cid)
        return av

    def _warn_once(self, key: tuple, show, message: str) -> None:
        """Show ``message`` unless the last refused autosave of this case had the same ``key``
        (the status line keeps saying that the paint is not saved)."""
        if key != self._warned:
            show(message)
        self._warned = key

    def undo_save(self) -> None:
        """Undo the last saved version (``Project.revert_annotation``) and show the result."""
        project, cid = self.state.project, self.cid
        if project is None or cid is None:
            return
        # the paint on screen is saved on top first (a refused or failed save stops the undo:
        # reverting then would throw the paint away, or revert somebody else's newer version)
        if self.is_dirty() and self.save_now(force=True) is None:
            return
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
        layer = self.layers.show_annotation(mask.copy(), self.colormap)
        self._connect_layer(layer)
        self._set_kind_widgets(av.kind)
        self._on_saved(cid)
        self._status(f"restored v{av.parent} as v{av.version}")
        self.state.labels_saved(cid)


def _digit_handler(editor: MaskEditor, k: int):
    def handler(_layer):
        editor.select_paint_class(k)
    handler.__name__ = f"lesionseg_paint_class_{k}"
    handler.__doc__ = f"Paint class {k}" if k else "Paint background"
    return handler
