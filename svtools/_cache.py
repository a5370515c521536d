"""The on-disk cache of trained runs: entries written atomically, verified on read, healed.

Layout: ``$SVTOOLS_CACHE/<kind>/<key>/`` (default ``~/.cache/svtools``) holds one run: its
``meta.json`` and its files. How an entry stays trustworthy:

* **Atomic writes.** A run is built in a sibling temporary directory (:func:`building`: name
  ``<prefix><random>``, with an ``owner.json`` naming the host, process namespace and pid that
  builds it) and moved into place by one ``os.replace`` (:func:`publish`): a reader sees a
  complete entry or none. When two processes build the same key, the first to publish wins; the
  other checks the winner's entry and drops its own copy.
* **One builder per entry.** :func:`lock` (``$SVTOOLS_CACHE/locks/<name>.lock``, ``flock``):
  the caller takes the entry's lock before building it and checks the cache again once it holds
  it, so a second process asking for a run that is being trained waits and then loads it instead
  of training it again.
* **Verified on read.** The caller compares ``meta.json`` with its request (config, seed, code
  version); :func:`files_problem` checks that every file is there with the size ``meta.json``
  recorded and, for safetensors files, that the header's tensors end exactly at the end of the
  file (which catches a truncated file even in an entry written before sizes were recorded).
* **Healed.** A damaged entry is moved aside and deleted (:func:`discard`) with a warning, and the
  run is rebuilt; if it cannot be removed (a read-only cache), the error gives the one command
  that clears it. A failed build (an exception, Ctrl-C) removes its directory at once; a build
  killed outright (SIGKILL, power loss) is removed by the next call (:func:`clean_stale`) once
  its process is gone (same host and process namespace) or, for directories of unknown or
  foreign owners, after a day without a write.
* **A location that cannot be used is named.** :func:`check_root` / :func:`building` raise
  :class:`SVToolsError` naming ``SVTOOLS_CACHE`` when it points to a file, below a file, or to a
  directory that cannot be written.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from svtools._checks import SVToolsError

ENV = "SVTOOLS_CACHE"
#: Directories of unknown or foreign owners are removed as stale after this long without a write.
STALE_SECONDS = 24 * 3600
_DISCARD = ".discard-"


class CacheWarning(UserWarning):
    """A cache entry was damaged (or of another request) and is rebuilt."""


def root() -> Path:
    """``$SVTOOLS_CACHE`` (default ``~/.cache/svtools``)."""
    return Path(os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "svtools"))


def _where() -> str:
    if os.environ.get(ENV):
        return f"{ENV}={os.environ[ENV]!r}"
    return f"the default cache directory {str(root())!r} ({ENV} is not set)"


def check_root(path: Path) -> None:
    """Raise naming ``SVTOOLS_CACHE`` if ``path`` or a parent of it is a file (nothing can be cached there)."""
    for p in (path, *path.parents):
        if p.exists() and not p.is_dir():
            raise SVToolsError(f"{_where()} cannot hold the cache: {str(p)!r} is a file, not a directory. Point "
                               f"{ENV} at a directory (or pass cache=False).")


def _unusable(path: Path, exc: OSError) -> SVToolsError:
    return SVToolsError(f"{_where()} cannot be written ({exc.strerror or exc} at {str(path)!r}). Point {ENV} at a "
                        "writable directory (or pass cache=False).")


def _owner() -> dict[str, Any]:
    """Who builds: host, boot and pid namespace (so a pid is only compared where it means the same
    process), pid and start time."""
    def read(p: str) -> str:
        try:
            return (os.readlink(p) if os.path.islink(p) else Path(p).read_text()).strip()
        except OSError:
            return ""
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"),
            "pidns": read("/proc/self/ns/pid"), "pid": os.getpid(), "started": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, ValueError, OverflowError):
        return False
    return True


def _last_write(path: Path) -> float:
    times = [path.stat().st_mtime]
    with contextlib.suppress(OSError):
        times += [f.stat().st_mtime for f in path.iterdir()]
    return max(times)


def _is_stale(path: Path) -> bool:
    """Whether a build directory was abandoned: its process is gone (same host, boot and pid
    namespace), or (owner unknown or elsewhere) nothing was written for :data:`STALE_SECONDS`."""
    try:
        owner = json.loads((path / "owner.json").read_text())
        me = _owner()
        if all(owner.get(k) == me[k] for k in ("host", "boot", "pidns")) and isinstance(owner.get("pid"), int):
            return owner["pid"] != me["pid"] and not _alive(owner["pid"])
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return time.time() - _last_write(path) > STALE_SECONDS
    except OSError:
        return False


def clean_stale(where: Path, prefix: str) -> list[Path]:
    """Remove abandoned build directories (``prefix*``) and leftovers of :func:`discard` in
    ``where``; return what was removed. Directories of live builds are never touched; errors
    (a read-only cache) are ignored."""
    removed = []
    try:
        entries = list(where.iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.is_dir():
            continue
        if p.name.startswith(_DISCARD) or (p.name.startswith(prefix) and _is_stale(p)):
            shutil.rmtree(p, ignore_errors=True)
            if not p.exists():
                removed.append(p)
    return removed


@contextlib.contextmanager
def building(where: Optional[Path], prefix: str) -> Iterator[Path]:
    """A fresh build directory in ``where`` (None: the system's temporary directory), removed if
    the block fails in any way (exception, KeyboardInterrupt). Raises naming ``SVTOOLS_CACHE``
    when ``where`` cannot be created or written."""
    if where is not None:
        check_root(where)
        try:
            where.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=str(where)))
            (tmp / "owner.json").write_text(json.dumps(_owner()))
        except OSError as exc:
            raise _unusable(where, exc) from exc
    else:
        tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with contextlib.suppress(OSError):
        (tmp / "owner.json").unlink()


def discard(path: Path, reason: str) -> None:
    """Remove the entry ``path`` (moved aside first, so no reader sees it half deleted) and warn
    why; if that is impossible, raise with the command that clears it."""
    trash = path.with_name(f"{_DISCARD}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:  # another process removed it first
        return
    except OSError as exc:
        raise SVToolsError(f"the cached run {str(path)!r} is damaged ({reason}) and cannot be removed here "
                           f"({exc.strerror or exc}). Remove it with:  rm -rf '{path}'") from exc
    shutil.rmtree(trash, ignore_errors=True)
    warnings.warn(f"svtools cache: {str(path)!r} was damaged ({reason}); it is removed and the run will be "
                  "retrained", CacheWarning, stacklevel=3)


def publish(tmp: Path, final: Path, is_good: Callable[[Path], bool]) -> Path:
    """Move the finished build ``tmp`` to ``final`` atomically. If another process published
    ``final`` first, keep its entry when ``is_good`` accepts it (and drop ``tmp``), else replace it."""
    with contextlib.suppress(OSError):
        (tmp / "owner.json").unlink()
    for _ in range(3):
        try:
            os.replace(tmp, final)
            return final
        except OSError:
            if final.is_dir() and is_good(final):
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            discard(final, "replaced by a complete run")
    raise SVToolsError(f"could not move the trained run into {str(final)!r}: other processes keep replacing it")


def read_meta(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """``(meta, None)`` from ``path/meta.json``, or ``(None, what is wrong)``."""
    f = path / "meta.json"
    try:
        text = f.read_text()
    except FileNotFoundError:
        return None, "meta.json is missing"
    except OSError as exc:
        return None, f"meta.json cannot be read ({exc.strerror or exc})"
    if not text.strip():
        return None, "meta.json is empty"
    try:
        meta = json.loads(text)
    except ValueError:
        return None, "meta.json is not valid JSON (truncated?)"
    if not isinstance(meta, dict):
        return None, "meta.json does not hold a record"
    return meta, None


def safetensors_problem(f: Path) -> Optional[str]:
    """What is wrong with the safetensors file ``f`` (missing, empty, truncated, padded), or None.

    Reads only the header: its tensors' byte ranges must end exactly at the end of the file.
    """
    try:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{f.name} is empty" if size == 0 else f"{f.name} is truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"{f.name} is truncated (header of {n} bytes in a file of {size})"
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        return f"{f.name} is missing"
    except OSError as exc:
        return f"{f.name} cannot be read ({exc.strerror or exc})"
    except ValueError:
        return f"{f.name} has an unreadable header"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, ValueError, AttributeError):
        return f"{f.name} has an unreadable header"
    if 8 + n + end != size:
        return f"{f.name} holds {size} bytes but its header describes {8 + n + end} (truncated or overwritten)"
    return None


def file_sizes(path: Path, names: list[str]) -> dict[str, int]:
    """``{name: size in bytes}`` of the files ``names`` in ``path`` (recorded in ``meta.json``)."""
    return {n: (path / n).stat().st_size for n in names}


def files_problem(path: Path, names: list[str], sizes: Optional[dict]) -> Optional[str]:
    """The first problem with the files ``names`` of the entry ``path``, or None: each must exist,
    have the size recorded in ``sizes`` (when the entry recorded them) and, for safetensors
    files, a header that matches the file's length."""
    for n in names:
        f = path / n
        if not f.is_file():
            return f"{n} is missing"
        if sizes is not None:
            want, got = sizes.get(n), f.stat().st_size
            if want != got:
                return f"{n} has {got} bytes, {want} were written"
        if n.endswith(".safetensors"):
            problem = safetensors_problem(f)
            if problem:
                return problem
    return None


@contextlib.contextmanager
def lock(name: str) -> Iterator[None]:
    """Hold the exclusive lock ``name`` of this cache (``$SVTOOLS_CACHE/locks/<name>.lock``,
    ``fcntl.flock``) inside the block; a second process asking for it waits until the first
    leaves the block (or dies: the kernel releases its lock). Where no lock can be taken (no
    ``fcntl``, a cache that cannot be written) the block runs unlocked: the atomic publish still
    leaves one good entry, at the cost of training twice."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    where = root() / "locks"
    try:
        check_root(where)
        where.mkdir(parents=True, exist_ok=True)
        fh = open(where / f"{name}.lock", "a+")
    except (OSError, SVToolsError):
        yield
        return
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()
