"""The napari layers of the case being annotated: image, annotation and model outputs.

Layers keep stable names (see the constants) so that a user's per-layer settings (opacity,
contrast, blending) survive a case switch: data is swapped into existing layers where possible.
Their stacking order, bottom to top, is image, CAMs, uncertainty, prediction, annotation.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from napari.layers import Image, Labels
from napari.utils.colormaps import DirectLabelColormap

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from training_backend.project.store import Outputs, Project

IMAGE = "image"
ANNOTATION = "annotation"
PREDICTION = "prediction"
UNCERTAINTY = "uncertainty"
CAM_PREFIX = "CAM "
#: Colour of explicitly painted background (value 255) in sparse annotations.
BACKGROUND_COLOR = "#8fd3ff"
BACKGROUND_VALUE = 255


def cam_layer_name(class_name: str) -> str:
    return f"{CAM_PREFIX}{class_name}"


def class_color(project: Project, index: int) -> str:
    """Colour ``#rrggbb`` of lesion class ``index`` (0-based)."""
    from training_backend.project.store import DEFAULT_COLORS

    name = project.classes[index]
    return project.colors.get(name, DEFAULT_COLORS[index % len(DEFAULT_COLORS)])


def label_colormap(project: Project) -> DirectLabelColormap:
    """Class k -> the project's colour of class k; 255 (painted background) -> light blue;
    0 and anything else transparent."""
    colors: dict[int | None, str] = {None: "transparent", 0: "transparent",
                                     BACKGROUND_VALUE: BACKGROUND_COLOR}
    for i in range(len(project.classes)):
        colors[i + 1] = class_color(project, i)
    return DirectLabelColormap(color_dict=colors)


def _rank(name: str) -> int:
    if name == IMAGE:
        return 0
    if name.startswith(CAM_PREFIX):
        return 1
    return {UNCERTAINTY: 2, PREDICTION: 3, ANNOTATION: 4}.get(name, -1)


class CaseLayers:
    """Creates, updates and removes the workspace's layers in a viewer.

    Args:
        viewer: the napari viewer.
    """

    def __init__(self, viewer: napari.Viewer):
        self.viewer = viewer

    # ---- lookup / insertion
    def get(self, name: str, kind: type | None = None):
        """The layer called ``name`` (of type ``kind``) or None."""
        if name in self.viewer.layers:
            layer = self.viewer.layers[name]
            if kind is None or isinstance(layer, kind):
                return layer
        return None

    def _insert(self, layer) -> None:
        """Insert ``layer`` above every managed layer that belongs below it."""
        rank = _rank(layer.name)
        layers = self.viewer.layers
        below = [i for i, lyr in enumerate(layers) if 0 <= _rank(lyr.name) <= rank]
        above = [i for i, lyr in enumerate(layers) if _rank(lyr.name) > rank]
        if below:
            layers.insert(max(below) + 1, layer)
        elif above:
            layers.insert(min(above), layer)
        else:
            layers.append(layer)

    def _remove(self, name: str) -> None:
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)

    # ---- image
    def show_image(self, image: np.ndarray, case_name: str,
                   limits: tuple[tuple[float, float], tuple[float, float]] | None = None) -> Image:
        """Show a case's image ((H, W) grey or (H, W, 3) RGB).

        Args:
            image: the image.
            case_name: shown in the layer's metadata.
            limits: (display limits, slider range) as computed by ``_contrast_limits`` (in a
                worker, for big images); computed here when not given.
        """
        rgb = image.ndim == 3 and image.shape[-1] in (3, 4)
        layer = self.get(IMAGE, Image)
        if layer is not None and (layer.rgb != rgb or layer.data.ndim != image.ndim):
            self._remove(IMAGE)
            layer = None
        limits, full_range = limits if limits is not None else _contrast_limits(image)
        if layer is None:
            layer = Image(image, name=IMAGE, rgb=rgb, contrast_limits=limits)
            self._insert(layer)
        else:
            layer.data = image
        layer.contrast_limits_range = full_range
        layer.contrast_limits = limits
        layer.metadata["case_name"] = case_name
        return layer

    # ---- annotation
    def show_annotation(self, mask: np.ndarray, colormap: DirectLabelColormap) -> Labels:
        """Show ``mask`` (uint8, H x W) in the editable ``annotation`` layer (undo history reset)."""
        layer = self.get(ANNOTATION, Labels)
        if layer is None:
            layer = Labels(mask, name=ANNOTATION, colormap=colormap, opacity=0.6)
            self._insert(layer)
        else:
            layer.data = mask  # napari clears the undo history with new data: strokes of
            layer.colormap = colormap  # the previous case can't be undone onto this one
            layer.editable = True  # (napari's data setter may have done so already)
            if "frozen_mode" in layer.metadata:  # frozen while this case loaded: the user's
                layer.mode = layer.metadata.pop("frozen_mode")  # tool comes back
        return layer

    def freeze_annotation(self) -> None:
        """Make the annotation layer read-only (while another case loads: strokes there could
        not be saved to any case). napari switches a read-only layer to pan/zoom; the tool in
        use (brush, fill, eraser) is restored by the next `show_annotation`."""
        layer = self.get(ANNOTATION, Labels)
        if layer is not None and layer.editable:
            layer.metadata["frozen_mode"] = str(layer.mode)
            layer.editable = False

    # ---- model outputs
    def show_outputs(self, outputs: Outputs | None, classes: Sequence[str],
                     colormap: DirectLabelColormap, visible: dict[str, bool]) -> None:
        """Show prediction, CAMs and uncertainty of ``outputs``; remove them when None.

        Args:
            outputs: the case's latest model outputs, or None.
            classes: lesion class names (CAM channel k belongs to class k).
            colormap: label colormap for the prediction layer.
            visible: ``{"prediction": bool, "uncertainty": bool}`` plus
                ``{cam_layer_name(c): bool}`` per class.
        """
        if outputs is None:
            self.remove_outputs()
            return
        with self.keep_selection():
            self._show_outputs(outputs, classes, colormap, visible)

    @contextlib.contextmanager
    def keep_selection(self) -> Iterator[None]:
        """Adding a layer selects it; keep the user's selection (keyboard shortcuts act on
        the selected layer)."""
        selection = self.viewer.layers.selection
        before, active = set(selection), selection.active
        try:
            yield
        finally:
            kept = [lyr for lyr in before if lyr in self.viewer.layers]
            if kept:
                selection.clear()
                selection.update(kept)
                if active in kept:
                    selection.active = active

    def _show_outputs(self, outputs: Outputs, classes: Sequence[str],
                      colormap: DirectLabelColormap, visible: dict[str, bool]) -> None:
        pred = self.get(PREDICTION, Labels)
        if pred is None:  # outlines: the annotation below stays visible
            pred = Labels(outputs.pred, name=PREDICTION, colormap=colormap, opacity=0.9)
            pred.contour = 1
            self._insert(pred)
        else:
            pred.data = outputs.pred
            pred.colormap = colormap
        pred.editable = False
        pred.visible = visible.get(PREDICTION, True)
        pred.metadata.update(output_id=outputs.output_id, model_id=outputs.model_id)
        for k, cls in enumerate(classes):
            if k >= outputs.cam.shape[0]:
                break
            self._show_map(cam_layer_name(cls), outputs.cam[k], "inferno", (0.0, 1.0),
                           visible.get(cam_layer_name(cls), False))
        for name in self.cam_names():
            if name[len(CAM_PREFIX):] not in classes[: outputs.cam.shape[0]]:
                self._remove(name)
        unc = np.asarray(outputs.uncertainty, dtype=np.float32)
        top = float(np.nanmax(unc)) if unc.size else 0.0
        self._show_map(UNCERTAINTY, unc, "magma", (0.0, max(top, 1e-6)),
                       visible.get(UNCERTAINTY, False))

    def _show_map(self, name: str, data: np.ndarray, colormap: str,
                  limits: tuple[float, float], visible: bool) -> Image:
        data = np.asarray(data, dtype=np.float32)  # float16 textures are not portable
        layer = self.get(name, Image)
        if layer is None:
            layer = Image(data, name=name, colormap=colormap, opacity=0.5, blending="additive",
                          contrast_limits=limits, visible=visible)
            self._insert(layer)
        else:
            layer.data = data
            layer.contrast_limits_range = limits
            layer.contrast_limits = limits
            layer.visible = visible
        return layer

    def cam_names(self) -> list[str]:
        return [lyr.name for lyr in self.viewer.layers if lyr.name.startswith(CAM_PREFIX)]

    def model_layers(self) -> list:
        names = {PREDICTION, UNCERTAINTY, *self.cam_names()}
        return [lyr for lyr in self.viewer.layers if lyr.name in names]

    def remove_outputs(self) -> None:
        for name in [PREDICTION, UNCERTAINTY, *self.cam_names()]:
            self._remove(name)

    def clear(self) -> None:
        """Remove every workspace layer (project closed)."""
        self.remove_outputs()
        self._remove(ANNOTATION)
        self._remove(IMAGE)


def _contrast_limits(image: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """(display limits, slider range): uint8 shows its full range; other types the 0.5-99.5
    percentiles (a few hot pixels must not make a 16-bit image look black)."""
    if image.dtype == np.uint8:
        return (0.0, 255.0), (0.0, 255.0)
    values = np.asarray(image, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0), (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    vmin, vmax = float(values.min()), float(values.max())
    if vmax <= vmin:
        vmax = vmin + 1.0
    if hi <= lo:
        lo, hi = vmin, vmax
    return (lo, hi), (vmin, vmax)
