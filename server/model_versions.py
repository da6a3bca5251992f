"""Which model files are which version, and a watcher that loads new versions.

Layout of the model directory:

    <model_dir>/<name>.keras          version 1 of <name> (also .h5)
    <model_dir>/<name>/<N>.keras      version N of <name>, N a positive integer

Only the newest version of each name is loaded at start (the next newest if
it is refused). While the server runs, a newer version is loaded once its
file's size and modification time have held still across two polls, so a file
still being written is not read; operators should still write it elsewhere
and rename it into place. Hidden files and folders (`.name`) are ignored.
"""

import dataclasses
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from .models import MODEL_SUFFIXES, ServedModel, try_load_model_file

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (model name, version)


@dataclasses.dataclass(frozen=True)
class ModelFile:
    name: str
    version: int
    path: Path
    stamp: tuple[int, int]  # (size in bytes, modification time in ns)

    @property
    def key(self) -> Key:
        return self.name, self.version


def scan(model_dir: Path) -> dict[Key, ModelFile]:
    """Every model file by (name, version). Of two claimants, a plain file wins
    over one in a folder, then the first by name (`.h5` before `.keras`)."""
    found: dict[Key, ModelFile] = {}
    for path in sorted(model_dir.iterdir(), key=lambda p: (p.is_dir(), p.name)):
        if path.name.startswith("."):
            continue  # hidden: a file being written, say
        if path.is_dir():
            candidates = [(path.name, child) for child in sorted(path.iterdir())]
        else:
            candidates = [(None, path)]
        for name, file in candidates:
            model_file = _model_file(name, file)
            if model_file is not None:
                found.setdefault(model_file.key, model_file)
    return found


def newest_by_name(files: dict[Key, ModelFile]) -> dict[str, list[ModelFile]]:
    """Each name's files, newest version first."""
    by_name: dict[str, list[ModelFile]] = {}
    for key in sorted(files, key=lambda k: (k[0], -k[1])):
        by_name.setdefault(key[0], []).append(files[key])
    return by_name


def load_model_dir(
    model_dir: Path, allow_unsafe: bool, execution: str = "auto", large_batch: int = 256
) -> dict[str, ServedModel]:
    """The newest version of each model that loads; refusals are logged."""
    load = loader(allow_unsafe, execution, large_batch)
    return {m.name: m for m in VersionWatcher(model_dir, 0, load).load_newest()}


class VersionWatcher:
    """Loads the newest versions at start, then polls the model directory and
    hands each newer, stable version to `add`.

    `poll` runs on the watcher's own thread, never on a serving thread.
    """

    def __init__(
        self,
        model_dir: Path,
        interval_s: float,
        load: Callable[[ModelFile], ServedModel | None],
    ):
        self.model_dir = model_dir
        self.interval_s = interval_s
        self._load = load
        self._newest: Callable[[str], int] = lambda name: 0
        self._add: Callable[[ServedModel], None] = lambda model: None
        self._previous: dict[Key, tuple[int, int]] = {}
        self._refused: dict[Key, tuple[int, int]] = {}  # retried once rewritten
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="model-watcher", daemon=True
        )

    def load_newest(self) -> list[ServedModel]:
        """The newest version of each model, or the next newest if it is refused."""
        if not self.model_dir.is_dir():
            raise FileNotFoundError(
                f"model directory {str(self.model_dir)!r} does not exist"
            )
        files = scan(self.model_dir)
        self._previous = {key: file.stamp for key, file in files.items()}
        models = []
        for candidates in newest_by_name(files).values():
            for file in candidates:
                served = self._load(file)
                if served is not None:
                    models.append(served)
                    break
                self._refused[file.key] = file.stamp
        return models

    def start(
        self, newest: Callable[[str], int], add: Callable[[ServedModel], None]
    ) -> None:
        """Polls every `interval_s`: `newest(name)` is the version served now
        (0 for none), `add` serves a newly loaded one."""
        self._newest, self._add = newest, add
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def ready(self) -> list[ModelFile]:
        """Newer versions whose stamp matches the last poll's; records this poll."""
        files = self._scan()
        stamps = {key: file.stamp for key, file in files.items()}
        previous, self._previous = self._previous, stamps
        return [
            file
            for key, file in sorted(files.items())
            if file.version > self._newest(file.name)
            and previous.get(key) == file.stamp
            and self._refused.get(key) != file.stamp
        ]

    def poll(self) -> None:
        for file in self.ready():
            if file.version <= self._newest(file.name):
                continue  # a still newer one was added in this poll
            served = self._load(file)
            if served is None:
                self._refused[file.key] = file.stamp
            else:
                self._add(served)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # the watcher must outlive one bad poll
                log.exception("looking for new model versions failed")

    def _scan(self) -> dict[Key, ModelFile]:
        try:
            return scan(self.model_dir)
        except OSError as error:
            log.warning("could not read model directory %s: %s", self.model_dir, error)
            return {}


def loader(
    allow_unsafe: bool, execution: str, large_batch: int
) -> Callable[[ModelFile], ServedModel | None]:
    return lambda file: _load(file, allow_unsafe, execution, large_batch)


def _load(file: ModelFile, allow_unsafe: bool, execution: str, large_batch: int):
    return try_load_model_file(
        file.path, allow_unsafe, execution, large_batch, file.name, file.version
    )


def _model_file(name: str | None, path: Path) -> ModelFile | None:
    """A model file, or None for anything else (a version must be 1, 2, ...)."""
    hidden = path.name.startswith(".")
    if hidden or path.suffix not in MODEL_SUFFIXES or not path.is_file():
        return None
    if name is None:
        name, version = path.stem, 1
    elif path.stem.isdigit() and int(path.stem) >= 1:
        version = int(path.stem)
    else:
        return None
    try:
        status = path.stat()
    except OSError:
        return None  # gone between listing and looking
    return ModelFile(name, version, path, (status.st_size, status.st_mtime_ns))
