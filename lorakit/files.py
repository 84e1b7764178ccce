"""Writing files and directories whole or not at all.

Everything lorakit writes for keeps (adapters, checkpoints, merged models, converted
models) is written under a temporary name beside its destination and renamed into place,
so a kill at any moment leaves either the old version or the new one, never a mixture
and never neither. A directory that replaces another is swapped in with two renames; if
a kill falls between them, the next write (or ``recover_directory``) puts the old one back.
A run holds its output directory's lock (``exclusive``), so that two never write there at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_path(final: Path) -> Path:
    """Where ``atomic_directory(final)`` builds the new version (several processes may write there)."""
    return final.with_name(f".{final.name}.tmp")


def _previous(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_directory(final: Path) -> None:
    """Undo what a killed ``atomic_directory`` left: restore the previous version if the
    new one never arrived, and remove half-written temporaries."""
    old = _previous(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    shutil.rmtree(temporary_path(final), ignore_errors=True)


MANIFEST = ".lorakit-files.json"  # the names lorakit wrote into a directory it may later replace
# Directories written before lorakit kept a manifest: what they may hold (adapters, merged
# models with their tokenizers, GGUF and Ollama exports, checkpoints).
_LEGACY_NAMES = re.compile(
    r"adapter|adapter_config\.json|adapter_model\.safetensors|training_config\.yaml|config\.json"
    r"|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer(_config)?\.json|tokenizer\.model|special_tokens_map\.json|added_tokens\.json|chat_template\.jinja"
    r"|vocab\.json|merges\.txt|[^/]+\.gguf|Modelfile|state\.json|optimizer\.(pt|safetensors)|rng-\d+\.safetensors"
    r"|eval")  # eval's default output, inside the adapter or model it scored


def _manifest(directory: Path) -> set[str] | None:
    """The names ``directory``'s manifest lists; None when it has none (or one that is not
    a list of names)."""
    try:
        listed = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return set(listed) if isinstance(listed, list) and all(isinstance(n, str) for n in listed) else None


def foreign_entries(directory: Path) -> list[str]:
    """What ``directory`` holds that lorakit did not write there (its manifest says what
    it did), so that replacing the directory would lose it."""
    if not directory.is_dir():
        return []
    ours = _manifest(directory)
    foreign = []
    for entry in sorted(directory.iterdir()):
        listed = _LEGACY_NAMES.fullmatch(entry.name) if ours is None else entry.name in ours
        # A directory lorakit wrote later into this one (eval's default output) lists its own files.
        written_later = entry.is_dir() and (entry / MANIFEST).is_file() and not foreign_entries(entry)
        if entry.name != MANIFEST and not listed and not written_later:
            foreign.append(entry.name)
    return foreign


def record_written(directory: Path, names: list[str]) -> None:
    """Add ``names`` to ``directory``'s manifest, for files lorakit writes into a directory
    it did not build whole (eval's scores). A directory that holds other files and no
    manifest is left without one: those files stay foreign."""
    listed = _manifest(directory)
    if listed is None:
        if any(p.name not in names for p in directory.iterdir() if p.name != MANIFEST):
            return
        listed = set()
    with atomic_file(directory / MANIFEST) as tmp:
        tmp.write_text(json.dumps(sorted(listed | set(names))))


def check_replaceable(directory: Path, key: str | None = None) -> None:
    """Refuse to replace a directory holding anything lorakit did not write there.

    Raises:
        InputError: naming ``key`` (the flag or setting that chose the directory), the
            directory and what it would lose.
    """
    from lorakit.errors import InputError

    foreign = foreign_entries(directory)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise InputError(f"{key + ': ' if key else ''}{directory} holds {shown}, which lorakit did not write; "
                         "replacing the directory would delete it. Move it away or choose another directory")


@contextmanager
def atomic_directory(final: str | os.PathLike, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; on success it becomes ``final``.

    An existing ``final`` is replaced only once the new directory is complete, and only
    when it holds nothing lorakit did not write (``check_replaceable``; the new directory
    records what it holds in its manifest). If the body raises, the temporary directory
    is removed and ``final`` is left as it was.

    Args:
        keep_existing: for a cache that several processes may fill at once: each builds
            in a temporary directory of its own, and whichever finishes second keeps the
            first one's result.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if keep_existing:
        tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        recover_directory(final)
        check_replaceable(final)
        tmp = temporary_path(final)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / MANIFEST).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
    if keep_existing and final.exists():
        shutil.rmtree(tmp)
    elif final.exists():
        old = _previous(final)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` in one rename."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)


LOCK = ".lorakit.lock"


@contextmanager
def exclusive(directory: Path, key: str) -> Iterator[None]:
    """Hold ``directory``'s lock for the block: a second lorakit process writing there is
    refused instead of interleaving its checkpoints and adapter with this one's. The
    operating system drops the lock when the process ends, however it ends.

    Raises:
        InputError: naming ``key`` and the directory, when another process holds it.
    """
    import fcntl

    from lorakit.errors import InputError

    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / LOCK, "a")  # noqa: SIM115 — closed below, after the block
    except OSError as e:
        raise InputError(f"{key}: cannot create {directory} ({e.strerror or e})") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{key}: another lorakit process is writing to {directory}; wait for it to finish "
                             "or choose another directory") from None
        yield


def check_inputs_survive(written: list[Path], inputs: dict[str, str | None], key: str) -> None:
    """Refuse to write a path that is, or holds, one of the command's inputs.

    Args:
        written: what the command writes (files or directories it replaces).
        inputs: each input's flag or setting and its path (absent ones, such as hub
            names, are skipped).
        key: the flag or setting that chose where to write.

    Raises:
        InputError: naming ``key``, the path written and the input it holds.
    """
    from lorakit.errors import InputError

    for name, value in inputs.items():
        if not value or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        for target in written:
            resolved = target.expanduser().resolve()
            if path == resolved or resolved in path.parents:
                raise InputError(f"{key}: lorakit writes {target}, which holds {name} ({value}); choose another "
                                 f"{key} or move the input")


def overlaps(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` are the same path or one contains the other (links resolved)."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def check_output_dir(output: Path, inputs: list[str | os.PathLike], force: bool) -> None:
    """Refuse an output directory that would overwrite an input, that is a file, or that
    is not empty (unless ``force``).

    Raises:
        InputError: naming the output and the input it would destroy.
    """
    from lorakit.errors import InputError

    for source in inputs:
        if Path(source).expanduser().exists() and overlaps(output, source):
            raise InputError(f"--output {output} is, contains or lies inside the input {source}: "
                             "writing there would destroy it; choose another directory")
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file, not a directory")
    if output.exists() and any(output.iterdir()) and not force:
        raise InputError(f"--output {output} exists and is not empty; pass --force to replace it")
    check_replaceable(output, "--output")
