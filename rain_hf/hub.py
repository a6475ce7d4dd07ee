"""Publishing a saved merge to the Hugging Face Hub: one repository, one commit, files streamed from disk.

:func:`push_folder` creates the model repository if needed (``create_repo(exist_ok=True)``), then uploads every
file of the output folder — weights, index, config, tokenizer, chat template, generation config, ``README.md``
(the model card), heatmap and sidecar — in **one** ``create_commit``. Each file is passed to the Hub client as a
path, so large shards are hashed and uploaded in chunks, never read whole into memory. The same commit deletes
the weights, tokenizer, chat templates and generation config files (and heatmap) an earlier upload left in the
repository that this folder does not have:
transformers reads ``model.safetensors`` before ``model.safetensors.index.json``, so an old single-file merge
would otherwise shadow a new sharded one. Any failure from the
Hub (authentication, a missing or wrongly typed repository, a bad revision, network errors) is raised as
:class:`HubError` with a message that says what to do; the local folder is only read, never changed.

Example:
    >>> from rain_hf.hub import push_folder
    >>> info = push_folder("merged", "my-user/r1-rain-merged", private=True)  # doctest: +SKIP
    >>> info.commit_url  # doctest: +SKIP
    'https://huggingface.co/my-user/r1-rain-merged/commit/…'
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile

from .card import named_branch

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_COMMIT_MESSAGE", "HubError", "check_push_target", "push_folder"]

DEFAULT_COMMIT_MESSAGE = "Upload merged model (rain_hf)"
_OTHER_REPO_TYPES = {"datasets": "dataset", "spaces": "Space", "kernels": "kernel", "buckets": "bucket"}
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_TEMPLATES_FOLDER = "additional_chat_templates"  # transformers reads every .jinja there as a named chat template
#: Files of an earlier upload that a new upload replaces (deleted when the folder lacks them): the names
#: transformers loads a model's weights, tokenizer, chat templates and generation config from (an old
#: special_tokens_map.json or added_tokens.json would change the new tokenizer's special tokens, an old
#: additional_chat_templates/*.jinja would add a named template to it), and the stage-2 heatmap of a merge that had
#: stage 2. Other files (a Trainer's optimizer.pt, an adapter) are left alone.
REPLACED_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                     "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json",
                     "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                     "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                     "chat_template.jinja", "chat_template.json", "generation_config.json",
                     "rain_merging_heatmap.png", f"{_TEMPLATES_FOLDER}/*.jinja")


class HubError(RuntimeError):
    """Pushing to the Hugging Face Hub failed; the message says why and how to fix it.

    Attributes:
        repo_id: the repository the push went to.
        folder: the local output folder, left as it was (``None`` when it was a temporary one, now deleted).
        status_code: the HTTP status the Hub answered with, when there was one.
        reason: the message without its closing sentence about the intact local folder.
    """

    def __init__(self, message: str, *, repo_id: str, folder: Path | None, status_code: int | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.repo_id = repo_id
        self.folder = folder
        self.status_code = status_code
        self.reason = reason if reason is not None else message


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
) -> CommitInfo:
    """Upload every file of ``folder`` to the model repository ``repo_id`` in a single commit.

    Args:
        folder: a folder written by ``RainMerger.save_pretrained`` (any folder works).
        repo_id: ``"namespace/name"`` (or ``"name"`` for your own namespace).
        private: visibility of a repository this call creates (an existing one keeps its visibility; with
            ``private=True`` a push to an existing public repository is refused before anything is uploaded).
        token: a Hub token with write access (default: ``HF_TOKEN`` or the one saved by ``hf auth login``).
        revision: the branch to commit to (created from ``main`` when missing; default ``main``).
        commit_message: the commit's title (default :data:`DEFAULT_COMMIT_MESSAGE`).
        commit_description: the commit's longer description (or the pull request's, with ``create_pr``).
        create_pr: open a pull request with the commit instead of committing to the branch.

    The commit also deletes files matching :data:`REPLACED_PATTERNS` that the branch holds and ``folder`` does
    not (the weight, tokenizer, chat-template and generation-config files and heatmap of an earlier upload), so
    the repository holds one model.

    A model card written by rain_hf whose usage snippet loads another model id or branch (a folder saved without
    ``model_id=``, e.g. ``rain-merge`` without ``--push-to-hub``) is uploaded with the snippet loading the pushed
    repository from the branch ``revision`` names; the local ``README.md`` is left as it is.

    Returns:
        The :class:`huggingface_hub.CommitInfo` of the commit (``commit_url``, ``oid``, ``pr_url``).

    Raises:
        HubError: the push failed; the local folder is intact.
        FileNotFoundError: ``folder`` does not exist, holds no files, links a file the model needs (weights,
            config, tokenizer, card, sidecar) from outside or to nothing, or lacks a shard its index names.
        TypeError: ``private`` is not a bool.

    Example:
        >>> push_folder("merged", "my-user/r1-rain-merged", create_pr=True).pr_url  # doctest: +SKIP
        'https://huggingface.co/my-user/r1-rain-merged/discussions/1'
    """
    check_private(private)
    folder = Path(folder).expanduser()
    files = _files_to_upload(folder)
    names = {name for name, _ in files}
    if "model.safetensors" in names and "model.safetensors.index.json" in names:
        logger.warning("%s holds both model.safetensors and a shard index; transformers loads model.safetensors "
                       "and ignores the shards. Delete the one that is stale before pushing, or this upload "
                       "publishes it.", folder)
    retry = _RetryHint(folder, repo_id, private, revision, create_pr)
    reason = _push_target_problem(repo_id, revision)
    if reason:
        # the retry advice carries the corrected values, or none where there is nothing to correct them to
        retry.repo_id = _model_repo_id(repo_id)
        if revision is not None and _COMMIT_SHA.fullmatch(revision):
            retry.revision = None
        hint = retry if _push_target_problem(retry.repo_id, retry.revision) is None else (
            f"The local output at {folder} is intact.")
        raise HubError(f"{reason} {hint}", repo_id=repo_id, folder=folder, reason=reason)
    api = HfApi(token=token)
    target = repo_id
    step = "creating the repository"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        target = getattr(repo_url, "repo_id", None) or repo_id
        retry.repo_id = target
        reason = _public_problem(api, target) if private else None
        if reason:
            raise HubError(f"{reason} Nothing was uploaded; the local output at {folder} is intact.",
                           repo_id=target, folder=folder, reason=reason)
        if named_branch(revision) is not None:
            step = f"creating the branch {revision!r}"
            api.create_branch(target, branch=revision, exist_ok=True, repo_type="model")
        card = _card_for_target(folder, names, target, revision)
        operations: list = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=card if name == "README.md"
                                               and card is not None else str(path)) for name, path in files]
        step = "listing the repository's files"
        stale, adapter = _replaced_files(api, target, revision, {name for name, _ in files})
        if adapter:
            logger.warning("%s holds adapter_config.json, so transformers will load it as a peft adapter, not as "
                           "this model: delete the adapter files there, or push to another repository.", target)
        if stale:
            logger.info("Deleting %d file(s) of an earlier upload that this one replaces: %s", len(stale),
                        ", ".join(stale))
            operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        step = "uploading the files"
        info = api.create_commit(
            target,
            operations,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
    except HubError:
        raise
    except Exception as exc:  # every failure becomes one HubError with a fix; the cause stays chained
        raise _hub_error(exc, target, folder, revision, step, retry) from exc
    logger.info("Pushed %d files from %s to %s", len(files), folder, info.pr_url or info.commit_url)
    return info


def check_private(private: object) -> None:
    """Refuse a ``private`` that is not True, False or None (a string such as "false" would be truthy)."""
    if private is not None and not isinstance(private, bool):
        hint = " (a commit message goes in commit_message=)" if isinstance(private, str) and " " in private else ""
        raise TypeError(f"private must be True, False or None, not {private!r}{hint}.")


def _public_problem(api: HfApi, repo_id: str) -> str | None:
    """private=True makes only a new repository private: why a push to an existing public one is refused, or
    None (also when the visibility cannot be read; the commit then reports real failures)."""
    try:
        public = api.repo_info(repo_id, repo_type="model").private is False
    except Exception:
        return None
    if not public:
        return None
    return (f"{repo_id} already exists and is public, so private=True cannot keep this upload private (it only "
            "applies to a repository the push creates). If it is yours, make it private first (its settings on the "
            f"Hub, or HfApi().update_repo_settings({repo_id!r}, private=True)), or push without private=True "
            "(output: {private: false} in a rain-merge YAML) to publish it; if it is not, push to a repository "
            "of your own.")


def _files_to_upload(folder: Path) -> list[tuple[str, Path]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {str(folder)!r}: it is not a folder. Save the merge first "
                                "(merger.save_pretrained(folder)).")
    files = []
    root = folder.resolve()
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue  # skip .cache/, .git/, .gitattributes-like local state
        bad_link = None  # (where the link points, what is wrong, the fix)
        if path.is_symlink() and not path.exists():  # its target is gone (a cache blob deleted, say)
            bad_link = (os.readlink(path), "which does not exist", "Save the merge again and push again.")
        elif path.is_file() and path.is_symlink() and not path.resolve().is_relative_to(root):
            bad_link = (path.resolve(), "outside the folder", "Copy the file into the folder (or save the merge "
                        "there again) and push again.")
        if bad_link is not None:
            name = relative.as_posix()
            if _is_replaced(name) or name in _NEEDED:  # pushing the rest would publish a model missing this file
                raise FileNotFoundError(f"Cannot push {str(folder)!r}: its file {name} links to {bad_link[0]}, "
                                        f"{bad_link[1]}. {bad_link[2]}")
            logger.warning("Not pushing %s: it links to %s, %s.", relative, bad_link[0], bad_link[1])
            continue
        if path.is_file():
            files.append((relative.as_posix(), path))
    if not files:
        raise FileNotFoundError(f"Cannot push {str(folder)!r}: it holds no files.")
    names = {name for name, _ in files}
    if "model.safetensors.index.json" in names:  # a shard left out would publish (or, re-pushed, delete) a part
        try:
            index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
            shards = set(index["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
            raise FileNotFoundError(f"Cannot push {str(folder)!r}: its model.safetensors.index.json is not a "
                                    f"readable shard index ({exc}). Save the merge again.") from exc
        missing = sorted(shard for shard in shards if shard not in names)
        if missing and "model.safetensors" in names:  # transformers loads the single file: the index is stale
            raise FileNotFoundError(f"Cannot push {str(folder)!r}: its model.safetensors.index.json names shards "
                                    f"the folder does not hold ({missing[0]} …) and is stale beside "
                                    "model.safetensors, which transformers loads: delete the index and push again.")
        if missing:
            raise FileNotFoundError(f"Cannot push {str(folder)!r}: its shard index names {missing[0]} (and "
                                    f"{len(missing) - 1} more), which the folder does not hold. Save the merge "
                                    "again and push again.")
    return files


# Files a saved merge needs besides those REPLACED_PATTERNS names: never left out of a push.
_NEEDED = ("config.json", "README.md", "rain_merging_config.json")
_SNIPPET_ID = re.compile(r'^model_id = "(.*)"$', re.MULTILINE)
_SNIPPET_REVISION = re.compile(r'^revision = "(.*)"  #[^\n]*\n', re.MULTILINE)


def _card_for_target(folder: Path, names: set[str], repo_id: str, revision: str | None) -> bytes | None:
    """The bytes of a rain_hf model card whose usage snippet loads ``repo_id`` from ``revision``'s branch instead of
    the model id and branch it was written with, or None when the card (or its absence) can be uploaded as it is."""
    if "README.md" not in names or "rain_merging_config.json" not in names:
        return None
    try:
        text = (folder / "README.md").read_text(encoding="utf-8")
    except UnicodeDecodeError:  # not a card rain_hf wrote: the Hub client reports what is wrong with it
        return None
    match = _SNIPPET_ID.search(text)
    if match is None:  # a card of the user's own template, without the usage snippet
        return None
    branch = named_branch(revision)
    found = _SNIPPET_REVISION.search(text)
    written = None
    if found:
        try:
            written = json.loads(f'"{found.group(1)}"')  # the template writes it with tojson
        except ValueError:  # edited by hand
            written = found.group(1)
    if match.group(1) == repo_id and written == branch:
        return None
    logger.info("The model card's usage snippet loads %r%s; the uploaded card loads %r%s instead.", match.group(1),
                f" from the branch {written!r}" if written else "", repo_id,
                f" from the branch {branch!r}" if branch else "")
    # the lines the card template writes for a branch other than main, edited from the end so offsets hold
    if found and branch is None:
        text = text[:found.start()] + text[found.end():]
    elif found:
        text = text[:found.start(1)] + json.dumps(branch)[1:-1] + text[found.end(1):]
    elif branch is not None:
        line = f"\nrevision = {json.dumps(branch)}  # the branch that holds this model"
        text = text[:match.end()] + line + text[match.end():]
    text = text[:match.start(1)] + repo_id + text[match.end(1):]
    text = text.replace("from_pretrained(model_id, revision=revision", "from_pretrained(model_id")
    if branch is not None:
        text = text.replace("from_pretrained(model_id", "from_pretrained(model_id, revision=revision")
    return text.encode("utf-8")


def _is_replaced(name: str) -> bool:
    # fnmatch's * crosses "/": a pattern names files in a folder only when it names the folder
    return any(fnmatch.fnmatchcase(name, pattern) and name.count("/") == pattern.count("/")
               for pattern in REPLACED_PATTERNS)


def _replaced_files(api: HfApi, repo_id: str, revision: str | None, uploading: set[str]) -> tuple[list[str], bool]:
    """Files of the branch that :data:`REPLACED_PATTERNS` names and the upload lacks, and whether the branch
    holds an ``adapter_config.json`` the upload does not replace."""
    top = list(api.list_repo_tree(repo_id, revision=revision, repo_type="model"))
    remote = [entry.path for entry in top if isinstance(entry, RepoFile)]
    if any(entry.path == _TEMPLATES_FOLDER and not isinstance(entry, RepoFile) for entry in top):
        remote += [entry.path for entry in api.list_repo_tree(repo_id, path_in_repo=_TEMPLATES_FOLDER,
                                                               revision=revision, repo_type="model")
                   if isinstance(entry, RepoFile)]
    stale = sorted(name for name in remote if _is_replaced(name) and name not in uploading)
    return stale, "adapter_config.json" in remote and "adapter_config.json" not in uploading


def namespaced_repo_id(repo_id: str, token: str | bool | None = None) -> str:
    """``repo_id`` with the namespace the Hub gives a bare name (the token's user), for the card's usage snippet;
    unchanged when it has a namespace or the Hub cannot say (offline, no token)."""
    if "/" in repo_id:
        return repo_id
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return repo_id
        return f"{HfApi(token=token).whoami()['name']}/{repo_id}"
    except Exception:  # the snippet keeps the bare name; the push itself reports real failures
        return repo_id


def _model_repo_id(repo_id: str) -> str:
    """``repo_id`` without a ``datasets/``-style type prefix (unchanged when it has none)."""
    if isinstance(repo_id, str) and repo_id.split("/", 1)[0] in _OTHER_REPO_TYPES and repo_id.count("/") == 2:
        return repo_id.split("/", 1)[1]
    return repo_id


def _push_target_problem(repo_id: str, revision: str | None = None) -> str | None:
    """Why the Hub would refuse ``repo_id``/``revision`` before any request is made, or ``None``."""
    from huggingface_hub.utils import validate_repo_id

    if _model_repo_id(repo_id) != repo_id:
        return (f"{repo_id!r} names a {_OTHER_REPO_TYPES[repo_id.split('/', 1)[0]]} repository; a merged model "
                f"goes to a model repository: pass '{_model_repo_id(repo_id)}'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return f"{repo_id!r} is not a valid repository id ({exc}); use 'namespace/name'."
    if revision is not None and _COMMIT_SHA.fullmatch(revision):
        return (f"revision={revision!r} is a commit hash; a commit goes onto a branch (or an open pull request's "
                "'refs/pr/N'): pass a branch name, or none for main.")
    return None


def check_push_target(repo_id: str, revision: str | None = None, *, need_network: bool = True) -> None:
    """Raise :class:`HubError` now for a push that would fail at once: a repo id the Hub refuses, a commit hash
    as the branch, or (with ``need_network``) ``HF_HUB_OFFLINE`` set. Call it before a long merge or save that
    ends in a push."""
    from huggingface_hub import constants

    reason = _push_target_problem(repo_id, revision)
    if reason is None and need_network and constants.HF_HUB_OFFLINE:
        reason = "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to push."
    if reason:
        raise HubError(f"{reason} Nothing was saved or uploaded.", repo_id=repo_id, folder=None, reason=reason)


class _RetryHint:
    """The sentence that says the local output is intact and how to push it again with the same settings."""

    def __init__(self, folder: Path, repo_id: str, private: bool | None, revision: str | None,
                 create_pr: bool) -> None:
        self.folder, self.repo_id = folder, repo_id
        self.private, self.revision, self.create_pr = private, revision, create_pr

    def __str__(self) -> str:
        extra = "".join(f", {name}={value!r}" for name, value in
                        (("private", self.private), ("revision", self.revision),
                         ("create_pr", self.create_pr or None)) if value is not None)
        # not `hf upload`: it would send the local card as it is and leave an earlier upload's weights behind
        return (f"The local output at {self.folder} is intact; retry with rain_hf.hub.push_folder("
                f"{str(self.folder)!r}, {self.repo_id!r}{extra}).")


def _hub_error(exc: BaseException, repo_id: str, folder: Path, revision: str | None, step: str,
               retry: _RetryHint) -> HubError:
    """Turn what the Hub client raised into a HubError that names the problem and the fix."""
    if isinstance(exc, ValueError) and "README.md" in str(exc):  # the Hub's validate-yaml said no
        errors = " ".join(line.strip("- ").strip() for line in str(exc).splitlines()[1:] if line.strip())
        reason = (f"The Hub rejected the model card's metadata (README.md front matter)"
                  f"{': ' + errors if errors else ''}. Fix the card template and push again.")
        return HubError(f"{reason} {retry}", repo_id=repo_id, folder=folder, status_code=400, reason=reason)
    cause = exc
    # lfs uploads wrap the HTTP error in a RuntimeError("Error while uploading ..."): look through the chain
    known = (HfHubHTTPError, OfflineModeIsEnabled, HFValidationError, httpx2.TransportError, OSError)
    while not isinstance(cause, known) and cause.__cause__ is not None:
        cause = cause.__cause__
    status = None
    response = getattr(cause, "response", None)
    if response is not None:
        status = getattr(response, "status_code", None)
    server = (getattr(cause, "server_message", None) or "").strip()
    if not server and isinstance(cause, HfHubHTTPError):
        server = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    detail = f" (Hub: {' '.join(server.split())})" if server else ""

    if isinstance(cause, OfflineModeIsEnabled):
        text = "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to push."
    elif isinstance(cause, HFValidationError):
        text = f"{repo_id!r} is not a valid repository id ({cause}); use 'namespace/name'."
    elif isinstance(cause, RevisionNotFoundError):
        text = (f"The revision {revision!r} does not exist in {repo_id} and could not be created; pass an existing "
                "branch name, a new branch name, or none for main (an open pull request is 'refs/pr/N').")
    elif status in (401, 403) and not isinstance(cause, RepositoryNotFoundError):
        text = (f"The Hub refused {step} for {repo_id} (HTTP {status}: not authenticated, or the token cannot write "
                f"there){detail}. Pass token= (a token with write access) or run `hf auth login`.")
    elif isinstance(cause, RepositoryNotFoundError):
        text = (f"The model repository {repo_id} was not found while {step} (HTTP {status}): it does not exist, the "
                "token cannot see it, or the name belongs to a dataset or Space. Check the repo id, pass token= "
                "(a token with write access) or run `hf auth login`.")
    elif isinstance(cause, HfHubHTTPError):
        if status == 409:
            text = (f"The Hub reported a conflict while {step} for {repo_id}{detail}: a repository of another type "
                    "may already use this name, or another commit was pushed meanwhile. Retry or pick another "
                    "repo id.")
        else:
            text = f"The Hub answered HTTP {status} while {step} for {repo_id}{detail}."
    elif isinstance(cause, (httpx2.TransportError, ConnectionError, TimeoutError)):
        text = (f"Network error while {step} for {repo_id} ({type(cause).__name__}: {cause}). Check the "
                "connection (proxy, HF_ENDPOINT) and retry.")
    else:
        text = f"Pushing to {repo_id} failed while {step}: {type(cause).__name__}: {cause}"
    return HubError(f"{text} {retry}", repo_id=repo_id, folder=folder, status_code=status, reason=text)
