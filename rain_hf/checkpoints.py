"""Where checkpoints come from and how their tensors are read: one tensor at a time, straight from the file.

A model is named by a Hub id or a local folder (:func:`resolve_model`); its weights are read lazily from
safetensors (:class:`LazyCheckpoint`), so only the tensor being merged sits in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

logger = logging.getLogger(__name__)

def _any_case(prefix: str) -> str:
    """A Hub file pattern (fnmatch, case-sensitive) for names starting with ``prefix`` in any case."""
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in prefix) + "*"


#: How licence files start (in any case): ``LICENSE``, ``LICENCE.txt``, ``COPYING``, ``NOTICE``, ``USE_POLICY.md``.
LICENSE_NAMES = ("license", "licence", "copying", "notice", "use_policy")
#: Files fetched from the Hub for a full model: weights, configs, tokenizer, code for ``trust_remote_code`` (copied
#: into the merge, never run by it), licence files; never .bin/.pt/.gguf duplicates.
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "vocab*",
                  "merges.txt", "README.md", "*.py", *(_any_case(name) for name in LICENSE_NAMES)]
#: Files never fetched for a full model: Mistral-style repositories ship the whole model a second time in the
#: native format (``consolidated.safetensors``) beside the transformers shards.
MODEL_IGNORE_PATTERNS = ["consolidated*.safetensors"]
#: Files fetched from the Hub for a peft adapter.
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors", "README.md"]

_EDGE_BYTES = 4096  # per tensor end, for checkpoint_fingerprint
_PIECES, _PIECE_BYTES = 64, 64  # reads spread over every tensor, for checkpoint_fingerprint
FINGERPRINT_VERSION = "2"  # prefixed to checkpoint_fingerprint: version 1 hashed the tensor ends only
# anchored at the end: a subfolder of a snapshot is another model than the repository's root
# (repositories without an owner, such as "gpt2", are cached as models--gpt2)
_CACHE_SNAPSHOT = re.compile(
    r"models--(?:(?P<org>[^/\\]+?)--)?(?P<name>[^/\\]+)[/\\]snapshots[/\\](?P<sha>[0-9a-f]{40})[/\\]?$")


def snapshot_repo_id(match: re.Match[str]) -> str:
    """The Hub id of a :data:`_CACHE_SNAPSHOT` match."""
    return f"{match['org']}/{match['name']}" if match["org"] else match["name"]


class CheckpointError(ValueError):
    """A checkpoint cannot be found, read, or merged with the others."""


class ModelNameError(CheckpointError):
    """A model name that names no model: a file, a malformed Hub id, or a repository or revision the Hub lacks."""


@dataclass
class ModelSource:
    """A model input after resolution.

    Attributes:
        name_or_path: what the user passed.
        path: the local folder holding the files.
        hub_id: the Hub repository id, also when a local folder is a Hub cache snapshot (``None`` if unknown).
        revision: the Hub commit or revision the files came from (``None`` if unknown).
    """

    name_or_path: str
    path: Path
    hub_id: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        return self.hub_id or str(self.path)

    def to_dict(self) -> dict[str, str | None]:
        return {"name_or_path": self.name_or_path, "path": str(self.path), "hub_id": self.hub_id,
                "revision": self.revision}


def _hub_identity_of_folder(folder: Path) -> tuple[str | None, str | None]:
    """(hub id, commit) of a Hub cache snapshot folder (read from its path); (None, None) for any other folder."""
    match = _CACHE_SNAPSHOT.search(str(folder.resolve()))
    if match:
        return snapshot_repo_id(match), match["sha"]
    return None, None


def _incomplete_snapshot_hint(folder: Path) -> str:
    """For a Hub cache snapshot: how to complete it (an offline or interrupted download leaves files out)."""
    hub_id, sha = _hub_identity_of_folder(folder)
    if not hub_id:
        return ""
    return (f" This is the Hub cache's snapshot of {hub_id}, which may be incomplete (a download that was "
            f"interrupted, or one that fetched only the config or tokenizer): complete it with the Hub reachable, "
            f"`hf download {hub_id} --revision {sha}`.")


def resolve_model(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
    role: str | None = None,
) -> ModelSource:
    """Find a model's files: a local folder as it is, or a Hub id fetched with ``allow_patterns`` only.

    Args:
        name_or_path: a local folder or a Hub repository id (``"org/name"``).
        revision: a Hub branch, tag or commit.
        token: a Hub token (``None``: the logged-in one).
        allow_patterns: which files to fetch from the Hub (default :data:`MODEL_PATTERNS`).
        role: the model's role in the merge (``"base"``, ``"reasoning"``, ``"instruct"``), used in errors.

    Example:
        >>> src = resolve_model("benchmarks/organism/checkpoints/base")
        >>> src.path.is_dir(), src.hub_id
        (True, None)
    """
    text = os.fspath(name_or_path)
    who = f"{role} model" if role else "model"
    local = Path(text).expanduser()
    if local.is_dir():
        hub_id, sha = _hub_identity_of_folder(local)
        if revision is not None and revision != sha:
            # the folder's files are what they are: recording the revision would misstate where they came from
            logger.warning("revision=%r is ignored for the %s: %s is a local folder, read as it is (a revision "
                           "picks a commit of a Hub id).", revision, who, text)
        return ModelSource(text, local.resolve(), hub_id, sha)
    if local.exists():
        raise ModelNameError(f"The {who} {text!r} is a file; pass the folder that holds config.json and "
                              "the safetensors weights.")
    written_as_path = text.startswith((".", "/", "~"))
    looks_local = written_as_path or os.sep in text.strip("/").split("/", 1)[-1] or text.count("/") > 1
    if looks_local or not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", text):
        parts = text.split("/")
        hint = ""
        if len(parts) > 2 and not written_as_path and all(
                re.fullmatch(r"[\w.\-]+", part) for part in parts):
            # peft pushes a named adapter into a subfolder, and a Trainer's repository holds checkpoint-N/
            repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
            hint = (f" If {sub!r} is a subfolder of the Hub repository {repo!r}, download it and pass the local "
                    f"folder: `hf download {repo} --include '{sub}/*' --local-dir DIR`, then DIR/{sub}.")
        elif "@" in text:  # mergekit's name@revision
            hint = (" A revision is given on its own: revision=... in Python, {path: ..., revision: ...} in a "
                    "rain-merge YAML.")
        elif "+" in text:  # mergekit's model+lora
            hint = " A LoRA adapter is passed as the instruct model itself; its adapter_config.json names the base."
        raise ModelNameError(f"The {who} {text!r} is neither an existing local folder nor a valid Hub id "
                              f"('org/name'). Check the path.{hint}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(text, revision=revision, token=token,
                                   allow_patterns=allow_patterns or MODEL_PATTERNS,
                                   ignore_patterns=None if allow_patterns else MODEL_IGNORE_PATTERNS)
    except RevisionNotFoundError as exc:
        raise ModelNameError(f"The {who} {text!r} has no revision {revision!r} on the Hub.") from exc
    except GatedRepoError as exc:
        raise CheckpointError(f"The {who} {text!r} is gated: accept its licence on the Hub and pass a "
                              "token (token=... or `hf auth login`).") from exc
    except RepositoryNotFoundError as exc:
        raise ModelNameError(f"The {who} {text!r} was not found on the Hub (or is private: pass a "
                              f"token), and no local folder {local.resolve()} exists either.") from exc
    except LocalEntryNotFoundError as exc:
        what = f"Revision {revision!r} of the {who} {text!r}" if revision else f"The {who} {text!r}"
        raise CheckpointError(f"{what} is not in the local Hub cache and the Hub cannot be reached (offline?), and "
                              f"no local folder {local.resolve()} exists either. Download it first or pass a local "
                              "folder.") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"Fetching the {who} {text!r} from the Hub failed: {exc}") from exc
    _, sha = _hub_identity_of_folder(Path(folder))
    return ModelSource(text, Path(folder), text, sha or revision)


class TensorSource(Protocol):
    """Anything the merge can read named tensors from, one at a time."""

    def keys(self) -> list[str]: ...

    def shape(self, key: str) -> tuple[int, ...]: ...

    def get(self, key: str) -> torch.Tensor: ...


class LazyCheckpoint:
    """Tensors of a safetensors checkpoint folder, read one at a time (a positioned read of its bytes).

    Handles a single ``model.safetensors``, a sharded checkpoint with ``model.safetensors.index.json``, or any
    set of ``*.safetensors`` files in the folder.

    Example:
        >>> ckpt = LazyCheckpoint("benchmarks/organism/checkpoints/base")
        >>> ckpt.get("model.layers.0.self_attn.q_proj.weight").shape
        torch.Size([192, 192])
    """

    def __init__(self, folder: str | os.PathLike, name: str | None = None, prefix: str = "model") -> None:
        self.folder = Path(folder)
        self.name = name or str(folder)
        index = self.folder / f"{prefix}.safetensors.index.json"
        single = self.folder / f"{prefix}.safetensors"
        if single.is_file() and index.is_file():
            # transformers loads the single file then: reading the shards would merge another model than the one
            # loaded for the forward passes
            logger.warning("%s holds both %s and %s; transformers loads %s, and so does rain_hf. If the shards are "
                           "the checkpoint you meant, delete the stale %s.", self.name, single.name, index.name,
                           single.name, single.name)
        if index.is_file() and not single.is_file():
            document = read_json(index, self.name)
            weight_map = document.get("weight_map") if isinstance(document, dict) else None
            if not (isinstance(weight_map, dict) and weight_map
                    and all(isinstance(v, str) for v in weight_map.values())):
                raise CheckpointError(f"{self.name}: {index} has no valid 'weight_map' (tensor name → shard file). "
                                      "The checkpoint is damaged: download or save it again.")
            files = sorted(set(weight_map.values()))
            # shard names are file names in the folder (transformers joins them to it): a name that climbs out of
            # it or is absolute would feed another file into the merge and the upload
            astray = [f for f in files if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == ".."
                      or "\\" in f]
            if astray:
                raise CheckpointError(f"{self.name}: {index} names the shard {astray[0]!r}, outside the checkpoint's "
                                      "folder; shards are files in the folder. The index is damaged: download or "
                                      "save the checkpoint again.")
        else:
            # an adapter or a Mistral-style consolidated copy in the same folder is not part of the model
            files = [single.name] if single.is_file() else sorted(
                p.name for p in self.folder.glob("*.safetensors")
                if not p.name.startswith(("adapter_model", "consolidated")))
            weight_map = {}
        # what transformers can load: the single file, or shards with their index (not a bare set of files)
        self.loadable_layout = single.is_file() or index.is_file()
        self.files = list(files)
        if not files:
            bins = [p.name for p in self.folder.glob("*.bin")] + [p.name for p in self.folder.glob("*.pt")]
            hint = (f" It holds {bins[:3]}: convert them to safetensors first (load the model with transformers and "
                    "call save_pretrained(..., safe_serialization=True)).") if bins else ""
            hub_id, _ = _hub_identity_of_folder(self.folder)
            if hub_id and not bins:  # only safetensors are fetched from the Hub
                hint = (f" The Hub repository {hub_id} may ship only PyTorch .bin weights, which rain_hf does not "
                        "download: load it with transformers and save_pretrained it to a local folder, or pass a "
                        "revision that has safetensors (such as the Hub conversion bot's refs/pr/N)."
                        + _incomplete_snapshot_hint(self.folder).replace(" This is", " Or: this is", 1))
            raise CheckpointError(f"No safetensors weights in {self.name} ({self.folder}).{hint}")
        self._where: dict[str, str] = {}
        self._entries: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
        elsewhere: dict[str, str] = {}  # tensors a listed shard holds though the index names another shard
        for file in files:
            for key, entry in _read_header(self.folder / file, self.name).items():
                if weight_map.get(key, file) != file:
                    elsewhere.setdefault(key, file)
                    continue  # the index names another shard for it
                if key in self._where:
                    where = (f"and {index.name} does not say which" if weight_map else
                             "and no index says which")
                    raise CheckpointError(f"{self.name}: tensor {key} is in both {self._where[key]} and {file}, "
                                          f"{where}. Remove the stray file from {self.folder}, or write a "
                                          f"{prefix}.safetensors.index.json that names one.")
                self._where[key] = file
                self._entries[key] = entry
        missing = sorted(set(weight_map) - set(self._where))
        misplaced = [key for key in missing if key in elsewhere]
        if misplaced:
            key = misplaced[0]
            raise CheckpointError(f"{self.name}: {index.name} names {weight_map[key]} for tensor {key} (and "
                                  f"{len(misplaced) - 1} more), but it is in {elsewhere[key]}: the index is wrong. "
                                  "Save the checkpoint again (or correct the index's weight_map).")
        if missing:
            raise CheckpointError(f"{self.name}: the index names tensors that no shard holds, e.g. {missing[:3]}. "
                                  "The checkpoint is incomplete: download it again."
                                  + _incomplete_snapshot_hint(self.folder))
        doubled = sorted(key for key in elsewhere if key in self._where)
        if doubled:  # transformers reads every listed shard, so its model may hold the other copy
            key = doubled[0]
            raise CheckpointError(f"{self.name}: tensor {key} (and {len(doubled) - 1} more) is stored in both "
                                  f"{self._where[key]} and {elsewhere[key]}; {index.name} names "
                                  f"{self._where[key]}, but transformers reads every shard the index lists, so the "
                                  "model it loads may hold the other copy. Save the checkpoint again, with each "
                                  "tensor in one shard.")

    def readable(self, key: str) -> bool:
        """Whether ``key``'s stored dtype is one rain_hf can read (and so copy into a merge)."""
        return self._entries[key][1] in _SAFETENSORS_DTYPES

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return _torch_dtype(self._entries[key][1], key, self.name)

    def edge_bytes(self, key: str, n: int) -> bytes:
        """The first and the last ``n`` bytes of ``key``'s data (all of it when shorter than ``2n``)."""
        _, _, start, end = self._entries[key]
        with open(self.folder / self._where[key], "rb") as f:
            f.seek(start)
            if end - start <= 2 * n:
                return f.read(end - start)
            head = f.read(n)
            f.seek(end - n)
            return head + f.read(n)

    def spread_bytes(self, key: str, pieces: int, size: int) -> bytes:
        """``pieces`` reads of ``size`` bytes spread evenly over ``key``'s data, first and last included (all of
        it when that is shorter)."""
        _, _, start, end = self._entries[key]
        with open(self.folder / self._where[key], "rb") as f:
            if end - start <= pieces * size:
                f.seek(start)
                return f.read(end - start)
            chunks = []
            for i in range(pieces):
                f.seek(start + (end - start - size) * i // (pieces - 1))
                chunks.append(f.read(size))
            return b"".join(chunks)

    def row_bytes(self, key: str, rows: Iterable[int]) -> bytes:
        """The bytes of whole rows of the 2-D tensor ``key`` (rows out of range are skipped)."""
        shape, _, start, end = self._entries[key]
        if len(shape) != 2 or not shape[0]:
            return b""
        width = (end - start) // shape[0]
        chunks = []
        with open(self.folder / self._where[key], "rb") as f:
            for row in rows:
                if 0 <= row < shape[0]:
                    f.seek(start + row * width)
                    chunks.append(f.read(width))
        return b"".join(chunks)

    def stored_dtype(self, key: str) -> str:
        """The safetensors dtype name of ``key`` (``"BF16"``, ``"F8_E8M0"`` …), also for dtypes torch cannot read."""
        return self._entries[key][1]

    def get(self, key: str) -> torch.Tensor:
        """The tensor ``key`` as stored (dtype and values exactly as in the file), on the CPU.

        Read with a plain positioned read rather than a memory map, so pages of tensors already merged do not
        stay resident.
        """
        if key not in self._where:
            raise KeyError(f"{self.name} has no tensor {key!r}")
        shape, dtype, start, end = self._entries[key]
        buf = bytearray(end - start)
        with open(self.folder / self._where[key], "rb") as f:
            f.seek(start)
            if f.readinto(buf) != len(buf):
                raise CheckpointError(f"{self.name}: {self._where[key]} is truncated (tensor {key}).")
        torch_dtype = _torch_dtype(dtype, key, self.name)
        if not buf:
            return torch.empty(shape, dtype=torch_dtype)
        return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)

    def nbytes(self) -> int:
        return sum(end - start for _, _, start, end in self._entries.values())


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


_ITEMSIZE = {name: dtype.itemsize for name, dtype in _SAFETENSORS_DTYPES.items()}


def work_dtype(stored: torch.dtype) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is merged in: float32, or float64 for float64 checkpoints (so that a
    merge that changes nothing gives back the stored values exactly)."""
    return torch.promote_types(stored, torch.float32)


def _torch_dtype(dtype: str, key: str, name: str) -> torch.dtype:
    # checked when a tensor is used, so an exotic buffer the merge never reads does not block the checkpoint
    if dtype not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{name}: tensor {key} has dtype {dtype}, which rain_hf cannot read.")
    return _SAFETENSORS_DTYPES[dtype]


def _read_header(path: Path, name: str) -> dict[str, tuple[tuple[int, ...], str, int, int]]:
    """Tensor name → (shape, safetensors dtype, absolute start, end) from a safetensors file's header."""
    if not path.is_file():
        raise CheckpointError(f"{name}: shard {path.name} is missing from {path.parent}."
                              + _incomplete_snapshot_hint(path.parent))
    file_size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if file_size < 8:
                raise CheckpointError(f"{name}: {path} is truncated: it has {file_size} bytes, fewer than a "
                                      "safetensors file's 8-byte header length. Download or save the checkpoint again.")
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            if 8 + size > file_size:  # cut off inside its header: JSON's error would not say so
                raise CheckpointError(f"{name}: {path} is truncated: its header needs {8 + size} bytes, the file has "
                                      f"{file_size}. Download or save the checkpoint again.")
            header = json.loads(f.read(size))
            if not isinstance(header, dict):
                raise ValueError(f"its header is a JSON {type(header).__name__}, not an object")
    except CheckpointError:
        raise  # a ValueError too: said already
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{name}: {path} is not a valid safetensors file ({exc}): download or save the "
                              "checkpoint again.") from exc
    entries = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            shape = tuple(meta["shape"])
            # as safetensors requires: a negative offset would read the header as data
            if not all(type(n) is int and n >= 0 for n in (start, end, *shape)) or start > end:
                raise ValueError(f"offsets {[start, end]} and shape {list(shape)} must be integers ≥ 0, in order")
            itemsize = _ITEMSIZE.get(str(meta["dtype"]))
            if itemsize is not None and end - start != math.prod(shape) * itemsize:
                raise ValueError(f"shape {list(shape)} of {meta['dtype']} needs {math.prod(shape) * itemsize} bytes, "
                                 f"its offsets give {end - start}")
            if 8 + size + end > file_size:
                raise CheckpointError(f"{name}: {path} is truncated: tensor {key} ends at byte {8 + size + end}, "
                                      f"the file has {file_size}. Download or save the checkpoint again.")
            entries[key] = (shape, str(meta["dtype"]), 8 + size + start, 8 + size + end)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{name}: {path} has a damaged header entry for {key} ({exc}); download or "
                                  "save the checkpoint again.") from exc
    previous_end, previous = 0, None
    for key, (_, _, start, end) in sorted(entries.items(), key=lambda item: item[1][2:]):
        if start < previous_end:  # safetensors itself refuses such a file: two tensors would share bytes
            raise CheckpointError(f"{name}: {path} is damaged: tensors {previous} and {key} overlap in its data. "
                                  "Download or save the checkpoint again.")
        previous_end, previous = max(previous_end, end), key
    return entries


#: the largest JSON file read (config, index, adapter config): a real shard index is a few MB (DeepSeek-V3's is 9)
MAX_JSON_BYTES = 64 << 20


def read_json(path: Path, what: str) -> dict:
    """The parsed JSON file ``path`` of ``what`` (e.g. "the base model"); a missing, oversized or invalid file is a
    :class:`CheckpointError` naming it."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:  # parsing takes about 20 times the file's size in memory
            raise CheckpointError(f"{what}: {path} holds {size} bytes, more than the "
                                  f"{MAX_JSON_BYTES >> 20} MB any model's JSON file needs: it is damaged or not "
                                  "this model's. Download or save the checkpoint again.")
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{what}: {path.name} is missing from {path.parent}.") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what}: {path} is not valid JSON ({exc}).") from exc


def is_adapter_folder(folder: Path) -> bool:
    """True when ``folder`` holds a peft adapter (``adapter_config.json``)."""
    return (folder / "adapter_config.json").is_file()


def checkpoint_fingerprint(ckpt: LazyCheckpoint, sample_rows: Mapping[str, Sequence[int]] | None = None) -> str:
    """A short hash that tells checkpoints apart, ``"2-"`` and 16 hex digits.

    It covers every tensor's name, stored dtype and shape, its first and last 4 KiB, and 64 reads of 64 bytes
    spread over it (a fine-tune changes nearly every entry of what it touched; a few MB read in all, whatever the
    model size), and the rows ``sample_rows`` names (key → row indices: the think tokens' embedding rows, which a
    fine-tune that trains only them would change), if given. A change to a
    few entries elsewhere can go unseen: it is a guard against mixing up models, not a hash of every byte. It
    depends on the checkpoint alone, never on which modules a merge selects.
    """
    digest = _tensor_digest(ckpt, spread=True)
    for key, rows in sorted((sample_rows or {}).items()):
        if key in ckpt:
            digest.update(f"{key}|{list(rows)};".encode())
            digest.update(ckpt.row_bytes(key, rows))
    return f"{FINGERPRINT_VERSION}-{digest.hexdigest()[:16]}"


def legacy_fingerprint(ckpt: LazyCheckpoint) -> str:
    """The fingerprint rain_hf recorded before version 2 (names, dtypes, shapes and tensor ends only), to check
    feature files saved then."""
    return _tensor_digest(ckpt, spread=False).hexdigest()[:16]


def _tensor_digest(ckpt: LazyCheckpoint, spread: bool) -> hashlib._Hash:
    """SHA-256 over every tensor's name, stored dtype, shape and end bytes (and, with ``spread``, its spread reads)."""
    digest = hashlib.sha256()
    for key in sorted(ckpt.keys()):
        digest.update(f"{key}|{ckpt.stored_dtype(key)}|{tuple(ckpt.shape(key))};".encode())
        digest.update(ckpt.edge_bytes(key, _EDGE_BYTES))
        if spread:
            digest.update(ckpt.spread_bytes(key, _PIECES, _PIECE_BYTES))
    return digest
