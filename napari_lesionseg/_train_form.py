"""The training settings form: magicgui widgets built from `TrainConfig`'s fields.

Defaults come from `TrainConfig` (one field = one widget, its default the field's default) and
each widget's help from the ``Args:`` section of `TrainConfig`'s docstring; the method options
form is built from ``METHOD_CATALOG[method].all_options()`` (`Option(default, help)`), one
widget per option, and rebuilt when the method changes. Only what a form needs besides the
config lives here: ranges, units and labels. Torch-free, like the whole window.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, fields
from typing import Any

import docstring_parser
from magicgui.widgets import CheckBox, ComboBox, Container, FloatSpinBox, LineEdit, SpinBox

from training_backend.config import DEVICES, METHOD_CATALOG, WINDOW_BUDGET_S, Option, TrainConfig

#: The fields always on view, in order.
MAIN_FIELDS = ("method", "device", "budget_s", "steps", "image_size")
#: The fields under "More settings" (with the method options).
MORE_FIELDS = ("batch_size", "crop_size", "lr", "seed", "pretrained")
#: The choices of the "pretrained" field in the form (a path is for the command line).
PRETRAINED_CHOICES = ("auto", "none")
#: Labels where the field name is not one.
LABELS = {"budget_s": "budget (s)", "image_size": "image size (px)", "batch_size": "batch size",
          "crop_size": "crop (px)",
          "lr": "learning rate"}
#: Form-only settings of a field's widget (ranges, steps); 0 stands for ``None`` in the fields
#: whose default is ``None`` (``steps``: budget only; ``budget_s``: steps only).
WIDGET_OPTIONS: dict[str, dict[str, Any]] = {
    "budget_s": {"widget_type": "FloatSpinBox", "min": 0, "max": 7 * 24 * 3600, "step": 30},
    "steps": {"widget_type": "SpinBox", "min": 0, "max": 10_000_000},
    "image_size": {"widget_type": "SpinBox", "min": 16, "max": 2048, "step": 32},
    "batch_size": {"widget_type": "SpinBox", "min": 1, "max": 1024},
    "crop_size": {"widget_type": "SpinBox", "min": 0, "max": 2048, "step": 32},
    "lr": {"widget_type": "FloatSpinBox", "min": 1e-6, "max": 1.0, "step": 1e-4},
    "seed": {"widget_type": "SpinBox", "min": 0, "max": 2**31 - 1},
}
#: Extra words for a field whose 0 means "none".
ZERO_MEANS = {"budget_s": "0: steps only", "steps": "0: budget only", "crop_size": "0: whole images"}


def config_help(cls: type = TrainConfig) -> dict[str, str]:
    """Each field's help, from the ``Args:`` section of ``cls``'s docstring.

    Args:
        cls: a dataclass documented in Google style (``name: help``; ``a, b: help`` for two).
    """
    out: dict[str, str] = {}
    for param in docstring_parser.parse(cls.__doc__ or "").params:
        text = " ".join((param.description or "").split()).replace("``", "")
        for name in param.arg_name.split(","):
            out[name.strip()] = text
    return out


def config_default(name: str, cls: type = TrainConfig) -> Any:
    """The default of field ``name`` of dataclass ``cls``.

    Args:
        name: a field name.
        cls: the dataclass.
    """
    f = {f.name: f for f in fields(cls)}[name]
    if f.default is not MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _shown_default(name: str) -> Any:
    """What a widget shows for the default: the window's budget (`config.WINDOW_BUDGET_S`), 0
    for None."""
    if name == "budget_s":
        return WINDOW_BUDGET_S
    value = config_default(name)
    return 0 if value is None else value


def field_widget(name: str):
    """A magicgui widget for `TrainConfig` field ``name`` (default and help from the config).

    Args:
        name: one of `MAIN_FIELDS` or `MORE_FIELDS`.
    """
    tip = config_help().get(name, "")
    if name in ZERO_MEANS:
        tip = f"{tip} ({ZERO_MEANS[name]})"
    label = LABELS.get(name, name)
    if name == "method":
        return ComboBox(name=name, label=label, choices=[], tooltip=tip)
    if name == "device":
        return ComboBox(name=name, label=label, choices=list(DEVICES),
                        value=config_default(name), tooltip=tip)
    if name == "pretrained":
        return ComboBox(name=name, label="pretrained encoder", choices=list(PRETRAINED_CHOICES),
                        value=config_default(name), tooltip=tip)
    opts = dict(WIDGET_OPTIONS[name])
    kind = {"SpinBox": SpinBox, "FloatSpinBox": FloatSpinBox}[opts.pop("widget_type")]
    widget = kind(name=name, label=label, value=_shown_default(name), tooltip=tip, **opts)
    if name == "budget_s":  # whole seconds; 0 reads "none"
        widget.native.setDecimals(0)
        widget.native.setSpecialValueText("none")
    elif name == "lr":  # the step's 4 decimals would round 3e-5 to 0
        widget.native.setDecimals(6)
        widget.value = _shown_default(name)
    return widget


def settings_form(names: tuple[str, ...]) -> Container:
    """A labelled magicgui `Container` of the widgets of ``names``."""
    form = Container(labels=True)
    form.extend([field_widget(n) for n in names])  # one by one: the labels get one width
    return form


def config_values(*forms: Container) -> dict[str, Any]:
    """`TrainConfig` keyword arguments from the forms' widgets (0 back to ``None`` where the
    field's default is ``None``)."""
    out: dict[str, Any] = {}
    for form in forms:
        for widget in form:
            if not hasattr(widget, "value"):
                continue
            value = widget.value
            if widget.name in ZERO_MEANS and not value:
                value = None
            elif widget.name == "steps":
                value = int(value)
            out[widget.name] = value
    return out


def form_labels(*forms: Container) -> list:
    """The label `QLabel` of each labelled widget of ``forms`` (checkboxes have none)."""
    out = []
    for form in forms:
        for widget in form:
            labeled = widget._labeled_widget() if hasattr(widget, "_labeled_widget") else None
            if labeled is not None:
                out.append(labeled._label_widget.native)
    return out


def align_labels(labels: list) -> int:
    """Give ``labels`` one width, the widest one's in their own (styled) font.

    magicgui measures its labels in the application's default font, which napari's
    stylesheet changes; measured here once the widgets are styled, the columns line up.

    Args:
        labels: `QLabel` widgets (`form_labels`, row labels of a `QFormLayout`).

    Returns:
        The width given.
    """
    for label in labels:
        label.ensurePolished()
    width = max((label.sizeHint().width() for label in labels), default=0)
    for label in labels:
        label.setMinimumWidth(width)
    return width


# ----------------------------------------------------------------------------- method options
def option_widget(name: str, option: Option):
    """A magicgui widget for a method option: its type, default and help from the catalog.

    Args:
        name: the option's name.
        option: its `Option` (default and help).
    """
    default, tip = option.default, option.help
    if isinstance(default, bool):
        return CheckBox(name=name, text=name, value=default, tooltip=tip)
    if isinstance(default, int):
        return SpinBox(name=name, label=name, value=default, min=0, max=10**9, tooltip=tip)
    if isinstance(default, float):
        places = _decimals(default)
        return FloatSpinBox(name=name, label=name, value=default, min=0.0, max=1e6,
                            step=10.0 ** -max(1, places), tooltip=tip)
    return LineEdit(name=name, label=name, value=str(default), tooltip=tip)


def _decimals(x: float) -> int:
    """Decimal places of ``x`` as written (0.995 -> 3, 1e-3 -> 3, 2.0 -> 0)."""
    text = repr(float(x))
    if "e-" in text:
        mantissa, exp = text.split("e-")
        return int(exp) + _decimals(float(mantissa))
    frac = text.partition(".")[2].rstrip("0")
    return len(frac)


def fill_options(form: Container, method: str | None) -> None:
    """Replace ``form``'s widgets by those of ``method``'s options (none for no method).

    Args:
        form: the method options container.
        method: a `METHOD_CATALOG` name.
    """
    form.clear()
    spec = METHOD_CATALOG.get(method or "")
    if spec is not None:
        form.extend([option_widget(n, o) for n, o in spec.all_options().items()])


def changed_options(form: Container, method: str | None) -> dict[str, Any]:
    """The options of ``form`` that differ from ``method``'s defaults (``method_options``).

    Args:
        form: the method options container (filled by `fill_options`).
        method: its method.
    """
    spec = METHOD_CATALOG.get(method or "")
    if spec is None:
        return {}
    defaults = spec.defaults()
    out = {}
    for widget in form:
        default = defaults.get(widget.name, MISSING)
        value = widget.value
        if default is MISSING:
            continue
        if isinstance(default, float) and not isinstance(default, bool):
            if math.isclose(float(value), default, rel_tol=1e-9, abs_tol=1e-12):
                continue
            value = float(value)
        elif value == default:
            continue
        out[widget.name] = value
    return out


def set_options(form: Container, values: dict[str, Any]) -> None:
    """Set option widgets by name (what a user would type).

    Args:
        form: the method options container.
        values: option names and values; a name the method does not have raises ``KeyError``.
    """
    names = {w.name: w for w in form}
    for name, value in values.items():
        if name not in names:
            raise KeyError(f"option {name!r} is not one of {', '.join(sorted(names))}")
        names[name].value = value


__all__ = ["MAIN_FIELDS", "MORE_FIELDS", "config_help", "config_default", "field_widget",
           "settings_form", "config_values", "form_labels", "align_labels", "option_widget", "fill_options", "changed_options",
           "set_options"]
