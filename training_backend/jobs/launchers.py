"""Start a training run elsewhere with a command template: SSH, SLURM, any shell command.

A `Launcher` is a name and a command line such as::

    ssh gpu1 "lesionseg train {args}"
    sbatch --gres=gpu:1 -J {model_id} --wrap "lesionseg train {args}"

`Launcher.command` fills the placeholders and `LaunchedRun` runs the result with ``/bin/sh``;
the run then reports through the project (`runs`), which the server must reach at the path
given by the launcher's ``remote_root`` (shared storage). Placeholders:

* ``{args}`` — the ``lesionseg train`` arguments (`train_args`), each quoted for a POSIX shell.
  The template is run by a local shell, so where the command goes through a second shell (ssh
  joins its arguments for the remote shell; ``sbatch --wrap`` hands a string to one) put it in
  double quotes, as above;
* ``{python}`` — this Python interpreter; ``{project}`` — the project path (as the server sees
  it); ``{model_id}`` — the run's model id (a job name, a log file name).

The window keeps its launchers in ``launchers.json`` in the user's configuration folder
(`config_dir`). This module imports neither torch nor Qt.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import IO

from training_backend import events as ev
from training_backend.config import ModelConfig, TrainConfig
from training_backend.errors import InputError
from training_backend.jobs.runs import RunFollower, new_model_id, wait_for_events
from training_backend.project.store import atomic_write_json

#: The placeholders a template may use.
PLACEHOLDERS = ("args", "python", "project", "model_id")
_PLACEHOLDER = re.compile(r"\{(args|python|project|model_id)\}")
#: Lines of the launcher's stderr kept in a failure's details.
STDERR_LINES = 20
LAUNCHERS_FILE = "launchers.json"


# ----------------------------------------------------------------------------- arguments
def _option_value(value) -> str:
    """A method option as ``--option KEY=VALUE`` reads it back (JSON unless a plain string)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)


def train_args(config: TrainConfig, project: str | os.PathLike, resume: bool = False) -> list[str]:
    """The ``lesionseg train`` arguments that describe ``config`` (what ``{args}`` holds).

    ``cli_train.config_from_args`` of these arguments gives ``config`` back.

    Args:
        config: the run's settings.
        project: the project path (as the machine that trains sees it).
        resume: continue ``config.model_id`` from its checkpoint.

    Raises:
        InputError: a setting the command line cannot express (weight decay, network
            settings other than ``base``).
    """
    defaults = TrainConfig()
    if config.weight_decay != defaults.weight_decay:
        raise InputError("weight_decay", "cannot be given to `lesionseg train`; keep the default")
    base_model = ModelConfig(base=config.model.base)
    if config.model != base_model:
        raise InputError("model", "only the network width (base) can be given to `lesionseg train`")
    a = ["--project", str(project), "--method", config.method]
    if config.steps is not None:
        a += ["--steps", str(int(config.steps))]
    if config.budget_s is not None:
        a += ["--budget-s", f"{float(config.budget_s):g}"]
    a += ["--batch-size", str(config.batch_size), "--image-size", str(config.image_size),
          "--lr", repr(float(config.lr)), "--device", config.device, "--seed", str(config.seed),
          "--rounds", str(config.rounds), "--checkpoint-every-s", repr(float(config.checkpoint_every_s)),
          "--validate-every", str(config.validate_every),
          "--fold-validation", repr(float(config.fold_validation)),
          "--mc-samples", str(config.mc_samples)]
    if config.crop_size is not None:
        a += ["--crop-size", str(int(config.crop_size))]
    if config.threads is not None:
        a += ["--threads", str(config.threads)]
    if config.model.base != ModelConfig().base:
        a += ["--base", str(config.model.base)]
    for key, value in config.method_options.items():
        a += ["--option", f"{key}={_option_value(value)}"]
    if config.init_from:
        a += ["--init-from", str(config.init_from)]
    if config.pretrained != defaults.pretrained:
        a += ["--pretrained", config.pretrained]
    if config.model_id:
        a += ["--model-id", config.model_id]
    if not config.predict:
        a.append("--no-predict")
    if config.predict_first:
        a += ["--predict-first", ",".join(config.predict_first)]
    if resume:
        a.append("--resume")
    return a


# ----------------------------------------------------------------------------- launchers
@dataclass
class Launcher:
    """A way to start ``lesionseg train`` on another machine.

    Args:
        name: what the window lists.
        template: the shell command (module docstring); must contain ``{args}``.
        local_root: a folder prefix of the project path on this machine ...
        remote_root: ... and what it is on the machine that trains (shared storage mounted
            elsewhere); empty: the same path.
    """

    name: str
    template: str
    local_root: str = ""
    remote_root: str = ""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise InputError("launcher", "needs a name")
        if "{args}" not in self.template:
            raise InputError(f"launcher {self.name!r}", "the command template must contain {args}")
        if bool(self.local_root) != bool(self.remote_root):
            raise InputError(f"launcher {self.name!r}", "give both local_root and remote_root, "
                             "or neither")

    def remote_path(self, path: str | os.PathLike) -> str:
        """``path`` as the training machine sees it (``local_root`` replaced by ``remote_root``)."""
        text = str(path)
        if self.local_root:
            root = self.local_root.rstrip("/")
            if text == root or text.startswith(root + "/"):
                return self.remote_root.rstrip("/") + text[len(root):]
        return text

    def command(self, config: TrainConfig, project: str | os.PathLike, resume: bool = False,
                python: str | None = None) -> str:
        """The shell command that starts this run.

        Args:
            config: the run's settings (``model_id`` set, so the run can be followed).
            project: the project path on this machine.
            resume: continue ``config.model_id``.
            python: what ``{python}`` becomes (default: this interpreter).
        """
        remote_project = self.remote_path(project)
        cfg = config
        if config.init_from:
            cfg = TrainConfig.from_dict({**config.to_dict(),
                                         "init_from": self.remote_path(config.init_from)})
        values = {"args": shlex.join(train_args(cfg, remote_project, resume)),
                  "python": shlex.quote(python or sys.executable),
                  "project": shlex.quote(remote_project),
                  "model_id": shlex.quote(config.model_id or "")}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Launcher:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError("launcher", f"unknown setting(s) {', '.join(unknown)}")
        return cls(**d)


def config_dir() -> Path:
    """The user's lesionseg configuration folder (``LESIONSEG_CONFIG_DIR`` overrides it)."""
    override = os.environ.get("LESIONSEG_CONFIG_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_config_dir("lesionseg"))


def load_launchers(path: str | os.PathLike | None = None) -> list[Launcher]:
    """The saved launchers (none saved: an empty list).

    Args:
        path: the JSON file (default: ``launchers.json`` in `config_dir`).
    """
    path = Path(path) if path is not None else config_dir() / LAUNCHERS_FILE
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [Launcher.from_dict(d) for d in data["launchers"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(path, f"not a launcher list ({exc})") from None


def save_launchers(launchers: list[Launcher], path: str | os.PathLike | None = None) -> Path:
    """Save the launchers (atomically).

    Args:
        launchers: all of them (the file is replaced).
        path: the JSON file (default: ``launchers.json`` in `config_dir`).
    """
    path = Path(path) if path is not None else config_dir() / LAUNCHERS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"launchers": [launcher.to_dict() for launcher in launchers]})
    return path


# ----------------------------------------------------------------------------- a launched run
class LaunchedRun:
    """A run started by a launcher and followed through the project.

    Same interface as `process.TrainerProcess` (``start``, ``poll``, ``cancel``, ``kill``,
    ``done``, ``result``, ``wait``, ``close``). The launcher's own failure (a non-zero exit
    before the run's last event: host unreachable, job refused, command not found) ends the
    events with ``Failed("launcher <name> failed (exit code N): <its last stderr line>")``;
    a launcher that returns at once (``sbatch``) leaves the run to be followed until it ends.
    ``cancel`` asks the run to stop through the project; ``kill`` and ``close`` stop following
    (the run goes on where it runs).

    Args:
        launcher: how to start it.
        project_path: the project on this machine.
        config: the run's settings (a model id is chosen when it has none).
        resume: continue ``config.model_id``.
        by: who started it (recorded with a stop request).
    """

    remote = True

    def __init__(self, launcher: Launcher, project_path: str | os.PathLike, config: TrainConfig,
                 resume: bool = False, by: str = ""):
        self.launcher = launcher
        self.project_path = Path(project_path)
        if config.model_id is None:
            config = TrainConfig.from_dict({**config.to_dict(),
                                            "model_id": new_model_id(project_path, config.method)})
        self.config = config
        self.model_id = config.model_id
        self.resume = resume
        self.follower = RunFollower(project_path, self.model_id, from_start="end", by=by)
        self.command = launcher.command(config, project_path, resume)
        self._proc: subprocess.Popen | None = None
        self._out: IO[bytes] | None = None
        self._err: IO[bytes] | None = None
        self._terminal: ev.Event | None = None
        self._detached = False

    def start(self) -> None:
        """Run the launcher's command (returns at once)."""
        if self._proc is not None:
            raise RuntimeError("already started")
        self._out, self._err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(["/bin/sh", "-c", self.command], stdin=subprocess.DEVNULL,
                                          stdout=self._out, stderr=self._err,
                                          start_new_session=True)
        except OSError as exc:
            raise InputError(f"launcher {self.launcher.name!r}", f"cannot run /bin/sh: {exc}") from None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The launcher command's exit code (None while it runs)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def done(self) -> bool:
        return self._terminal is not None

    @property
    def result(self) -> ev.Event | None:
        return self._terminal

    def is_alive(self) -> bool:
        return self._proc is not None and not self._detached and self._terminal is None

    def output(self, stream: str = "stdout") -> str:
        """What the launcher printed so far (``"stdout"`` or ``"stderr"``)."""
        fh = self._out if stream == "stdout" else self._err
        if fh is None:
            return ""
        pos = fh.tell()
        fh.seek(0)
        data = fh.read()
        fh.seek(pos)
        return data.decode("utf-8", "replace")

    def status(self) -> str:
        """One line on where the launch stands, for the window."""
        rc = self.returncode
        if self.follower.started:
            return f"running through {self.launcher.name}"
        if rc is None:
            return f"{self.launcher.name}: launching …"
        said = _last_line(self.output("stdout")) or _last_line(self.output("stderr"))
        return (f"{self.launcher.name} returned" + (f" ({said})" if said else "")
                + "; waiting for the run to start")

    def poll(self) -> list[ev.Event]:
        """Events of the run since the last call, or the launcher's failure (never blocks)."""
        if self._terminal is not None or self._detached or self._proc is None:
            return []
        rc = self._proc.poll()  # first: an exit seen here has flushed its last event before
        events = self.follower.poll()
        if self.follower.done:
            self._terminal = self.follower.result
        elif rc not in (None, 0):
            err = self.output("stderr")
            line = _last_line(err) or "no message"
            self._terminal = ev.Failed(f"launcher {self.launcher.name!r} failed (exit code {rc}): "
                                       f"{line}", traceback=_tail(err))
            events.append(self._terminal)
        return events

    def wait(self, timeout: float | None = None, interval: float = 0.2) -> list[ev.Event]:
        """Collect events until the last one (or ``timeout`` seconds)."""
        return wait_for_events(self, timeout, interval)

    def cancel(self) -> None:
        """Ask the run to stop (a stop request in the project)."""
        self.follower.cancel()

    def kill(self, timeout: float = 0.0) -> None:
        """Stop following (the run, and the launcher command, go on)."""
        self._detached = True
        self.follower.kill()

    def close(self, timeout: float = 0.0) -> None:
        """Stop following and release the output files; the launcher command is left running."""
        self.kill()
        for fh in (self._out, self._err):
            if fh is not None:
                fh.close()
        self._out = self._err = None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _tail(text: str) -> str:
    return "\n".join(text.strip().splitlines()[-STDERR_LINES:])


__all__ = ["PLACEHOLDERS", "train_args", "Launcher", "config_dir", "load_launchers",
           "save_launchers", "LaunchedRun"]
