"""Checkpoints that a crash cannot corrupt, and the random state a resumed run needs to continue
exactly where it stopped.

- :func:`save_checkpoint` writes to a temporary file in the checkpoint's folder, flushes and
  fsyncs it, then renames it over the old checkpoint (``os.replace``, atomic on POSIX and
  Windows): at every moment ``path`` holds either the previous complete checkpoint or the new
  complete one. A failure while writing removes the temporary file and leaves ``path`` as it
  was, and a failure to write (a full disk, a read-only folder) is a
  :class:`CheckpointWriteError` naming the file and the operating system's reason. A process
  killed outright can leave its ``.<name>.<pid>.*.tmp`` file behind, never a partial ``path``:
  the next save (or :func:`remove_stale_temporaries`) removes the files of writers that are no
  longer running.
- Checkpoints are read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain
  Python values only and runs no code from the file; :func:`save_checkpoint` therefore refuses
  other values (numpy arrays, arbitrary objects) up front, naming where they are, rather than
  writing a checkpoint that could not be read back.
- :func:`load_checkpoint` first checks the CRC-32 that torch's zip writer stores for every
  record of the file (the pickle and each tensor's bytes; ``torch.load`` never checks them),
  then turns a truncated, corrupt or foreign file into a :class:`CheckpointError` that names
  the file, and a checkpoint written by a run with another
  configuration into a :class:`CheckpointMismatchError` listing each difference;
  :func:`load_module_state` does the same for parameter names and shapes.
- :func:`capture_rng_state` / :func:`restore_rng_state` cover Python's ``random``, numpy's
  global generator, torch's CPU generator, torch's CUDA generators (when CUDA is in use) and
  any ``torch.Generator`` objects the run owns, as tensors and plain values.

Exact resumption also needs every other piece of state saved (model, optimizer, scheduler,
step counter, data order) and deterministic kernels (CPU kernels are; on CUDA see
``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import math
import os
import random
import tempfile
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from impflow._warnings import warn_at_caller

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointWriteError",
    "NonFiniteStateError",
    "capture_rng_state",
    "load_checkpoint",
    "load_module_state",
    "remove_stale_temporaries",
    "restore_rng_state",
    "save_checkpoint",
]

_FORMAT = "impflow.checkpoint"
_FORMAT_VERSION = 1
# Values torch.load(weights_only=True) rebuilds (containers aside). Exact types: subclasses
# such as numpy.float64 (a float) or an IntEnum pickle as something else.
_ALWAYS_PLAIN = (type(None), bool, int, float, str, torch.Size, torch.dtype)
# Loadable on newer torch only (torch 2.4 refuses both: they pickle through the globals
# _codecs.encode and builtins.complex): found out once, by a round trip in memory.
_PLAIN_IF_LOADABLE = {bytes: b"\x00", complex: 1j}


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read: missing content, truncated, corrupt or foreign."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint that does not fit this run (configuration, parameter shapes)."""


class CheckpointWriteError(OSError):
    """:func:`save_checkpoint` could not write the file (a full disk, a read-only folder, ...);
    the checkpoint at ``path`` is unchanged. ``reason`` is the operating system's."""

    def __init__(self, message: str, path=None, reason: str = ""):
        super().__init__(message)
        self.path, self.reason = path, reason

    def __reduce__(self):  # keeps path and reason through pickling (sent to other ranks)
        return type(self), (str(self), self.path, self.reason)


class NonFiniteStateError(ValueError):
    """``save_checkpoint(require_finite=True)`` met NaN or Inf at ``where`` (nothing was
    written)."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where

    def __reduce__(self):
        return type(self), (str(self), self.where)


# ---------------------------------------------------------------------------------------------
# Saving


@functools.cache
def _plain_types() -> tuple[type, ...]:
    """The plain value types this torch's weights_only loader rebuilds."""
    loadable = []
    for kind, sample in _PLAIN_IF_LOADABLE.items():
        buffer = io.BytesIO()
        torch.save({"value": sample}, buffer)
        buffer.seek(0)
        try:
            torch.load(buffer, weights_only=True)
            loadable.append(kind)
        except Exception:  # the loader's refusal (its error type differs between versions)
            pass
    return _ALWAYS_PLAIN + tuple(loadable)


def _check_storable(value, where: str) -> None:
    """Raises TypeError naming the first value weights_only loading would refuse."""
    plain = _plain_types()
    if isinstance(value, Tensor) or type(value) in plain:
        return
    if type(value) in (dict, OrderedDict):  # subclasses (defaultdict, ...) would not load
        for key, item in value.items():
            if type(key) not in plain:
                raise TypeError(
                    f"{where} has a key of type {type(key).__name__}; checkpoint keys must be "
                    "str, int, float, bool or None"
                )
            _check_storable(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):  # named tuples and other subclasses would not load
        for i, item in enumerate(value):
            _check_storable(item, f"{where}[{i}]")
        return
    hint = (
        " (convert it with torch.from_numpy or .tolist())" if isinstance(value, np.ndarray) else ""
    )
    hint = hint or (" (use .item())" if isinstance(value, np.generic) else "")
    if type(value) in _PLAIN_IF_LOADABLE:
        raise TypeError(
            f"{where} is a {type(value).__name__}, which the weights_only loader of torch "
            f"{torch.__version__} cannot rebuild (newer torch can); store it as a tensor instead"
        )
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}, which a checkpoint "
        f"cannot hold: only tensors, numbers, strings, bytes, None and dicts, lists and tuples "
        f"of them are loadable with weights_only=True{hint}"
    )


def _first_non_finite(value, where: str) -> str | None:
    if isinstance(value, Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(
            torch.isfinite(value).all()
        ):
            return where
    elif isinstance(value, float):
        return None if math.isfinite(value) else where
    elif isinstance(value, Mapping):
        for key, item in value.items():
            found = _first_non_finite(item, f"{where}[{key!r}]")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_non_finite(item, f"{where}[{i}]")
            if found:
                return found
    return None


def _file_mode() -> int:
    """Permissions a plain ``open(path, "w")`` would give (mkstemp's are 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    """Makes the rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(path, state: Mapping, *, require_finite: bool = False) -> None:
    """Writes ``state`` to ``path`` atomically (see the module docstring).

    Args:
        path: the checkpoint file (``str`` or ``os.PathLike``); its folder must exist.
        state: a mapping of tensors and plain values (nested dicts, lists, tuples), e.g.
            ``{"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "rng": capture_rng_state(), "config": {...}}``.
        require_finite: refuse (ValueError, nothing written) when a floating tensor or float
            in ``state`` is NaN or infinite, so a diverged run never replaces a good
            checkpoint.

    Raises:
        TypeError: ``state`` holds a value a ``weights_only`` load could not rebuild.
        NonFiniteStateError: (a ValueError) ``require_finite`` and a non-finite value (its
            location is named).
        FileNotFoundError: the folder of ``path`` does not exist.
        CheckpointWriteError: (an OSError) writing failed: a full disk, a read-only folder...;
            ``path`` keeps the previous checkpoint.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a mapping (dict), got {type(state).__name__}")
    state = dict(state)
    _check_storable(state, "state")
    if require_finite:
        where = _first_non_finite(state, "state")
        if where is not None:
            raise NonFiniteStateError(
                f"{where} holds NaN or Inf; not saving, {os.fspath(path)} keeps its last good "
                "checkpoint",
                where,
            )
    path = Path(os.fspath(path))
    directory = path.parent
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save checkpoint {path}: folder {directory} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot save checkpoint {path}: it is a folder")
    payload = {"format": _FORMAT, "version": _FORMAT_VERSION, "state": state}
    remove_stale_temporaries(path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=directory, prefix=_temporary_prefix(path), suffix=".tmp"
        )
        with os.fdopen(fd, "wb") as f, _crc32_written():
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, _file_mode())
        os.replace(tmp_name, path)
    except BaseException as err:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
        cause = _os_error_in(err) if isinstance(err, Exception) else None  # not Ctrl-C
        if cause is None or isinstance(err, CheckpointWriteError):
            raise
        reason = os_reason(cause)
        raise CheckpointWriteError(
            f"cannot write checkpoint {path}: {reason}; {path} was left as it was", path, reason
        ) from err
    _fsync_directory(directory)


def os_reason(err: BaseException) -> str:
    """The operating system's words for ``err``: ``No space left on device (ENOSPC)``."""
    if isinstance(err, OSError) and err.strerror:
        code = errno.errorcode.get(err.errno) if err.errno is not None else None
        return f"{err.strerror} ({code})" if code else err.strerror
    return str(err) or type(err).__name__


def _os_error_in(err: BaseException) -> OSError | None:
    """``err`` or the OSError behind it (torch.save reports a failed write of its file object
    as a RuntimeError whose context is the OSError)."""
    for _ in range(8):  # a short chain; never loop on a cycle
        if err is None or isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


@contextlib.contextmanager
def _crc32_written():
    """torch's zip writer computes the records' CRC-32s (which :func:`load_checkpoint` checks)
    even where ``torch.serialization.set_crc32_options(False)`` turned them off."""
    serialization = torch.serialization
    if not getattr(serialization, "get_crc32_options", lambda: True)():
        serialization.set_crc32_options(True)
        try:
            yield
        finally:
            serialization.set_crc32_options(False)
    else:
        yield


# ---------------------------------------------------------------------------------------------
# Temporary files of killed writers


def _temporary_prefix(path: Path) -> str:
    """``.<name>.<pid>.``: the writer's process id tells a later run whether it still runs."""
    return f".{path.name}.{os.getpid()}."


def _writer_pid(file_name: str, name: str) -> int | None:
    """The writer's process id in a temporary file's name; None for names without one (written
    by impflow before they had it)."""
    middle = file_name[len(name) + 2 : -len(".tmp")]
    pid, dot, _ = middle.partition(".")
    return int(pid) if dot and pid.isdigit() else None


def _may_be_writing(pid: int | None) -> bool:
    """Whether process ``pid`` may still be writing its temporary file."""
    if pid is None or pid <= 0:
        return False
    if pid == os.getpid():
        return True  # this process (another thread's save): never ours to remove
    if os.name != "posix":
        return False  # Windows refuses to remove a file that a live process holds open
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists (owned by another user, say)
    return True


def remove_stale_temporaries(path) -> list[Path]:
    """Removes the ``.<name>.<pid>.*.tmp`` files that :func:`save_checkpoint` writers of
    ``path`` killed mid-save left behind: those whose process no longer runs on this machine
    (and those of older impflow versions, whose names have no process id). A live writer's
    file is kept. Returns the files removed; files that cannot be removed are left.
    """
    path = Path(os.fspath(path))
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    start = f".{path.name}."
    for entry in entries:
        if not (entry.name.startswith(start) and entry.name.endswith(".tmp")):
            continue
        if _may_be_writing(_writer_pid(entry.name, path.name)):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


# ---------------------------------------------------------------------------------------------
# Loading


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # e.g. an ambiguous comparison: treat as different
        return False


def _describe(value) -> str:
    if isinstance(value, Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(saved, expected: Mapping, where: str, assumed: Mapping) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"{where or 'the state'}: checkpoint has {_describe(saved)}, this run a mapping"]
    found = []
    for key, want in expected.items():
        name = f"{where}.{key}" if where else str(key)
        have = assumed.get(key, _MISSING) if key not in saved else saved[key]
        if have is _MISSING:
            found.append(f"{name}: missing from the checkpoint (this run has {_describe(want)})")
        elif isinstance(want, Mapping) and isinstance(have, Mapping):
            inner = assumed.get(key, {})
            found.extend(
                _differences(have, want, name, inner if isinstance(inner, Mapping) else {})
            )
        elif not _same(have, want):
            found.append(f"{name}: checkpoint has {_describe(have)}, this run {_describe(want)}")
    return found


_MISSING = object()


def _check_crc32s(path: Path) -> None:
    """Refuses a file whose bytes changed after it was written: torch's zip writer stores the
    CRC-32 of every record (the pickle, each tensor's bytes), which ``torch.load`` never checks.
    Reading the file once more costs about as much as loading it (0.10 s against 0.13 s for
    256 MB from the page cache, 2-core CPU), and the load then reads it from the cache."""
    with zipfile.ZipFile(path) as archive:
        records = archive.infolist()
        if records and all(r.CRC == 0 for r in records):
            return  # saved with torch.serialization.set_crc32_options(False): nothing to check
        bad = archive.testzip()
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its record {bad!r} fails its CRC-32 check (the "
            "file changed after it was written: a disk, copy or transfer error); it cannot be "
            "trusted, use another copy or start again"
        )


def load_checkpoint(
    path, *, expected: Mapping | None = None, assumed: Mapping | None = None, map_location="cpu"
) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint file.
        expected: entries the checkpoint must hold with these values, e.g.
            ``{"config": {"dims": [2, 64, 2], "dataset": "moons"}}``. Nested mappings are
            compared key by key (keys only in the checkpoint are ignored), lists and tuples
            alike elementwise, tensors by shape, dtype and values, other values with ``==``.
        assumed: values that an ``expected`` entry missing from the checkpoint is taken to
            have, nested like it: the defaults of settings that older checkpoints did not
            record, e.g. ``{"config": {"dtype": "float32"}}``.
        map_location: as in ``torch.load`` (default: tensors on the CPU).

    Returns:
        the ``state`` dict that was saved.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated, corrupt (a record fails its CRC-32 check), or
            not such a checkpoint.
        CheckpointMismatchError: an ``expected`` entry is missing or differs (all are listed).
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    try:
        _check_crc32s(path)
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # zip, pickle and weights_only errors all mean "unreadable"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} is unreadable: truncated, corrupt, or not written by "
            f"impflow's save_checkpoint ({type(err).__name__}: {reason[:200]})"
        ) from err
    if not (isinstance(payload, dict) and payload.get("format") == _FORMAT):
        raise CheckpointError(
            f"{path} is a torch file but not an impflow checkpoint (written by "
            "impflow.train.checkpoint.save_checkpoint)"
        )
    if payload.get("version") != _FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')!r}; this impflow "
            f"reads version {_FORMAT_VERSION}"
        )
    state = payload.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} has no state dict")
    if expected is not None:
        if not isinstance(expected, Mapping):
            raise TypeError(f"expected must be a mapping, got {type(expected).__name__}")
        found = _differences(state, expected, "", assumed or {})
        if found:
            raise CheckpointMismatchError(
                f"checkpoint {path} does not match this run:\n  " + "\n  ".join(found)
            )
    return state


def load_module_state(module: nn.Module, state_dict: Mapping, *, what: str = "model") -> None:
    """``module.load_state_dict(state_dict)`` after checking names and shapes, so a checkpoint
    of another architecture gives one :class:`CheckpointMismatchError` listing every missing,
    unexpected and differently shaped entry (and ``module`` is left untouched)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointMismatchError(
            f"the checkpoint's {what} state must be a mapping, got {type(state_dict).__name__}"
        )
    own = module.state_dict()
    problems = [f"missing from the checkpoint: {key}" for key in own if key not in state_dict]
    problems += [f"not in the {what}: {key}" for key in state_dict if key not in own]
    for key, mine in own.items():
        theirs = state_dict.get(key)
        if isinstance(mine, Tensor) and key in state_dict and not isinstance(theirs, Tensor):
            problems.append(f"{key}: checkpoint has {_describe(theirs)}, {what} a tensor")
        if isinstance(mine, Tensor) and isinstance(theirs, Tensor) and mine.shape != theirs.shape:
            problems.append(
                f"{key}: checkpoint shape {tuple(theirs.shape)}, {what} shape {tuple(mine.shape)}"
            )
    if problems:
        shown = problems[:20] + (
            [f"... and {len(problems) - 20} more"] if len(problems) > 20 else []
        )
        raise CheckpointMismatchError(
            f"the checkpoint's {what} state does not fit this {what}:\n  " + "\n  ".join(shown)
        )
    module.load_state_dict(state_dict, strict=True)


# ---------------------------------------------------------------------------------------------
# Random state


def capture_rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict:
    """The state of every random number generator a run draws from, storable in a checkpoint.

    Args:
        generators: the run's own ``torch.Generator`` objects by name (e.g. the data
            sampler's), saved too.

    Returns:
        ``{"python", "numpy", "torch", "cuda" (only when CUDA is initialised), "generators"}``,
        tensors and plain values only.
    """
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": (version, tuple(internal), gauss_next),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "generators": {},
    }
    # Reading CUDA states would initialise CUDA; a run that never did has drawn nothing there.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    for key, gen in (generators or {}).items():
        if not isinstance(gen, torch.Generator):
            raise TypeError(
                f"generators[{key!r}] must be a torch.Generator, got {type(gen).__name__}"
            )
        state["generators"][str(key)] = gen.get_state()
    return state


def _rng_part(state: Mapping, key: str):
    if key not in state:
        raise CheckpointError(f"the saved random state has no {key!r} entry")
    return state[key]


def restore_rng_state(
    state: Mapping, generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Puts every generator back in the state :func:`capture_rng_state` recorded.

    Args:
        state: what :func:`capture_rng_state` returned (possibly through a checkpoint).
        generators: the run's own generators by name; each must have been captured.

    Warns:
        RuntimeWarning: the state holds CUDA generator states that cannot be restored here
        (no CUDA, or another number of devices): CUDA draws will then differ.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"the saved random state must be a mapping, got {type(state).__name__}"
        )
    try:
        version, internal, gauss_next = _rng_part(state, "python")
        random.setstate((version, tuple(internal), gauss_next))
        saved = _rng_part(state, "numpy")
        np.random.set_state(
            (
                saved["name"],
                saved["keys"].numpy().astype(np.uint32),
                saved["pos"],
                saved["has_gauss"],
                saved["cached_gaussian"],
            )
        )
        torch.set_rng_state(_rng_part(state, "torch"))
    except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(
            f"the saved random state is malformed ({type(err).__name__}: {err})"
        ) from err
    cuda = state.get("cuda")
    saved_generators = state.get("generators", {})
    if not (cuda is None or isinstance(cuda, (list, tuple))) or not isinstance(
        saved_generators, Mapping
    ):
        raise CheckpointError(
            "the saved random state is malformed: 'cuda' must be a list and 'generators' a "
            f"mapping, got {type(cuda).__name__} and {type(saved_generators).__name__}"
        )
    for key, gen in (generators or {}).items():
        if key not in saved_generators:
            raise CheckpointError(
                f"the saved random state has no generator {key!r}; it has "
                f"{sorted(map(str, saved_generators)) or 'none'}"
            )
        try:
            gen.set_state(saved_generators[key])
        except (TypeError, RuntimeError) as err:
            raise CheckpointError(
                f"the saved random state of generator {key!r} is malformed ({err})"
            ) from err
    if cuda is not None:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warn_at_caller(
                f"the checkpoint holds the random state of {len(cuda)} CUDA device(s) but this "
                f"process has {have}: CUDA random draws will not continue exactly",
                RuntimeWarning,
            )
