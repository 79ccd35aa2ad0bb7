"""Trainer panel: choose a method, start/stop the background trainer process, watch it learn.

The trainer runs in its own process (``training_backend.jobs.process.TrainerProcess``), or elsewhere:
started by a launcher (``training_backend.jobs.launchers.LaunchedRun``: SSH, SLURM, a command
template saved in the user's settings) or by anyone (the panel attaches to a run of the
project, ``training_backend.jobs.runs.RunFollower``). All three have the same interface; a QTimer on
the GUI thread polls their events every ``POLL_MS`` and maps them onto widgets, napari's activity
dock (``napari.utils.progress``) and the workspace state. A run elsewhere is stopped through
the project (a stop request); closing the window only stops following it.

The events go into one evented `TrainingStatus` (``state.run``, `_status`); the progress bar,
the status lines, the run plot, the learning curve and napari's activity dock subscribe to its
fields. The settings form is built by magicgui from `TrainConfig`'s fields and the method's
options from ``config.METHOD_CATALOG`` (`_train_form`). This module never imports torch: the
panel builds a real ``TrainConfig`` (the child process builds the networks).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from training_backend.config import METHOD_CATALOG, MethodSpec, TrainConfig, available_methods
from training_backend.active.curves import model_points
from training_backend.jobs.launchers import Launcher, LaunchedRun, load_launchers, save_launchers
from training_backend.jobs.runs import RunFollower, list_runs, new_model_id, request_focus
from training_backend.errors import InputError

from napari_lesionseg import _status as st
from napari_lesionseg._plot import LearningCurve, RunCurve
from napari_lesionseg._pretrain_control import PretrainControl
from napari_lesionseg._starter_control import LATEST, StartFromControl
from napari_lesionseg._tasks import error_message, guarded, logger
from napari_lesionseg._train_form import (
    MAIN_FIELDS,
    MORE_FIELDS,
    align_labels,
    changed_options,
    config_default,
    config_values,
    fill_options,
    form_labels,
    set_options,
    settings_form,
)

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.project.store import Project

    from napari_lesionseg._state import WorkspaceState

POLL_MS = 200
#: Milliseconds between two looks for runs of the project started elsewhere (while idle).
RUNS_REFRESH_MS = 5000
#: The "where" entry that trains in a process of this computer.
THIS_COMPUTER = "this computer"
REAP_INTERVAL_MS = 200
REAP_TIMEOUT_S = 30.0
#: Default method when the labels allow it (masks or scribbles); otherwise the first available.
PREFERRED_METHOD = "supervised"
#: The best measured method for a project without masks or scribbles, only image labels (the
#: BUSI benchmark in the README: `cam` is the one method that learns masks from image labels).
IMAGE_LABEL_METHOD = "cam"
#: What each kind of annotation is called in the panel.
KIND_NAMES = {"full": "full masks", "sparse": "scribbles", "image_label": "image labels",
              "unlabelled": "unlabelled images"}
AUTO_BUDGET_S = 15  # seconds of fine-tuning in an automatic retrain
#: After a round the case on screen is predicted first, then this many of the ranking's top.
PREDICT_FIRST_RANKED = 20


def trainer_threads() -> int:
    """CPU threads for a trainer started from the window: every core but one, so the viewer
    (painting, loading cases) keeps a core of its own."""
    return max(1, (os.cpu_count() or 1) - 1)


def method_table() -> list[MethodSpec]:
    """Every method of ``config.METHOD_CATALOG`` (torch-free), in catalog order."""
    return list(METHOD_CATALOG.values())


def supervision_counts(project: Project) -> dict[str, int]:
    """How many training cases have each kind of supervision (the store counts them)."""
    return project.supervision_counts()


def available(table: list[MethodSpec], counts: dict[str, int]) -> list[str]:
    """Methods whose ``requires`` is met by ``counts`` (``config.available_methods``), in
    table order."""
    names = set(available_methods(counts, {m.name: m for m in table}))
    return [m.name for m in table if m.name in names]


def recommended(names: list[str], counts: dict[str, int]) -> str | None:
    """The best measured method for what the project holds: `supervised` once there are
    masks or scribbles, `cam` with image labels only, else the first available."""
    if PREFERRED_METHOD in names and (counts.get("full", 0) or counts.get("sparse", 0)):
        return PREFERRED_METHOD
    if IMAGE_LABEL_METHOD in names and counts.get("image_label", 0):
        return IMAGE_LABEL_METHOD
    return names[0] if names else None


def usage_note(spec: MethodSpec, counts: dict[str, int], table: list[MethodSpec]) -> str:
    """Which of the project's annotations a method learns from, and which it leaves unused
    (and which available method would use them)."""
    uses = spec.supervision.uses
    present = [k for k in KIND_NAMES if counts.get(k, 0) > 0]
    used = [f"{counts[k]} {KIND_NAMES[k]}" for k in present if k in uses]
    unused = [k for k in present if k not in uses]
    text = f"{spec.name} uses " + (", ".join(used) if used else "none of your annotations")
    if unused:
        text += "; not used: " + ", ".join(f"{counts[k]} {KIND_NAMES[k]}" for k in unused)
        trainable = set(available(table, counts))
        better = [m.name for m in table if m.name != spec.name and m.name in trainable
                  and set(unused) & set(m.supervision.uses)]
        if better:
            text += f" ({' or '.join(better[:2])} would use them)"
    return text


class TrainerPanel(QWidget):
    """Method/device/budget controls, start/stop, progress, loss, Dice and the learning curve.

    Args:
        state: the workspace state.
    """

    def __init__(self, state: WorkspaceState, parent=None):
        super().__init__(parent)
        self.state = state
        self.process = None                     # the running TrainerProcess
        self._methods: list[MethodSpec] = method_table()
        self._user_method: str | None = None    # a method the user picked (else: recommended)
        self._counts: dict[str, int] = {}
        self._names: list[str] = []
        self._cancel_sent = False
        self._filling = False                   # the method list is being refilled
        self._options_method: str | None = None  # the method the options form shows
        self._activity: progress | None = None
        self._activity_what = ""                # the run's description in the activity dock
        self._activity_shown = ""
        #: The run on show (shared with the other panels as ``state.run``).
        self.status: st.TrainingStatus = state.run
        self.events_seen: list[Any] = []        # every event of the current run (tests, debugging)
        self._launchers: list[Launcher] = []
        self._started_seen = False
        self._timer = QTimer(self)
        self._timer.setInterval(POLL_MS)
        self._timer.timeout.connect(guarded(self.poll))
        self._runs_timer = QTimer(self)
        self._runs_timer.setInterval(RUNS_REFRESH_MS)
        self._runs_timer.timeout.connect(guarded(self.refresh_runs))
        self._build()
        self._subscribe()
        self.reload_launchers()
        state.project_changed.connect(self._on_project)
        state.cases_changed.connect(self._update_methods)
        state.case_updated.connect(self._on_labels_saved)
        state.case_changed.connect(self._send_focus)
        self._on_project(state.project)

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        # the settings: magicgui widgets of TrainConfig's fields (defaults and help from it)
        self.form = settings_form(MAIN_FIELDS)
        self.form.native.layout().setContentsMargins(0, 0, 0, 0)
        self._method, self._device = self.form.method, self.form.device
        self._budget, self._steps = self.form.budget_s, self.form.steps
        self._image_size = self.form.image_size
        self._method.tooltip = "Only methods whose supervision your labels meet are listed"
        self._method.changed.connect(self._on_method_changed)
        self._method_note = QLabel("")
        self._method_note.setWordWrap(True)
        self._method_note.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        self.form.native.layout().insertWidget(1, self._method_note)
        lay.addWidget(self.form.native)
        self.more_form = settings_form(MORE_FIELDS)
        self.options_form = settings_form(())
        self._more = QCollapsible("More settings and method options")
        self._more.setDuration(0)
        self._more.addWidget(self.more_form.native)
        self._options_title = QLabel("")
        self._options_title.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        self._more.addWidget(self._options_title)
        self._more.addWidget(self.options_form.native)
        self._more.collapse(animate=False)
        self._more.toggled.connect(lambda *_: self._align_labels())  # styled once shown
        lay.addWidget(self._more)
        form = QFormLayout()
        form.setContentsMargins(0, 0, 0, 0)
        where = QHBoxLayout()
        self._where = QComboBox()
        self._where.setToolTip("Where the model trains: a process of this computer, or a "
                               "launcher (SSH, SLURM, any command) that trains elsewhere on "
                               "this project (shared storage)")
        self._edit_launcher = QPushButton("+")
        self._edit_launcher.setFixedWidth(28)
        self._edit_launcher.setToolTip("Add a launcher (or edit the chosen one)")
        self._edit_launcher.clicked.connect(lambda: self.edit_launcher())
        where.addWidget(self._where, 1)
        where.addWidget(self._edit_launcher)
        self._row_labels = [QLabel("Train on"), QLabel("Running")]
        form.addRow(self._row_labels[0], where)
        runs_row = QHBoxLayout()
        self._runs = QComboBox()
        self._runs.setToolTip("Runs of this project that are training now (started from the "
                              "command line, a server, another window)")
        self._refresh_runs = QPushButton("↻")
        self._refresh_runs.setFixedWidth(28)
        self._refresh_runs.setToolTip("Look for running runs again")
        self._refresh_runs.clicked.connect(lambda: self.refresh_runs())
        self._attach_btn = QPushButton("Follow")
        self._attach_btn.setToolTip("Show this run's progress here; Stop then stops it")
        self._attach_btn.clicked.connect(lambda: self.attach(self._runs.currentData()))
        runs_row.addWidget(self._runs, 1)
        runs_row.addWidget(self._refresh_runs)
        runs_row.addWidget(self._attach_btn)
        form.addRow(self._row_labels[1], runs_row)
        lay.addLayout(form)
        # scratch, the latest model or a starter model that fits (_starter_control)
        self.start_from = StartFromControl(self.state, self._adopt_starter)
        lay.addWidget(self.start_from)
        auto = QHBoxLayout()
        self._auto = QCheckBox("retrain after")
        self._auto_n = QSpinBox()
        self._auto_n.setRange(1, 1000)
        self._auto_n.setValue(5)
        self._auto_budget = QSpinBox()
        self._auto_budget.setRange(5, 3600)
        self._auto_budget.setValue(AUTO_BUDGET_S)
        self._auto_budget.setSuffix(" s")
        self._auto_budget.setToolTip("Budget of an automatic retrain: it fine-tunes the latest "
                                     "model, so a short run refreshes the predictions quickly")
        auto.addWidget(self._auto)
        auto.addWidget(self._auto_n)
        auto.addWidget(QLabel("new labels,"))
        auto.addWidget(self._auto_budget)
        lay.addLayout(auto)
        # the encoder's self-supervised pretraining while no training runs (_pretrain_control)
        self.pretrain = PretrainControl(self.state, self.settings, lambda: self.process is None)
        lay.addWidget(self.pretrain)
        buttons = QHBoxLayout()
        self._start_btn = QPushButton("Start training")
        self._start_btn.clicked.connect(lambda: self.start())
        self._stop_btn = QPushButton("Stop")
        self._stop_btn.setToolTip("Stop after the current step (a second click kills the process)")
        self._stop_btn.clicked.connect(lambda: self.stop())
        self._stop_btn.setEnabled(False)
        buttons.addWidget(self._start_btn, 2)
        buttons.addWidget(self._stop_btn, 1)
        lay.addLayout(buttons)
        self._bar = QProgressBar()
        self._bar.setRange(0, 1000)
        self._bar.setTextVisible(True)
        self._bar.setFormat(st.progress_text(self.status))
        lay.addWidget(self._bar)
        self._metrics = QLabel("")
        self._metrics.setWordWrap(True)
        self._metrics.setStyleSheet("font-size: 11px;")
        lay.addWidget(self._metrics)
        self._status = QLabel("")
        self._status.setWordWrap(True)
        self._status.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self._status)
        self.run_curve = RunCurve()
        lay.addWidget(self.run_curve)
        self.curve = LearningCurve()
        lay.addWidget(self.curve)

    def showEvent(self, event) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        self._align_labels()

    def _align_labels(self) -> None:
        """One label column for the settings and the "Train on" rows, one for the collapsed
        settings and method options (measured in the styled font)."""
        align_labels(form_labels(self.form) + self._row_labels)
        align_labels(form_labels(self.more_form, self.options_form))

    def _subscribe(self) -> None:
        """The widgets that show the run follow the status' fields."""
        events = self.status.events
        events.connect(self._show_progress)                 # any field: bar and activity
        events.message.connect(self._show_message)
        for name in ("loss", "dice", "folded_at"):
            getattr(events, name).connect(self._show_metrics)
        for name in ("loss_curve", "dice_curve", "folded_at"):
            getattr(events, name).connect(self._show_run_curve)
        self.status.round_finished.connect(self._on_round_finished)

    def _show_progress(self, *_args) -> None:
        value = st.progress_value(self.status)
        self._bar.setValue(value)
        self._bar.setFormat(st.progress_text(self.status))
        if self._activity is not None:
            what = st.activity_text(self.status, self._activity_what)
            if what != self._activity_shown:
                self._activity.set_description(what)
                self._activity_shown = what
            self._activity.n = value
            self._activity.refresh()

    def _show_message(self, text: str) -> None:
        self._status.setText(text)

    def _show_metrics(self, *_args) -> None:
        self._metrics.setText(st.metrics_text(self.status))

    def _show_run_curve(self, *_args) -> None:
        s = self.status
        self.run_curve.set_run(s.loss_curve, s.dice_curve, s.folded_at)

    def _on_round_finished(self, n_annotations: int, dice: float | None) -> None:
        if dice is not None:
            self.curve.add_point(n_annotations, dice)

    # ------------------------------------------------------------------ methods
    def _update_methods(self, *_args, message: bool = True) -> None:
        """Offer the methods the project's labels can train; pick the recommended one unless
        the user picked another that still can.

        Args:
            message: also say in the status line what the labels are (when no run is going on).
        """
        project = self.state.project
        current = self._method.value
        counts = self._counts = supervision_counts(project) if project is not None else {}
        names = self._names = available(self._methods, counts) if project is not None else []
        # the method follows the annotations unless the user picked one that still can train
        pick = self._user_method if self._user_method in names else recommended(names, counts)
        self._filling = True
        try:
            self._method.choices = names
            if pick is not None:
                self._method.value = pick
        finally:
            self._filling = False
        info = {m.name: m for m in self._methods}
        for i, name in enumerate(names):  # each method's description and use as its tooltip
            tip = info[name].description + "\n" + usage_note(info[name], counts, self._methods)
            self._method.native.setItemData(i, tip, Qt.ItemDataRole.ToolTipRole)
        if self._method.value != current:
            logger.debug("method %s -> %s", current, self._method.value)
        self._show_usage()
        self._method.enabled = bool(names) and not self.state.training
        self._start_btn.setEnabled(bool(names) and not self.state.training)
        if project is None or not message:
            return
        if not names:
            self.status.message = ("No method can train yet: give some cases an image label, "
                                   "scribbles or a full mask.")
        elif not self.state.training:
            c = counts
            self.status.message = (f"labels: {c.get('full', 0)} full · {c.get('sparse', 0)} "
                                   f"sparse · {c.get('image_label', 0)} image labels · "
                                   f"{c.get('unlabelled', 0)} unlabelled")

    def _adopt_starter(self, starter) -> None:
        """A starter model was chosen: train at the image size (and crops) it was trained at,
        where its features mean what they learnt."""
        if starter.image_size:
            self._image_size.value = starter.image_size
        self.more_form.crop_size.value = starter.crop_size or 0

    def _on_method_changed(self, name: str | None) -> None:
        """Another method in the combo: the user's pick is kept while it can train (a refill
        of the list is not a pick); its usage note and option form follow."""
        if not self._filling and name in self._names:
            self._user_method = name if name != recommended(self._names, self._counts) else None
        self._show_usage()

    def _show_usage(self) -> None:
        """Under the combo: which annotations the chosen method uses, and which it does not;
        the options form shows the chosen method's options."""
        info = {m.name: m for m in self._methods}
        name = self._method.value
        self._method_note.setText(usage_note(info[name], self._counts, self._methods)
                                  if name in info and name in self._names else "")
        if name != self._options_method:
            self._options_method = name
            fill_options(self.options_form, name)
            if self.isVisible():
                self._align_labels()
            self._options_title.setText(f"options of {name} (hover for help)" if name else "")

    def available_methods(self) -> list[str]:
        """Methods the current labels can train (empty without a project)."""
        return list(self._names) if self.state.project is not None else []

    # ------------------------------------------------------------------ project
    def _on_project(self, project: Project | None) -> None:
        if self.process is not None and _remote(self.process):
            self._finish_run(wait=False)  # a run elsewhere goes on; the window stops following
        elif self.process is not None:
            # another project: stop the run gracefully (it checkpoints, registers its model and
            # exits); the old process is reaped in the background, the window never waits
            self.process.cancel()
            self._finish_run(wait=False)
            show_info("Training stopped because another project was opened; the model so far "
                      "is saved with its project.")
        self._user_method = None  # another project: the method follows its annotations
        self.status.reset()       # nothing of the previous one's run stays on screen
        self._update_methods()
        self.curve.set_points(self._history_points(project))
        self.pretrain.set_project(project)
        self.start_from.refresh()
        for w in (self._start_btn, self.start_from):
            w.setEnabled(project is not None)
        self.refresh_runs()
        if project is None:
            self._runs_timer.stop()
        else:
            self._runs_timer.start()

    @staticmethod
    def _history_points(project: Project | None) -> list[tuple[int, float]]:
        # the same points and curve as `lesionseg simulate` (training_backend.active.curves)
        return [] if project is None else model_points(project.models())

    # ------------------------------------------------------------------ run control
    def configure(self, method: str | None = None, device: str | None = None,
                  budget_s: float | None = None, steps: int | None = None,
                  image_size: int | None = None, fine_tune: bool | None = None,
                  batch_size: int | None = None, lr: float | None = None,
                  options: dict[str, Any] | None = None, start_from: str | None = None) -> None:
        """Set the controls (what a user would type); None leaves one unchanged.

        Args:
            method: a method listed in the combo box (one the labels can train).
            device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
            budget_s: wall-clock budget in seconds (0: steps only).
            steps: optimisation steps (0: budget only).
            image_size: training resolution.
            fine_tune: start from the latest model (False: from scratch).
            batch_size, lr: batch size and learning rate.
            options: method options by name (set after ``method``).
            start_from: ``"scratch"``, ``"latest model"`` or a starter model offered for the
                project (e.g. ``"fundus-starter"``; it sets the image size it was trained at,
                so give ``image_size`` too to change that).
        """
        if start_from is not None:
            self.start_from.set_choice(start_from)
        if method is not None:
            if method not in self._names:
                raise ValueError(f"method {method!r} cannot train on these labels; "
                                 f"available: {', '.join(self._names) or 'none'}")
            self._method.value = method
        widgets = {"device": self._device, "budget_s": self._budget, "steps": self._steps,
                   "image_size": self._image_size, "batch_size": self.more_form.batch_size,
                   "lr": self.more_form.lr}
        given = {"device": device, "budget_s": budget_s, "steps": steps,
                 "image_size": image_size, "batch_size": batch_size, "lr": lr}
        for name, value in given.items():
            if value is not None:
                widgets[name].value = value
        if fine_tune is not None:
            self.start_from.set_choice(LATEST if fine_tune else None)
        if options:
            set_options(self.options_form, options)

    def settings(self, auto: bool = False) -> TrainConfig:
        """The configuration the Start button (or, with ``auto``, an automatic retrain: the
        retrain budget, fine-tuning the latest model, else the chosen starter) would use."""
        values = config_values(self.form, self.more_form)
        values["method"] = values["method"] or config_default("method")
        if auto:
            values.update(steps=None, budget_s=self._auto_budget.value())
        first = ([self.state.case_id] if self.state.case_id else []) + [
            c for c in self.state.suggested[:PREDICT_FIRST_RANKED] if c != self.state.case_id]
        init_from = self.start_from.init_from()
        project = self.state.project
        if auto and project is not None:
            latest = project.latest_model()
            if latest is not None and latest[1].get("checkpoint"):
                init_from = latest[1]["checkpoint"]
        return TrainConfig(**values, method_options=changed_options(self.options_form,
                                                                   values["method"]),
                           predict=True, threads=trainer_threads(), predict_first=first,
                           init_from=init_from)

    def start(self, auto: bool = False) -> bool:
        """Start training in a background process; False if it could not start.

        Args:
            auto: an automatic retrain (its own budget, fine-tuning the latest model).
        """
        project = self.state.project
        if project is None or self.process is not None:
            return False
        if not self.available_methods():
            show_warning("No training method fits the labels yet: label some cases first")
            return False
        if self.pretrain.busy:  # it holds the training lock: the run starts once it has stopped
            self.status.message = "stopping the pretraining (it keeps its checkpoint) …"
            return self.pretrain.stop(then=lambda: self.start(auto=auto))
        self.state.save_requested.emit()      # the annotation being painted joins this run
        self.state.reload_index()
        from training_backend.jobs.process import TrainerProcess

        try:
            cfg = self.settings(auto=auto)
        except InputError as exc:  # a setting the trainer would refuse: said, nothing started
            show_error(error_message(exc))
            return False
        launcher = self.launcher()
        try:
            if launcher is None:
                proc = TrainerProcess(project.path, cfg)
            else:  # another machine: its own cores; a model id to follow the run by
                cfg = TrainConfig.from_dict({**cfg.to_dict(), "threads": None,
                                             "model_id": new_model_id(project.path, cfg.method)})
                proc = LaunchedRun(launcher, project.path, cfg, by=self.state.user)
            proc.start()
        except Exception as exc:  # noqa: BLE001 - e.g. cannot spawn, a bad template
            show_error(f"could not start the trainer: {exc}")
            return False
        where = "" if launcher is None else f" through {launcher.name}"
        self._begin(proc, f"Training {cfg.method}",
                    f"{cfg.method} on {cfg.device}{where} · started {time.strftime('%H:%M:%S')}",
                    "starting the trainer …" if launcher is None else f"launching through "
                    f"{launcher.name} …")
        return True

    def attach(self, model_id: str | None) -> bool:
        """Follow a run of the project that something else started (its files in
        ``P/runs/<model id>``): progress, loss, Dice and predictions show as for a run of
        this window, and Stop asks it to stop through the project.

        Args:
            model_id: the run (one listed in the "Running" box).
        """
        project = self.state.project
        if project is None or self.process is not None or not model_id:
            return False
        proc = RunFollower(project.path, model_id, from_start="attempt", by=self.state.user)
        self._begin(proc, f"Following {model_id}", f"following {model_id}", "following …",
                    own=False)
        self.status.model_id = model_id
        self.poll()  # what the run has reported so far
        return True

    def _begin(self, proc, activity: str, status: str, bar: str, own: bool = True) -> None:
        """Show ``proc``'s run: a fresh status (the widgets follow it), start polling.

        Args:
            proc: a TrainerProcess, LaunchedRun or RunFollower.
            activity: the activity dock's description.
            status, bar: the first status line and progress-bar text.
            own: a run this window started (it trains on the labels saved so far).
        """
        self.process = proc
        self._started_seen = False
        self.events_seen = []
        if own:
            self.state.new_labels.clear()
        self.state.training = True
        self._activity = progress(total=1000, desc=activity)
        self._activity_what = self._activity_shown = activity
        self.status.begin(following=not own, waiting=bar, message=status)
        self._set_running(True)
        self._runs_timer.stop()
        self._timer.start()

    # ------------------------------------------------------------------ launchers and runs
    def reload_launchers(self) -> None:
        """Fill the "Train on" box: this computer, then the saved launchers."""
        current = self._where.currentText()
        try:
            self._launchers = load_launchers()
        except Exception as exc:  # noqa: BLE001 - a broken settings file must not break the panel
            self._launchers = []
            show_warning(f"launchers not loaded: {exc}")
        self._where.clear()
        self._where.addItem(THIS_COMPUTER)
        for launcher in self._launchers:
            self._where.addItem(launcher.name)
            self._where.setItemData(self._where.count() - 1, launcher.template,
                                    Qt.ItemDataRole.ToolTipRole)
        if self._where.findText(current) >= 0:
            self._where.setCurrentText(current)

    def launcher(self) -> Launcher | None:
        """The chosen launcher (None: this computer)."""
        name = self._where.currentText()
        return next((x for x in self._launchers if x.name == name), None)

    def save_launcher(self, launcher: Launcher, select: bool = True) -> None:
        """Add ``launcher`` to the user's settings (replacing one of the same name).

        Args:
            launcher: the launcher.
            select: choose it in the "Train on" box.
        """
        others = [x for x in load_launchers() if x.name != launcher.name]
        save_launchers(others + [launcher])
        self.reload_launchers()
        if select:
            self._where.setCurrentText(launcher.name)

    def remove_launcher(self, name: str) -> None:
        """Delete a saved launcher."""
        save_launchers([x for x in load_launchers() if x.name != name])
        self.reload_launchers()

    def edit_launcher(self) -> None:
        """The launcher dialog: a new launcher, or the chosen one to edit."""
        from napari_lesionseg._launcher_dialog import LauncherDialog

        dialog = LauncherDialog(self.launcher(), self)
        if dialog.exec() != QDialog.DialogCode.Accepted:
            return
        try:
            launcher = dialog.launcher()
        except Exception as exc:  # noqa: BLE001 - InputError: a one-line message
            show_error(str(exc))
            return
        self.save_launcher(launcher)

    def refresh_runs(self) -> list[str]:
        """List the project's running runs (fresh heartbeat) in the "Running" box.

        Returns:
            Their model ids, newest first.
        """
        project = self.state.project
        self._runs.clear()
        infos = list_runs(project.path) if project is not None else []
        for info in infos:
            where = f"{info.host}" + (f" ×{info.world_size}" if info.world_size > 1 else "")
            self._runs.addItem(f"{info.model_id} · {where} · step {info.step}", info.model_id)
        if not infos:
            self._runs.addItem("none", None)
        following = self.process is not None
        self._runs.setEnabled(bool(infos) and not following)
        self._attach_btn.setEnabled(bool(infos) and not following)
        return [info.model_id for info in infos]

    def stop(self, force: bool = False) -> None:
        """Stop gracefully (checkpoint, then finish); a second call (or ``force``) kills.

        A run elsewhere gets a stop request through the project; a second call stops
        following it (it cannot be killed from here)."""
        proc = self.process
        if proc is None:
            return
        if _remote(proc):
            if force or self._cancel_sent:
                proc.kill()
                self._finish_run()
                self.status.update(state=st.IDLE, message=f"no longer following "
                                   f"{self.status.model_id or 'the run'}; it goes on where it runs")
                return
            try:
                proc.cancel()  # a stop request written into the project
            except OSError as exc:  # a read-only or unreachable project: detach instead
                show_error(f"{self.state.project.path}: cannot ask the run to stop ({exc}); "
                           "stop it where it runs")
                proc.kill()
                self._finish_run()
                self.status.update(state=st.IDLE, message="no longer following the run")
                return
            self._cancel_sent = True
            self._stop_btn.setText("Detach")
            self.status.state = st.STOPPING
            return
        if force or self._cancel_sent:
            proc.kill()
            self._finish_run()
            self.status.update(state=st.FINISHED, reason="killed", eta_s=None,
                               message="trainer killed; the last checkpoint is kept")
            return
        proc.cancel()
        self._cancel_sent = True
        self._stop_btn.setText("Kill")
        self.status.state = st.STOPPING

    def _set_running(self, running: bool) -> None:
        self._start_btn.setEnabled(not running and bool(self.available_methods()))
        self._stop_btn.setEnabled(running)
        self._stop_btn.setText("Stop")
        self._cancel_sent = False
        for form in (self.form, self.more_form, self.options_form):
            form.enabled = not running
        for w in (self.start_from, self._where, self._edit_launcher, self._refresh_runs):
            w.setEnabled(not running)
        self._runs.setEnabled(not running and self._runs.currentData() is not None)
        self._attach_btn.setEnabled(not running and self._runs.currentData() is not None)

    def _finish_run(self, wait: bool = False) -> None:
        """The run is over: release the process (in the background unless ``wait``)."""
        self._timer.stop()
        proc, self.process = self.process, None
        if proc is not None:
            if wait:
                _close_quietly(proc)
            else:
                self._reap(proc, time.monotonic() + REAP_TIMEOUT_S)
        if self._activity is not None:
            self._activity.close()
            self._activity = None
        self.state.training = False
        self._set_running(False)
        self._update_methods(message=False)  # the status line says how the run ended
        self.start_from.refresh()            # "latest model" is this run's model now
        self.pretrain.training_ended()  # the idle pretraining may resume
        self.state.reload_index()
        if self.state.project is not None:
            self.refresh_runs()
            self._runs_timer.start()

    # ------------------------------------------------------------------ events
    def poll(self) -> None:
        """Drain the trainer's events (called by the timer every ``POLL_MS``)."""
        if self.process is None:
            return
        proc = self.process
        try:
            events = proc.poll()
        except Exception as exc:  # noqa: BLE001 - broken queue
            events = [_failed(f"lost contact with the trainer: {exc}")]
        # a followed run's history arrives in one poll: drawn once; the run's end is handled
        # after it, so that what it starts (an automatic retrain) sees the finished state
        end = next((i for i, e in enumerate(events)
                    if type(e).__name__ in ("Finished", "Failed")), len(events))
        with self.status.batch():
            for event in events[:end]:
                self.handle_event(event)
        for event in events[end:]:
            self.handle_event(event)
        if (self.process is proc and not self._started_seen and hasattr(proc, "status")
                and self.status.state == st.STARTING):
            self.status.waiting = proc.status()  # a launcher: submitted, waiting for the run

    def handle_event(self, event: Any) -> None:
        """Map one trainer event onto the status (the widgets follow it); the run's end also
        releases the process, notifies, and may start an automatic retrain."""
        from training_backend import events as ev

        self.events_seen.append(event)
        self.status.apply(event)
        if isinstance(event, ev.Started):
            self._started_seen = True
            self._send_focus()  # the case on screen may not be the one shown at Start
        elif isinstance(event, ev.Finished):
            show_info(f"Training {event.model_id} finished ({event.reason}, step {event.step})")
            self._finish_run()
            if event.reason != "cancelled":
                self._maybe_auto_retrain()  # labels saved while it ran may already be enough
        elif isinstance(event, ev.Failed):
            message = event.message or "training failed"
            show_error(message if len(message) < 300 else message[:297] + "...")
            if event.traceback and not getattr(event, "user_error", False):
                logger.error("lesionseg trainer failed:\n%s", event.traceback)
            self._finish_run()

    def _send_focus(self, *_args) -> None:
        """Tell the run on show which case is on screen: after its round it predicts that
        case first, even one opened while it predicts (`runs.request_focus`, through the
        project, so a run elsewhere hears it too)."""
        project, cid, mid = self.state.project, self.state.case_id, self.status.model_id
        if self.process is None or project is None or not cid or not mid or project.mode != "r+":
            return
        try:
            request_focus(project.path, mid, [cid])
        except OSError as exc:  # a read-only project: the run keeps the order it started with
            logger.debug("lesionseg: focus not sent to %s: %s", mid, exc)

    def status_text(self) -> str:
        """The panel's status and metrics lines, as the user reads them."""
        return " · ".join(t for t in (self._status.text(), self._metrics.text()) if t)

    # ------------------------------------------------------------------ auto-retrain
    def _on_labels_saved(self, _cid: str) -> None:
        self._update_methods()
        self._maybe_auto_retrain()

    def _maybe_auto_retrain(self) -> None:
        if (self._auto.isChecked() and self.process is None and self.state.project is not None
                and len(self.state.new_labels) >= self._auto_n.value()):
            n = len(self.state.new_labels)
            if self.start(auto=True):
                show_info(f"Retraining: {n} newly labelled cases")

    def set_auto_retrain(self, enabled: bool, n: int, budget_s: int | None = None) -> None:
        """Retrain automatically after ``n`` newly labelled cases, for ``budget_s`` seconds."""
        self._auto_n.setValue(n)
        if budget_s is not None:
            self._auto_budget.setValue(int(budget_s))
        self._auto.setChecked(enabled)

    def _reap(self, proc, deadline: float) -> None:
        """Close a finished process once it has exited, without blocking the GUI thread (a
        child still alive after ``deadline`` is killed)."""
        if proc.is_alive() and time.monotonic() < deadline:
            QTimer.singleShot(REAP_INTERVAL_MS, lambda: self._reap(proc, deadline))
            return
        if proc.is_alive():
            proc.kill()
        _close_quietly(proc)

    def close_process(self) -> None:
        """End a running trainer gracefully and wait for it (cancel, checkpoint; killed after
        5 s) -- for closing the window; a pretraining too."""
        self.pretrain.close_process()
        if self.process is not None:
            self.status.message = "stopping the trainer …"
            self._finish_run(wait=True)


def _remote(proc) -> bool:
    """A run elsewhere (launched or followed): stopped through the project, never killed."""
    return bool(getattr(proc, "remote", False))


def _close_quietly(proc) -> None:
    try:
        proc.close()
    except Exception:  # noqa: BLE001 - already gone
        logger.debug("lesionseg: closing the trainer process failed", exc_info=True)


def _failed(message: str):
    from training_backend.events import Failed

    return Failed(message)
