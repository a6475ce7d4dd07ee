"""Output: sharded safetensors written tensor by tensor, into a folder that appears only when complete.

The shard layout is planned up front from the tensors' shapes and dtypes, so each shard's safetensors header is
written first and every tensor is streamed to disk as soon as it is produced: memory holds one tensor, not one
shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoints import _SAFETENSORS_DTYPES

logger = logging.getLogger(__name__)

# every dtype the reader accepts can be written back (a copied buffer keeps its dtype)
_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class OutputExistsError(FileExistsError):
    """The output folder exists and overwriting was not asked for."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_shard_size`` bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if current and size + spec.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += spec.nbytes
    if current:
        shards.append(current)
    return shards


def shard_file_names(count: int, prefix: str = "model") -> list[str]:
    """Hugging Face's names: ``model.safetensors`` or ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


class ShardedSafetensorsWriter:
    """Writes planned tensors, in plan order, as sharded safetensors with an index.

    Example:
        >>> specs = [TensorSpec("a", (2, 2), torch.float32)]
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     w = ShardedSafetensorsWriter(d, specs, max_shard_size=1_000)
        ...     w.write("a", torch.ones(2, 2))
        ...     _ = w.close()
        ...     sorted(os.listdir(d))
        ['model.safetensors']
    """

    def __init__(self, folder: str | os.PathLike, specs: Sequence[TensorSpec], max_shard_size: int,
                 prefix: str = "model", metadata: dict[str, str] | None = None) -> None:
        unwritable = [spec for spec in specs if spec.dtype not in _DTYPE_NAMES]
        if unwritable:
            spec = unwritable[0]
            raise ValueError(f"Tensor {spec.name!r} has dtype {spec.dtype}, which safetensors cannot store: cast it "
                             f"to one of {sorted(str(d) for d in _DTYPE_NAMES)} before saving.")
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_size)
        self.names = shard_file_names(len(self.shards), prefix)
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [spec for shard in self.shards for spec in shard]
        self._next = 0
        self._shard_of = {spec.name: i for i, shard in enumerate(self.shards) for spec in shard}
        self._file = None
        self._open_shard = -1

    def _start_shard(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        header: dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for spec in self.shards[index]:
            header[spec.name] = {"dtype": _DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.folder / self.names[index], "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._open_shard = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the plan (names must come in plan order, with the planned shape/dtype)."""
        if self._next >= len(self._order):
            raise RuntimeError(f"Tensor {name!r} was not planned: all planned tensors were already written.")
        spec = self._order[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(f"Expected {spec} next, got {name} {tuple(tensor.shape)} {tensor.dtype}.")
        shard = self._shard_of[name]
        if shard != self._open_shard:
            self._start_shard(shard)
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._file.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # no extra copy
        self._next += 1

    def close(self) -> dict:
        """Finish the last shard and write the index (for more than one shard). Returns the weight map."""
        if self._next != len(self._order):
            missing = [s.name for s in self._order[self._next:]][:3]
            raise RuntimeError(f"Output incomplete: {len(self._order) - self._next} tensors not written, e.g. {missing}.")
        if self._file is not None:
            self._file.close()
            self._file = None
        weight_map = {spec.name: self.names[self._shard_of[spec.name]] for spec in self._order}
        if len(self.shards) > 1:
            # the metadata transformers writes: bytes and parameter count of all tensors
            metadata = {"total_parameters": sum(s.numel for s in self._order),
                        "total_size": sum(s.nbytes for s in self._order)}
            index = {"metadata": metadata, "weight_map": weight_map}
            with open(self.folder / f"{self.prefix}.safetensors.index.json", "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
        return weight_map

    def abort(self) -> None:
        """Close the open shard, if any. Its folder is deleted anyway, so a failing close (the flush of a full disk)
        is not raised: the error that stopped the save is the one to report."""
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(OSError):
                file.close()


def holds_output(target: str | os.PathLike) -> bool:
    """Whether ``target`` exists and is not an empty folder: writing there would replace something."""
    target = Path(target).expanduser()
    return target.exists() and not (target.is_dir() and not any(target.iterdir()))


def replace_problem(target: str | os.PathLike, marker: str | None = None) -> str | None:
    """Why replacing the existing folder ``target`` wholesale would destroy what it must not, or None.

    Replacing deletes everything in the folder: the current directory, a folder above it and the home folder are
    never replaced, and with ``marker`` a non-empty folder is replaced only if it holds that file (the sign of an
    earlier output), so that ``--out ~/models --overwrite`` cannot delete a collection of models.
    """
    target = Path(target).expanduser().absolute()
    if target.is_symlink() and not target.exists():
        return (f"{target} is a symbolic link to {os.readlink(target)}, which does not exist: create that folder "
                "or name another one for the output.")
    if not target.is_dir() or not holds_output(target):
        return None  # nothing there, or an empty folder, which is filled in place
    resolved, cwd = target.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        return (f"{target} is the current directory or a folder above it: the output takes its place whole, which "
                "would delete the folder you work in. Name a new folder for the output.")
    if resolved == Path.home().resolve():
        return f"{target} is the home folder: name a new folder for the output."
    debris = _killed_saves(target, (".partial-",))
    if debris and all(entry in debris for entry in target.iterdir()):
        names = ", ".join(entry.name for entry in debris)
        return (f"{target} holds only {names}: half-written files of a save into this folder that was killed "
                "before it finished (unless a save into it is running now). Delete them and save again.")
    if marker is not None and holds_output(target) and not (target / marker).is_file():
        return (f"{target} is not empty and holds no {marker}, so it is not an earlier output of this tool; "
                "replacing it would delete everything in it. Name a new folder, or empty or delete this one "
                "yourself.")
    if os.path.ismount(target):
        return (f"{target} is a mount point, so the new output cannot take its place: empty it (an empty folder "
                "is filled in place) or name a folder inside it.")
    return None


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; move it to ``target`` only when the block succeeds.

    On any exception (KeyboardInterrupt included) the temporary folder is deleted and ``target`` is left as it
    was. An existing ``target`` is replaced only with ``overwrite=True``, only after the new one is complete, and
    never where :func:`replace_problem` (with ``marker``) objects. An existing empty folder is filled in place
    instead (it may be a mount point, or sit in a folder that cannot be written): the temporary folder is inside
    it, and its files move up when the block succeeds.
    """
    target = Path(target).expanduser().absolute()
    if target.is_symlink() and target.exists():
        target = target.resolve()  # a link to a folder elsewhere (a bigger disk, say): the output goes there
    if not holds_output(target):
        overwrite = True  # an empty folder holds nothing to lose (e.g. one made ahead for the output)
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} exists and is not a folder.")
    problem = replace_problem(target, marker)  # first: overwrite=True would not help
    if problem:
        raise OutputExistsError(problem)
    if target.exists() and not overwrite:
        raise OutputExistsError(f"{target} already exists: choose another folder or pass overwrite=True.")
    if target.is_dir() and not holds_output(target):
        # an empty folder made ahead may be a mount point or sit in a folder we cannot write: fill it in place
        with _filled_in_place(target) as tmp:
            yield tmp
        return
    debris = _killed_saves(target.parent, (f".{target.name}.partial-", f".{target.name}.old-"))
    if debris:
        logger.warning("%s holds %s, left by an earlier save of %s that was killed before it finished (an "
                       "'.old-' folder holds the output that save was replacing), unless a save of it is running now; "
                       "they are not used: delete them to free the space.", target.parent,
                       ", ".join(p.name for p in debris), target.name)
    made = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # innermost first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except BaseException:
        _remove_made(made)
        raise
    try:
        with contextlib.suppress(OSError):  # some mounted file systems refuse it; the folder works all the same
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is an ordinary folder
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise
    old = None
    try:
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            try:
                os.replace(target, old / "out")
            except OSError as exc:
                raise OutputExistsError(
                    f"{target} could not be moved aside for the new output ({exc.strerror}; a mount point cannot "
                    "be): empty it and save again (an empty folder is filled in place), or name a folder inside "
                    "it.") from exc
        os.replace(tmp, target)
    except BaseException:  # Ctrl-C included: whatever step it hit, leave target as it was and no debris
        replaced = not tmp.exists()  # the new folder took target's place before the interruption
        if not replaced:
            if old is not None and (old / "out").exists() and not target.exists():
                os.replace(old / "out", target)
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_made(made)
        if old is not None:
            if replaced or not (old / "out").exists():
                shutil.rmtree(old, ignore_errors=True)
            else:  # something took target's name meanwhile: never delete the previous output
                logger.warning("The previous content of %s was kept in %s", target, old / "out")
        raise
    if old is not None:
        try:
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:  # Ctrl-C half way through: the new output is in place, the old one must still go
            shutil.rmtree(old, ignore_errors=True)
            raise
    logger.info("Wrote %s", target)


def _killed_saves(folder: Path, prefixes: tuple[str, ...]) -> list[Path]:
    """The temporary folders named ``prefixes`` (see atomic_directory and _filled_in_place) that a save killed
    outright (no Python cleanup runs on SIGKILL) left in ``folder``."""
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not entry.is_symlink()
                  and entry.name.startswith(prefixes))


def _remove_made(made: list[Path]) -> None:
    """Remove the parent folders made for an output that was not written (innermost first), unless something
    else was put there meanwhile."""
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def _filled_in_place(target: Path) -> Iterator[Path]:
    """Yield a temporary folder inside the empty folder ``target``; move its files up only when the block
    succeeds, else leave ``target`` empty again."""
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=target))
    moved: list[Path] = []
    try:
        with contextlib.suppress(OSError):  # as in atomic_directory
            os.chmod(tmp, 0o755)
        yield tmp
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, target / entry.name)
            moved.append(target / entry.name)
        tmp.rmdir()
    except BaseException:
        for path in moved:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Wrote %s", target)
