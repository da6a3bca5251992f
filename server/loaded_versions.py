"""The loaded versions of every model, each with its executor, and who uses them.

The newest version of a model serves new sessions. An older one stays loaded
while sessions started on it live, and is unloaded (its executor closed, its
state store freed) when the last of them ends.
"""

import collections
import logging
import threading
from collections.abc import Callable

from .errors import InvalidArgument, NotFound
from .executor import ModelExecutor
from .models import ServedModel

log = logging.getLogger(__name__)

Key = tuple[str, int]  # (model name, version)


class LoadedVersions:
    """Thread-safe."""

    def __init__(self, make_executor: Callable[[ServedModel], ModelExecutor]):
        self._make_executor = make_executor
        self._lock = threading.Lock()
        self._loaded: dict[Key, tuple[ServedModel, ModelExecutor]] = {}
        self._sessions: collections.Counter[Key] = collections.Counter()
        # Replaced whole, never changed in place, so readers need no lock.
        self.newest: dict[str, ServedModel] = {}

    def add(self, model: ServedModel) -> None:
        """Loads a version beside the others; a newer one takes new sessions."""
        executor = self._make_executor(model)
        key = (model.name, model.version)
        with self._lock:
            if key in self._loaded:
                raise ValueError(f"model {model.name!r} version {model.version} twice")
            self._loaded[key] = (model, executor)
            current = self.newest.get(model.name)
            if current is not None and current.version > model.version:
                retired = self._take_if_unused(key)
            else:
                self.newest = {**self.newest, model.name: model}
                retired = current and self._take_if_unused(_key(current))
        if current is not None:
            log.info(
                "model %r: new sessions start on version %d",
                model.name,
                self.newest[model.name].version,
            )
        if retired:
            _unload(retired)

    def all(self) -> list[ServedModel]:
        """Every loaded version, by name, then version."""
        with self._lock:
            return [self._loaded[key][0] for key in sorted(self._loaded)]

    def newest_version(self, name: str) -> int:
        model = self.newest.get(name)
        return 0 if model is None else model.version

    def find(self, name: str, version: int = 0) -> ServedModel:
        """A loaded version (0: the newest); NotFound lists what is loaded."""
        with self._lock:
            return self._find(name, version)

    def acquire(self, name: str, version: int = 0) -> ServedModel:
        """As `find`, counting a session on the version until `release`."""
        with self._lock:
            model = self._find(name, version)
            self._sessions[_key(model)] += 1
            return model

    def release(self, key: Key) -> None:
        """One session of the version ended; unloads it if it was the last of
        an older version. Safe to call from that version's executor thread."""
        with self._lock:
            self._sessions[key] -= 1
            retired = self._take_if_unused(key)
        if retired:
            _unload(retired)

    def of(self, name: str) -> list[tuple[ServedModel, ModelExecutor]]:
        """Every loaded version of the model, oldest first."""
        with self._lock:
            return [self._loaded[key] for key in sorted(self._loaded) if key[0] == name]

    def get(self, key: Key) -> tuple[ServedModel, ModelExecutor] | None:
        return self._loaded.get(key)

    def close(self) -> None:
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), {}
        for _, executor in loaded:
            executor.close()

    def _find(self, name: str, version: int) -> ServedModel:
        if not name:
            raise InvalidArgument(
                "model: expected a model name, received none; loaded models: "
                f"{sorted(self.newest)}"
            )
        if name not in self.newest:
            raise NotFound(
                f"model {name!r} is not loaded; loaded models: {sorted(self.newest)}"
            )
        if version == 0:
            return self.newest[name]
        if version < 0:
            raise InvalidArgument(
                f"version: expected 0 (the newest) or a loaded version, received "
                f"{version}"
            )
        entry = self._loaded.get((name, version))
        if entry is None:
            versions = sorted(v for n, v in self._loaded if n == name)
            raise NotFound(
                f"model {name!r} version {version} is not loaded; loaded versions: "
                f"{versions}; older versions stay loaded only while sessions use them"
            )
        return entry[0]

    def _take_if_unused(self, key: Key):
        """Removes an older version nobody uses; the caller unloads it."""
        if key not in self._loaded:
            return None  # closed already
        model, _ = self._loaded[key]
        if self._sessions[key] > 0 or self.newest.get(key[0]) is model:
            return None
        del self._sessions[key]
        return self._loaded.pop(key)


def _key(model: ServedModel) -> Key:
    return model.name, model.version


def _unload(entry: tuple[ServedModel, ModelExecutor]) -> None:
    model, executor = entry
    log.info("unloaded model %r version %d: no session uses it", *_key(model))
    # Closing joins the executor's thread, which may be the one calling here.
    threading.Thread(
        target=executor.close, name=f"unload-{model.name}", daemon=True
    ).start()
