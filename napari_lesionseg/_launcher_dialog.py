"""The dialog that adds or edits a launcher (``training_backend.jobs.launchers.Launcher``)."""
from __future__ import annotations

from qtpy.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QLabel,
    QLineEdit,
    QVBoxLayout,
    QWidget,
)

from training_backend.jobs.launchers import Launcher

EXAMPLES = ('ssh gpu1 "lesionseg train {args}"\n'
            'sbatch --gres=gpu:1 -J {model_id} --wrap "lesionseg train {args}"')


class LauncherDialog(QDialog):
    """Name, command template and path mapping of a launcher.

    Args:
        launcher: one to edit (None: a new one).
        parent: the parent widget.
    """

    def __init__(self, launcher: Launcher | None = None, parent: QWidget | None = None):
        super().__init__(parent)
        self.setWindowTitle("Launcher")
        form = QFormLayout()
        self.name = QLineEdit(launcher.name if launcher else "")
        self.name.setPlaceholderText("gpu1")
        self.template = QLineEdit(launcher.template if launcher else "")
        self.template.setPlaceholderText('ssh gpu1 "lesionseg train {args}"')
        self.template.setToolTip("Run by /bin/sh. {args}: the train arguments, quoted; "
                                 "{project}, {model_id}, {python} also work. Examples:\n"
                                 + EXAMPLES)
        self.local_root = QLineEdit(launcher.local_root if launcher else "")
        self.local_root.setPlaceholderText("/Volumes/projects (optional)")
        self.remote_root = QLineEdit(launcher.remote_root if launcher else "")
        self.remote_root.setPlaceholderText("/mnt/projects (optional)")
        form.addRow("Name", self.name)
        form.addRow("Command", self.template)
        form.addRow("Projects here", self.local_root)
        form.addRow("… are there", self.remote_root)
        note = QLabel("The machine that trains must see the project (shared storage); the "
                      "window follows the run through the project folder.")
        note.setWordWrap(True)
        note.setStyleSheet("color: #9aa4b1; font-size: 11px;")
        form.addRow(note)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok
                                   | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(buttons)

    def launcher(self) -> Launcher:
        """The launcher the fields describe (raises ``InputError`` when incomplete)."""
        return Launcher(self.name.text().strip(), self.template.text().strip(),
                        self.local_root.text().strip(), self.remote_root.text().strip())
