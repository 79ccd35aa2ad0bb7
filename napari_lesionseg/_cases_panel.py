"""Case navigator: a sortable, filterable table of cases and active-learning "next case".

"Next" (N) goes to the best-ranked case of the chosen strategy that has no full annotation and
was not visited yet in this session; "Previous" (Shift+N) walks back through visited cases.
Rankings are computed in a worker on a read-only view of the project and refreshed (debounced)
when predictions, labels or the strategy change.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from napari.utils.notifications import show_info
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from napari_lesionseg._tasks import error_message, run_task

if TYPE_CHECKING:  # pragma: no cover
    from training_backend.store import CaseRecord, Project

    from napari_lesionseg._state import WorkspaceState

COLUMNS = ("Case", "Status", "Label", "P", "Rank")
#: Short status words for the table (the full word is the tooltip).
SHORT_STATUS = {"image label": "label", "unlabelled": "—", "predicted": "pred"}
FILTERS = ("all", "to do", "unlabelled", "image label", "sparse", "full", "predicted", "holdout")
RANK_K = 200
STATUS_COLORS = {"full": "#34c759", "sparse": "#ffcc00", "image label": "#5ac8fa",
                 "predicted": "#af52de", "unlabelled": "#9aa4b1"}


class _Item(QTableWidgetItem):
    """A table cell that sorts by a key stored in ``UserRole`` (numbers sort as numbers)."""

    def __init__(self, text: str, key: Any = None):
        super().__init__(text)
        self.setData(Qt.ItemDataRole.UserRole, text.lower() if key is None else key)
        self.setFlags(self.flags() & ~Qt.ItemFlag.ItemIsEditable)

    def __lt__(self, other: QTableWidgetItem) -> bool:
        a = self.data(Qt.ItemDataRole.UserRole)
        b = other.data(Qt.ItemDataRole.UserRole)
        try:
            return a < b
        except TypeError:
            return str(a) < str(b)


def compute_ranking(project_path: str, strategy: str, k: int) -> tuple[list, str]:
    """Rank on a fresh read-only view of the project (runs in a worker).

    Returns ``(ranked, note)``: ``ranked`` is a list of ``(cid, score)``; ``note`` explains a
    fallback (e.g. no predictions yet, where cases come in import order).
    """
    from training_backend.acquisition import candidate_ids, rank
    from training_backend.errors import ProjectError
    from training_backend.store import Project

    project = Project.open(project_path, mode="r")
    try:
        return [(cid, score) for cid, score in rank(project, strategy, k=k)], ""
    except ProjectError as exc:
        order = candidate_ids(project)[:k]
        reason = ("no predictions yet (train a model)" if "no predictions" in str(exc)
                  else str(exc).split(": ", 1)[-1])
        return [(cid, None) for cid in order], f"{reason}; cases in import order"


class CasesPanel(QWidget):
    """The case table, filter and next/previous navigation.

    Args:
        state: the workspace state.
    """

    def __init__(self, state: WorkspaceState, parent=None):
        super().__init__(parent)
        self.state = state
        self.ranking: list[tuple[str, float | None]] = []
        self.ranking_note = ""
        self._ranking_key: tuple | None = None   # (strategy, generation) the ranking is for
        self._generation = 0                      # bumped when rankings become stale
        self._ranking_busy = False
        self._pending_next = False
        self.history: list[str] = []
        self.visited: set[str] = set()
        self._rank_pos: dict[str, int] = {}
        self._rank_k = RANK_K                     # how many cases a ranking asks for

        self._rank_timer = QTimer(self)
        self._rank_timer.setSingleShot(True)
        self._rank_timer.setInterval(400)
        self._rank_timer.timeout.connect(self.refresh_ranking)

        self._build()
        state.project_changed.connect(self._on_project)
        state.case_changed.connect(self._on_case_changed)
        state.case_updated.connect(self._on_case_updated)
        state.cases_changed.connect(self._on_cases_changed)
        state.outputs_changed.connect(self._on_outputs_changed)
        state.strategy_changed.connect(self._on_strategy_changed)
        self._on_project(state.project)

    # ------------------------------------------------------------------ widgets
    def _build(self) -> None:
        from training_backend.acquisition import STRATEGIES

        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        nav = QHBoxLayout()
        self._prev_btn = QPushButton("◀")
        self._prev_btn.setToolTip("Previous visited case (Shift+N)")
        self._prev_btn.clicked.connect(lambda: self.previous_case())
        self._next_btn = QPushButton("Next ▶")
        self._next_btn.setToolTip("Best-ranked case to annotate next (N)")
        self._next_btn.clicked.connect(lambda: self.next_case())
        self._strategy = QComboBox()
        for i, (name, strat) in enumerate(STRATEGIES.items()):
            self._strategy.addItem(name)
            self._strategy.setItemData(i, strat.description, Qt.ItemDataRole.ToolTipRole)
        self._strategy.setToolTip("Active-learning strategy that orders 'Next'")
        self._strategy.setCurrentText(self.state.strategy)
        self._strategy.currentTextChanged.connect(self._on_strategy_combo)
        self._prev_btn.setFixedWidth(32)
        nav.addWidget(self._prev_btn)
        nav.addWidget(self._next_btn, 1)
        nav.addWidget(QLabel("by"))
        nav.addWidget(self._strategy, 2)
        lay.addLayout(nav)

        filt = QHBoxLayout()
        self._filter = QComboBox()
        self._filter.addItems(FILTERS)
        self._filter.setToolTip("Show cases with this status ('to do' = no full mask)")
        self._filter.currentTextChanged.connect(self._apply_filter)
        self._search = QLineEdit()
        self._search.setPlaceholderText("filter by name…")
        self._search.setClearButtonEnabled(True)
        self._search.textChanged.connect(self._apply_filter)
        filt.addWidget(self._filter)
        filt.addWidget(self._search, 1)
        lay.addLayout(filt)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(20)
        header = self.table.horizontalHeader()
        for col in range(len(COLUMNS)):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.table.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.table.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        tips = ("case name (hover: id and source file)", "best supervision of the case",
                "image-level label; + / − lesion classes marked present / absent",
                "model: highest lesion presence probability", "position in the active-learning "
                "ranking of the chosen strategy")
        for col, tip in enumerate(tips):
            self.table.horizontalHeaderItem(col).setToolTip(tip)
        self.table.setColumnHidden(COLUMNS.index("P"), True)
        self.table.setSortingEnabled(True)
        self.table.sortItems(COLUMNS.index("Rank"), Qt.SortOrder.AscendingOrder)
        self.table.setMinimumHeight(150)
        self.table.itemSelectionChanged.connect(self._on_selection)
        lay.addWidget(self.table)
        self._info = QLabel("")
        self._info.setWordWrap(True)
        self._info.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        lay.addWidget(self._info)

    # ------------------------------------------------------------------ table
    def _status(self, project: Project, rec: CaseRecord) -> str:
        if rec.status == "unlabelled" and project.output_record(rec.id) is not None:
            return "predicted"
        return rec.status

    def _row_items(self, project: Project, rec: CaseRecord) -> list[_Item]:
        status = self._status(project, rec)
        out = project.output_record(rec.id)
        model, model_key = "", -1.0
        if out is not None:
            presence = [p for p in (out.scores.get("presence") or []) if isinstance(p, (int, float))]
            if presence:
                model_key = float(max(presence))
                model = f"{model_key:.2f}"
            else:
                model, model_key = "✓", 0.0
        rank_pos = self._rank_pos.get(rec.id)
        rank_text = "" if rank_pos is None else str(rank_pos + 1)
        label = rec.image_label or ""
        if rec.presence:
            label += (" " if label else "") + "".join(
                "+" if v else "−" for v in rec.presence.values())
        items = [_Item(rec.name), _Item(SHORT_STATUS.get(status, status), status), _Item(label),
                 _Item(model, model_key),
                 _Item(rank_text, 10**9 if rank_pos is None else rank_pos)]
        items[0].setData(Qt.ItemDataRole.UserRole + 1, rec.id)
        items[0].setToolTip(f"{rec.id} · {rec.source or ''}")
        items[1].setForeground(_qcolor(STATUS_COLORS.get(status, "#9aa4b1")))
        items[1].setToolTip(status)
        if rec.split == "holdout":
            items[1].setText(items[1].text() + " (holdout)")
            items[1].setToolTip(f"{status}; holdout split: never trained on")
        return items

    def rebuild(self) -> None:
        """Refill the whole table from the project index."""
        project = self.state.project
        self.table.setSortingEnabled(False)
        self.table.blockSignals(True)
        self.table.setRowCount(0)
        if project is not None:
            recs = project.cases()
            self.table.setRowCount(len(recs))
            for row, rec in enumerate(recs):
                for col, item in enumerate(self._row_items(project, rec)):
                    self.table.setItem(row, col, item)
        self.table.blockSignals(False)
        self.table.setSortingEnabled(True)
        has_outputs = project is not None and any(
            project.output_record(cid) is not None for cid in project.case_ids())
        self.table.setColumnHidden(COLUMNS.index("P"), not has_outputs)
        self._apply_filter()
        self._select_current()
        self._update_info()

    def _row_of(self, cid: str) -> int | None:
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is not None and item.data(Qt.ItemDataRole.UserRole + 1) == cid:
                return row
        return None

    def _update_row(self, cid: str) -> None:
        project = self.state.project
        row = self._row_of(cid)
        if project is None or row is None:
            self.rebuild()
            return
        sorting = self.table.isSortingEnabled()
        self.table.setSortingEnabled(False)
        self.table.blockSignals(True)
        for col, item in enumerate(self._row_items(project, project.case(cid))):
            self.table.setItem(row, col, item)
        self.table.blockSignals(False)
        self.table.setSortingEnabled(sorting)
        self._apply_filter()
        self._select_current()
        self._update_info()

    def _apply_filter(self, *_args) -> None:
        project = self.state.project
        status_filter = self._filter.currentText()
        text = self._search.text().strip().lower()
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if project is None or item is None:
                continue
            rec = project.case(item.data(Qt.ItemDataRole.UserRole + 1))
            status = self._status(project, rec)
            show = {
                "all": True,
                "to do": rec.status != "full" and rec.split != "holdout",
                "predicted": project.output_record(rec.id) is not None,
                "holdout": rec.split == "holdout",
            }.get(status_filter, status == status_filter or rec.status == status_filter)
            if text and text not in rec.name.lower() and text not in rec.id:
                show = False
            self.table.setRowHidden(row, not show)

    def _select_current(self) -> None:
        cid = self.state.case_id
        row = None if cid is None else self._row_of(cid)
        self.table.blockSignals(True)
        if row is None:
            self.table.clearSelection()
        else:
            self.table.selectRow(row)
            self.table.scrollToItem(self.table.item(row, 0),
                                    QAbstractItemView.ScrollHint.EnsureVisible)
        self.table.blockSignals(False)

    def _update_info(self) -> None:
        project = self.state.project
        if project is None:
            self._info.setText("")
            return
        counts: dict[str, int] = {}
        for rec in project.cases():
            counts[rec.status] = counts.get(rec.status, 0) + 1
        parts = [f"{counts.get(s, 0)} {s}" for s in ("full", "sparse", "image label", "unlabelled")]
        text = f"{len(project)} cases: " + " · ".join(parts)
        if self.ranking_note:
            text += f"\nranking: {self.ranking_note}"
        self._info.setText(text)

    def _on_selection(self) -> None:
        rows = {idx.row() for idx in self.table.selectedIndexes()}
        if len(rows) != 1:
            return
        item = self.table.item(rows.pop(), 0)
        if item is not None:
            self.go_to(item.data(Qt.ItemDataRole.UserRole + 1))

    # ------------------------------------------------------------------ navigation
    def go_to(self, cid: str) -> None:
        """Open case ``cid`` (remembered in the back history)."""
        if self.state.project is None or cid == self.state.case_id:
            return
        self.state.case_id = cid

    def _on_case_changed(self, new: str | None, old: str | None) -> None:
        if new is not None:
            if not self.history or self.history[-1] != new:
                self.history.append(new)
            self.visited.add(new)
        self._select_current()

    def next_case(self) -> str | None:
        """Go to the best-ranked case still to do; returns its id (None if pending/none)."""
        project = self.state.project
        if project is None:
            return None
        if self._ranking_key != (self.state.strategy, self._generation):
            self._pending_next = True
            self.refresh_ranking()
            return None
        for cid, _score in self.ranking:
            if cid == self.state.case_id or cid in self.visited:
                continue
            try:
                rec = project.case(cid)
            except Exception:  # noqa: BLE001 - case vanished from a re-read index
                continue
            if rec.status != "full" and rec.split != "holdout":
                self.state.case_id = cid
                return cid
        if len(self.ranking) >= self._rank_k:  # a full page was used up: rank further
            self._rank_k += RANK_K
            self._generation += 1
            self._pending_next = True
            self.refresh_ranking()
            return None
        show_info("No more cases to annotate in this ranking — all visited or fully annotated")
        return None

    def previous_case(self) -> str | None:
        """Go back to the previously visited case."""
        while len(self.history) > 1:
            self.history.pop()  # the current case
            cid = self.history[-1]
            if self.state.project is not None and cid in self.state.project.case_ids():
                self.history.pop()  # re-appended by _on_case_changed
                self.state.case_id = cid
                return cid
        return None

    # ------------------------------------------------------------------ ranking
    def _invalidate_ranking(self) -> None:
        self._generation += 1
        self._rank_timer.start()

    def refresh_ranking(self) -> None:
        """Recompute the ranking of the current strategy in a worker."""
        project = self.state.project
        if project is None:
            return
        if self._ranking_busy:
            self._rank_timer.start()  # try again once the running one is done
            return
        self._rank_timer.stop()
        key = (self.state.strategy, self._generation)
        self._ranking_busy = True

        def done(result) -> None:
            if project is not self.state.project:
                return
            self.ranking, self.ranking_note = result
            self._ranking_key = key
            self._fill_rank_column()
            self._update_info()
            if self._pending_next and key == (self.state.strategy, self._generation):
                self._pending_next = False
                self.next_case()

        def failed(exc: BaseException) -> None:
            self._pending_next = False
            self.ranking_note = error_message(exc)
            self._update_info()

        def finished() -> None:
            self._ranking_busy = False

        run_task(compute_ranking, str(project.path), self.state.strategy, self._rank_k,
                 on_done=done, on_error=failed, on_finish=finished)

    def _fill_rank_column(self) -> None:
        self._rank_pos = pos = {cid: i for i, (cid, _s) in enumerate(self.ranking)}
        sorting = self.table.isSortingEnabled()
        self.table.setSortingEnabled(False)
        self.table.blockSignals(True)
        col = COLUMNS.index("Rank")
        for row in range(self.table.rowCount()):
            item = self.table.item(row, 0)
            if item is None:
                continue
            p = pos.get(item.data(Qt.ItemDataRole.UserRole + 1))
            self.table.setItem(row, col, _Item("" if p is None else str(p + 1),
                                               10**9 if p is None else p))
        self.table.blockSignals(False)
        self.table.setSortingEnabled(sorting)

    def _on_strategy_combo(self, name: str) -> None:
        self.state.strategy = name

    def _on_strategy_changed(self, name: str) -> None:
        if self._strategy.currentText() != name:
            self._strategy.setCurrentText(name)
        self._invalidate_ranking()
        self.visited = {self.state.case_id} if self.state.case_id else set()

    def set_strategy(self, name: str) -> None:
        self._strategy.setCurrentText(name)

    # ------------------------------------------------------------------ state events
    def _on_project(self, project: Project | None) -> None:
        self.history.clear()
        self.visited.clear()
        self.ranking, self.ranking_note, self._ranking_key = [], "", None
        self._rank_pos = {}
        self._rank_k = RANK_K
        self._generation += 1
        self.rebuild()
        for w in (self._next_btn, self._prev_btn, self._strategy, self._filter, self._search):
            w.setEnabled(project is not None)
        if project is not None:
            self.refresh_ranking()

    def _on_case_updated(self, cid: str) -> None:
        # Rankings read stored predictions only; `next_case` skips cases that became full.
        self._update_row(cid)

    def _on_cases_changed(self) -> None:
        self.rebuild()
        self._invalidate_ranking()

    def _on_outputs_changed(self, _case_ids: tuple) -> None:
        if self.state.project is not None:
            self.state.project.refresh()
        self.rebuild()
        self._invalidate_ranking()


def _qcolor(hex_color: str):
    from qtpy.QtGui import QBrush, QColor

    return QBrush(QColor(hex_color))
