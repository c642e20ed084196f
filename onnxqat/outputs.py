"""Output transactions: every file a command writes is published as one unit, or none is.

All outputs of one command (the export set, the report, a checkpoint) are first written into
staging folders beside their destinations; only when every one was written completely are they
published. A set of several files in one folder is published with a single atomic rename::

    OUT/model.onnx       -> .onnxqat/export-model/current/model.onnx       (symlinks, made once)
    OUT/model.encodings  -> .onnxqat/export-model/current/model.encodings
    OUT/model_qdq.onnx   -> .onnxqat/export-model/current/model_qdq.onnx
    OUT/.onnxqat/export-model/current -> gen-<id>     <- the switch: one rename() replaces it
    OUT/.onnxqat/export-model/gen-<id>/               <- the files of one generation

Readers open ``OUT/model_qdq.onnx`` as always; at every instant the names resolve to one complete
generation, the old one or the new one (a reader that must not mix two generations across a
publish resolves ``OUT/.onnxqat/<set>/current`` once, e.g. with ``os.path.realpath``). A single
file (a report, a checkpoint) is published by one ``os.replace``. Regular files left at those
names by earlier versions are migrated without ever being visibly absent or mixed.

Where symlinks cannot be made (some Windows setups, FAT/exFAT, some network shares), a set's
files are replaced one by one; ``OUT/.onnxqat/<set>/MANIFEST.json`` is removed before the first
and written after the last, so a reader can tell a complete set (manifest present) from one in
flux.

Staging folders and switch links carry the writer's process id: the next transaction in a
folder removes those of processes that no longer run (a killed run), and the generations no
longer current. Nested ``with transaction():`` blocks join the outermost one, so e.g. the CLI
publishes an export and its report together while :func:`onnxqat.pipeline.export` also works on
its own (checkpoints use ``join=False``: each is published when written).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Sequence

from onnxqat.errors import OutputError

__all__ = [
    "CONTROL_DIR",
    "StagedSet",
    "Transaction",
    "check_distinct",
    "check_output_dir",
    "check_output_file",
    "transaction",
]

CONTROL_DIR = ".onnxqat"
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
# .onnxqat-<pid>-<host>-<random>[.tmp|.bak]: staging folders, temporary links and files, backups
_STAGE = re.compile(r"^\.onnxqat-(\d+)-([0-9a-f]{4})-[0-9a-f]+(\.tmp|\.bak)?$")
# gen-<pid>-<host>-<random> and link-<pid>-<host>-<random> inside a set's control folder
_GEN = re.compile(r"^(gen|link)-(\d+)-([0-9a-f]{4})-[0-9a-f]+$")
# temporaries of earlier versions (tempfile names without a process id)
_LEGACY = re.compile(r"^\.(onnxqat|checkpoint)-[a-z0-9_]{8}$")
LEGACY_AGE = 3600.0   # seconds after which a legacy temporary is assumed dead
FOREIGN_AGE = 86400.0  # the same for another host's temporaries (shared network folders)


def _token() -> str:
    return f"{os.getpid()}-{_HOST}-{secrets.token_hex(4)}"


def _step(what: str, path: str) -> None:
    """Called before every change publishing makes in an output folder.

    A no-op; tests replace it to fail (or kill the process) at each point of a publish.
    """


# -- stale temporaries ----------------------------------------------------------------------------
def _age(path: str) -> float:
    try:
        return time.time() - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def _dead(pid: int, host: str, path: str) -> bool:
    """Whether the writer of ``path`` (process ``pid`` on ``host``) is gone."""
    if host != _HOST:
        return _age(path) > FOREIGN_AGE
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)


def clean_stale(directory: str) -> None:
    """Remove what killed runs left in ``directory``: staging folders, temporary links and files
    of dead processes, generations of dead processes that are not current, legacy temporaries."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        m = _STAGE.match(entry.name)
        if m and _dead(int(m.group(1)), m.group(2), entry.path):
            _remove(entry.path)
        elif _LEGACY.match(entry.name) and _age(entry.path) > LEGACY_AGE:
            _remove(entry.path)
    control = os.path.join(directory, CONTROL_DIR)
    try:
        sets = [e.path for e in os.scandir(control) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for folder in sets:
        current = _current(folder)
        try:
            items = list(os.scandir(folder))
        except OSError:
            continue
        for entry in items:
            m = _GEN.match(entry.name)
            if m and entry.name != current and _dead(int(m.group(2)), m.group(3), entry.path):
                _remove(entry.path)


def _current(control: str) -> str | None:
    """Name of the current generation of a set's control folder, or None."""
    try:
        target = os.readlink(os.path.join(control, "current"))
    except OSError:
        return None
    return target if os.path.isdir(os.path.join(control, target)) else None


# -- staged outputs ---------------------------------------------------------------------------------
def _symlinks_work(directory: str) -> bool:
    probe = os.path.join(directory, f".onnxqat-{_token()}.tmp")
    try:
        os.symlink("probe", probe)
    except (OSError, NotImplementedError):
        return False
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return True


def _link_or_copy(src: str, dst: str) -> None:
    """``dst`` with the content of ``src``: a hard link where possible, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _Member:
    mode = "replace"

    def prepare(self) -> None: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def finalize(self) -> None: ...

    def discard(self) -> None: ...

    def owns(self, path: str) -> str | None:
        """The destination of staged file ``path``, if this member staged it."""
        return None


class StagedSet(_Member):
    """Files of one set, staged in a folder beside their destination ``directory``.

    Write each file at ``path(name)``; every file of the staging folder is published.
    """

    def __init__(self, directory: str, name: str, also: Sequence[str] = ()) -> None:
        self.directory = directory
        self.name = name
        self.also = tuple(also)
        self.control = os.path.join(directory, CONTROL_DIR, name)
        self.stage: str | None = os.path.join(directory, f".onnxqat-{_token()}")
        os.mkdir(self.stage)
        self.files: list[str] = []
        self.gen: str | None = None
        self.previous: str | None = None
        self.old_names: list[str] = []
        self.created_links: list[str] = []
        self.single: _Single | None = None

    def path(self, filename: str) -> str:
        """Where to write output ``filename`` (a plain file name)."""
        if (not filename or filename in (".", "..", CONTROL_DIR) or "\0" in filename
                or os.sep in filename or (os.altsep and os.altsep in filename) or filename.startswith(".onnxqat-")):
            raise OutputError(f"{filename!r}: not a valid output file name")
        assert self.stage is not None, "the set was already published"
        return os.path.join(self.stage, filename)

    def owns(self, path: str) -> str | None:
        if self.stage and os.path.dirname(os.path.abspath(path)) == os.path.abspath(self.stage):
            return os.path.join(self.directory, os.path.basename(path))
        return None

    def prepare(self) -> None:
        assert self.stage is not None
        self.files = sorted(os.listdir(self.stage))
        for name in self.files:
            if not os.path.isfile(os.path.join(self.stage, name)):
                raise OutputError(f"{os.path.join(self.directory, name)}: only files can be outputs")
            dest = os.path.join(self.directory, name)
            if os.path.isdir(dest) and not os.path.islink(dest):
                raise OutputError(f"{dest}: exists and is a directory")
        if len(self.files) == 1 and not os.path.lexists(self.control):
            self.mode = "replace"
        elif _symlinks_work(self.directory):
            self.mode = "generations"
        else:
            self.mode = "one by one"

    # -- publishing ------------------------------------------------------------------------------------
    def commit(self) -> None:
        assert self.stage is not None
        if not self.files:
            return
        if self.mode == "replace":
            self.single = _Single(os.path.join(self.directory, self.files[0]),
                                  os.path.join(self.stage, self.files[0]))
            self.single.commit()
        elif self.mode == "generations":
            self._commit_generations()
        else:
            self._commit_one_by_one()

    def _link_name(self, name: str) -> str:
        return os.path.join(CONTROL_DIR, self.name, "current", name)

    def _ours(self, name: str) -> bool:
        try:
            return os.readlink(os.path.join(self.directory, name)) == self._link_name(name)
        except OSError:
            return False

    def _swap(self, target: str | None) -> None:
        """Point ``current`` at generation ``target`` (None: remove it): one atomic rename."""
        current = os.path.join(self.control, "current")
        if target is None:
            _step("remove switch", current)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(current)
            return
        tmp = os.path.join(self.control, f"link-{_token()}")
        _step("create switch", tmp)
        os.symlink(target, tmp)
        _step("switch", current)
        os.replace(tmp, current)

    def _make_link(self, name: str) -> None:
        tmp = os.path.join(self.directory, f".onnxqat-{_token()}.tmp")
        _step("create link", tmp)
        os.symlink(self._link_name(name), tmp)
        _step("place link", os.path.join(self.directory, name))
        os.replace(tmp, os.path.join(self.directory, name))

    def _commit_generations(self) -> None:
        assert self.stage is not None
        _step("create control folder", self.control)
        os.makedirs(self.control, exist_ok=True)
        gen = f"gen-{_token()}"
        _step("move staging into place", os.path.join(self.control, gen))
        os.rename(self.stage, os.path.join(self.control, gen))
        self.stage, self.gen = None, gen
        current = _current(self.control)
        old = sorted(os.listdir(os.path.join(self.control, current))) if current else []
        names = [*self.files, *(n for n in self.also if n not in self.files)]
        foreign = [n for n in names if os.path.lexists(os.path.join(self.directory, n)) and not self._ours(n)]
        if foreign:
            # files at the set's names that are no links of ours (an earlier version's outputs):
            # they become a generation first, seen through links, so they are never absent or mixed
            migrated = f"gen-{_token()}"
            folder = os.path.join(self.control, migrated)
            _step("create migration", folder)
            os.mkdir(folder)
            for n in old:
                if n in foreign:  # what readers see there is the foreign file, not the generation's
                    continue
                _step("migrate", os.path.join(folder, n))
                _link_or_copy(os.path.join(self.control, current or "", n), os.path.join(folder, n))
            for n in foreign:
                if os.path.exists(os.path.join(self.directory, n)):
                    _step("migrate", os.path.join(folder, n))
                    _link_or_copy(os.path.join(self.directory, n), os.path.join(folder, n))
            self._swap(migrated)
            current, old = migrated, sorted(os.listdir(folder))
            for n in foreign:
                self._make_link(n)
        for n in self.files:
            if not os.path.lexists(os.path.join(self.directory, n)):
                self._make_link(n)  # dangles (or shows the old file) until the switch
                self.created_links.append(n)
        self.previous, self.old_names = current, old
        self._swap(gen)  # the commit point

    def _commit_one_by_one(self) -> None:
        assert self.stage is not None
        os.makedirs(self.control, exist_ok=True)
        manifest = os.path.join(self.control, "MANIFEST.json")
        _step("remove manifest", manifest)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(manifest)
        sizes = {}
        for n in self.files:
            sizes[n] = os.path.getsize(os.path.join(self.stage, n))
            _step("replace", os.path.join(self.directory, n))
            os.replace(os.path.join(self.stage, n), os.path.join(self.directory, n))
        tmp = os.path.join(self.control, f"link-{_token()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"files": sizes}, f)
        _step("write manifest", manifest)
        os.replace(tmp, manifest)

    def rollback(self) -> None:
        if self.single is not None:
            self.single.rollback()
        elif self.mode == "generations" and self.gen is not None:
            self._swap(self.previous)
            for n in self.created_links:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, n))
        self.created_links = []

    def finalize(self) -> None:
        """After the whole transaction committed: drop what the old generation needed."""
        if self.single is not None:
            self.single.finalize()
        if self.mode == "generations" and self.gen is not None:
            for n in set(self.old_names) - set(self.files):
                if self._ours(n):
                    _remove(os.path.join(self.directory, n))
            for entry in os.scandir(self.control):
                m = _GEN.match(entry.name)
                if m and entry.name != self.gen and (int(m.group(2)) == os.getpid()
                                                     or _dead(int(m.group(2)), m.group(3), entry.path)):
                    _remove(entry.path)
        self.discard()

    def discard(self) -> None:
        """Remove the staging folder (and, unless published, the generation moved into place)."""
        if self.single is not None:
            self.single.discard()
        if self.stage is not None:
            _remove(self.stage)
            self.stage = None
        if self.gen is not None and _current(self.control) != self.gen:
            _remove(os.path.join(self.control, self.gen))
            for n in self.created_links:
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.directory, n))
            self.created_links = []


class _Single(_Member):
    """One file published by one ``os.replace``; the file it replaces is kept until the
    transaction committed, so it can be put back."""

    def __init__(self, dest: str, staged: str) -> None:
        self.dest = dest
        self.staged: str | None = staged
        self.backup: str | None = None
        self.existed = False
        self.replaced = False

    def owns(self, path: str) -> str | None:
        return self.dest if self.staged and os.path.abspath(path) == os.path.abspath(self.staged) else None

    def prepare(self) -> None:
        if os.path.isdir(self.dest) and not os.path.islink(self.dest):
            raise OutputError(f"{self.dest}: exists and is a directory")

    def commit(self) -> None:
        assert self.staged is not None
        self.existed = os.path.lexists(self.dest)
        if self.existed:
            backup = os.path.join(os.path.dirname(self.dest), f".onnxqat-{_token()}.bak")
            _step("back up", backup)
            try:
                os.link(self.dest, backup, follow_symlinks=False)
                self.backup = backup
            except OSError:
                self.backup = None  # no hard links here: the replace cannot be undone
        _step("replace", self.dest)
        os.replace(self.staged, self.dest)
        self.staged, self.replaced = None, True

    def rollback(self) -> None:
        if not self.replaced:
            return
        if self.backup is not None:
            os.replace(self.backup, self.dest)
            self.backup = None
        elif not self.existed:
            with contextlib.suppress(OSError):
                os.unlink(self.dest)
        self.replaced = False  # (a file replaced where hard links fail cannot be put back)

    def finalize(self) -> None:
        self.discard()

    def discard(self) -> None:
        for path in (self.staged, self.backup):
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self.staged = self.backup = None


class Transaction:
    """The outputs of one command, published together by :meth:`commit` (or none of them).

    Use :func:`transaction` rather than this class directly.
    """

    def __init__(self) -> None:
        self._members: list[_Member] = []
        self._created: list[str] = []
        self._cleaned: set[str] = set()
        self.done = False

    def _folder(self, directory: str) -> str:
        directory = os.path.abspath(directory)
        if os.path.lexists(directory) and not os.path.isdir(directory):
            raise OutputError(f"{directory}: exists and is not a directory")
        missing = []
        d = directory
        while not os.path.lexists(d):
            missing.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for d in reversed(missing):
            os.mkdir(d)
            self._created.append(d)
        if directory not in self._cleaned:
            clean_stale(directory)
            self._cleaned.add(directory)
        return directory

    def folder(self, directory: str | os.PathLike[str], name: str, also: Sequence[str] = ()) -> StagedSet:
        """A set of files published together into ``directory`` under the set ``name``
        (e.g. ``export-model``; one set per name and folder).

        ``also`` names files that belong to the set even when not written this time (e.g. the
        external-data file of a model that became small): an earlier one is removed on publish.
        """
        where = os.fspath(directory)
        try:
            member = StagedSet(self._folder(where), name, also)
        except OSError as e:
            raise OutputError(f"{where}: cannot write outputs here: {e.strerror or e}") from None
        self._members.append(member)
        return member

    def file(self, path: str | os.PathLike[str]) -> str:
        """Where to write the single output file ``path``; it replaces ``path`` at commit."""
        path = os.fspath(path)
        dest = os.path.abspath(path)
        try:
            folder = self._folder(os.path.dirname(dest))
            staged = os.path.join(folder, f".onnxqat-{_token()}.tmp")
            os.close(os.open(staged, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
        self._members.append(_Single(dest, staged))
        return staged

    def error(self, e: OSError) -> OutputError:
        """The OutputError for an OSError raised while writing or publishing, naming the output."""
        where = None
        if e.filename:
            where = next((d for m in self._members if (d := m.owns(os.fspath(e.filename))) is not None), None)
            where = where or os.fspath(e.filename)
        if where is None:
            where = next((getattr(m, "directory", None) or getattr(m, "dest", "") for m in self._members), "output")
        return OutputError(f"{where}: writing outputs failed: {e.strerror or e}")

    def commit(self) -> None:
        """Publish every member; if one fails, those already published are put back."""
        if self.done:
            return
        try:
            for m in self._members:
                m.prepare()
        except BaseException:
            self.abort()
            raise
        # those that can be undone first; sets replaced one by one (no symlinks) last
        order = sorted(self._members, key=lambda m: m.mode == "one by one")
        published: list[_Member] = []
        try:
            for m in order:
                m.commit()
                published.append(m)
        except BaseException:
            for m in reversed(published):
                with contextlib.suppress(Exception):
                    m.rollback()
            self.abort()
            raise
        self.done = True
        for m in self._members:
            with contextlib.suppress(OSError):
                m.finalize()

    def abort(self) -> None:
        """Remove everything staged and the folders this transaction created (when empty)."""
        for m in self._members:
            with contextlib.suppress(OSError):
                m.discard()
        for d in reversed(self._created):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self._created = []
        self.done = True


_ACTIVE: contextvars.ContextVar[Transaction | None] = contextvars.ContextVar("onnxqat_transaction", default=None)


@contextlib.contextmanager
def transaction(*, join: bool = True) -> Iterator[Transaction]:
    """Stage outputs; publish them all when the outermost block ends without an error.

    Inside another ``with transaction():`` the block joins it (``join=False``: an independent
    transaction, published when this block ends). On an error, or Ctrl-C, nothing is published
    and the staging is removed; OSErrors become :class:`OutputError` naming the output.

    >>> with transaction() as tx:                                  # doctest: +SKIP
    ...     stage = tx.folder("out", "export-model")
    ...     open(stage.path("model.encodings"), "w").write("{}")
    """
    outer = _ACTIVE.get()
    if join and outer is not None:
        yield outer
        return
    tx = Transaction()
    token = _ACTIVE.set(tx)
    try:
        try:
            yield tx
        finally:
            _ACTIVE.reset(token)
        tx.commit()
    except OSError as e:
        tx.abort()
        raise tx.error(e) from None
    except BaseException:
        tx.abort()
        raise


# -- checks before any work -------------------------------------------------------------------------
def _limits(folder: str) -> tuple[int, int]:
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 255, 4096


def _entry(path: str) -> str:
    """The directory entry ``path`` names (its folder resolved, its last component not)."""
    absolute = os.path.abspath(path)
    return os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))


def _same(output: str, source: str) -> bool:
    if _entry(output) == _entry(source):
        return True
    try:
        return os.path.samefile(output, source)
    except OSError:
        return False


def check_output_dir(directory: str | os.PathLike[str], names: Sequence[str] = (), *,
                     inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse, before any work, an output folder that cannot be written or whose outputs
    ``names`` would replace an input (or a directory). Creates nothing."""
    where = os.fspath(directory)
    if not where or "\0" in where:
        raise OutputError(f"{where!r}: not a valid output folder")
    absolute = os.path.abspath(where)
    if os.path.exists(absolute) and not os.path.isdir(absolute):
        raise OutputError(f"{where}: exists and is not a directory")
    existing = absolute
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"{where}: {existing} is not a directory")
    name_max, path_max = _limits(existing)
    new = os.path.relpath(absolute, existing).split(os.sep) if existing != absolute else []
    for part in [*new, *names]:
        size = len(os.fsencode(part))
        if size > name_max:
            shown = part if size <= 60 else part[:40] + "..."
            raise OutputError(f"{where}: the name '{shown}' ({size} bytes) is longer than this file system allows "
                              f"({name_max} bytes)")
    longest = max((len(os.fsencode(os.path.join(absolute, n))) for n in names), default=len(absolute))
    if longest >= path_max:
        raise OutputError(f"{where}: output paths would be longer than this file system allows ({path_max} bytes)")
    probe = os.path.join(existing, f".onnxqat-{_token()}.tmp")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{where}: cannot write outputs here: {e.strerror or e}") from None
    for name in names:
        path = os.path.join(absolute, name)
        shown = os.path.join(where, name)
        if os.path.isdir(path) and not os.path.islink(path):
            raise OutputError(f"{shown}: exists and is a directory")
        for source in inputs:
            if _same(path, os.fspath(source)):
                raise OutputError(f"{shown}: the output would replace the input {os.fspath(source)}; "
                                  "choose another output folder or prefix")


def check_output_file(path: str | os.PathLike[str], *, inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """:func:`check_output_dir` for one output file."""
    where = os.fspath(path)
    if not where or "\0" in where:
        raise OutputError(f"{where!r}: not a valid output file")
    absolute = os.path.abspath(where)
    if os.path.isdir(absolute):
        raise OutputError(f"{where}: is a directory, not a file")
    try:
        check_output_dir(os.path.dirname(absolute), [os.path.basename(absolute)], inputs=inputs)
    except OutputError as e:
        message = str(e)
        raise OutputError(message if message.startswith(where) else f"{where}: {message}") from None


def check_distinct(outputs: Sequence[tuple[str, str | os.PathLike[str]]]) -> None:
    """Refuse two outputs at one path (e.g. ``--report OUT/model.onnx``); ``(what, path)`` pairs."""
    seen: dict[str, tuple[str, str]] = {}
    for what, path in outputs:
        key = _entry(os.fspath(path))
        if key in seen:
            raise OutputError(f"{os.fspath(path)}: both the {seen[key][0]} and the {what} would be written there")
        seen[key] = (what, os.fspath(path))
