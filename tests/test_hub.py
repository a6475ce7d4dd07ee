"""push_folder drives the real HfApi code path; only the HTTP transport under huggingface_hub is replaced.

``FakeHub`` is an ``httpx2`` transport installed with ``huggingface_hub.set_client_factory``: it answers the
create-repo, branch, tree, validate-yaml, preupload, LFS batch / upload / verify and commit endpoints the way
the Hub documents them, keeps each branch's files, records every request, and can be told to fail. Xet uploads are disabled in these tests
(``hf_xet`` speaks its own protocol outside the httpx client), so large files take the LFS "basic" path.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import tracemalloc
from pathlib import Path
from urllib.parse import parse_qs, unquote

import httpx2
import pytest
from huggingface_hub import constants, set_client_factory
from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

from rain_hf.card import write_model_card
from rain_hf.hub import HubError, push_folder

TOKEN = "hf_fake_write_token"
SHARD_BYTES = 24 * 1024 * 1024


class FakeHub(httpx2.BaseTransport):
    """Answers like the Hub's HTTP API; never touches the network."""

    def __init__(self, lfs_min_size: int = 10_000) -> None:
        self.lfs_min_size = lfs_min_size
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []  # (endpoint name, method, url)
        self.repos: dict[str, dict] = {}
        self.branches: dict[str, set[str]] = {}
        self.uploads: dict[str, dict] = {}  # oid -> {"size", "chunks", "max_chunk"}
        self.commits: list[dict] = []
        self.trees: dict[tuple[str, str], dict[str, dict]] = {}  # (repo, branch) -> path -> file entry
        self.fail: dict[str, int | Exception] = {}
        self.fail_body: dict[str, dict] = {}  # JSON body of a failure, by endpoint name

    # ------------------------------------------------------------------ routing
    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        name, match = self._route(request)
        with self.lock:
            self.requests.append((name, request.method, str(request.url)))
        failure = self.fail.get(name)
        if isinstance(failure, Exception):
            raise failure
        if failure is not None:
            request.read()
            return self._error(failure, request, self.fail_body.get(name))
        if name != "lfs_upload" and request.headers.get("authorization") != f"Bearer {TOKEN}":
            request.read()
            return httpx2.Response(401, json={"error": "Invalid credentials in Authorization header"},
                                   headers={"X-Error-Message": "Invalid credentials in Authorization header"})
        return getattr(self, f"_{name}")(request, match)

    _ROUTES = [
        ("create_repo", "POST", r"/api/repos/create"),
        ("whoami", "GET", r"/api/whoami-v2"),
        ("validate_yaml", "POST", r"/api/validate-yaml"),
        ("branch", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>[^/]+)"),
        ("preupload", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)"),
        ("commit", "POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)"),
        ("tree", "GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(/(?P<folder>.+))?"),
        ("repo_info", "GET", r"/api/models/(?P<repo>[^/]+/[^/]+)(/revision/.*)?"),
        ("lfs_batch", "POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch"),
        ("lfs_verify", "POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/verify"),
        ("lfs_upload", "PUT", r"/upload/(?P<oid>[0-9a-f]{64})"),
    ]

    def _route(self, request: httpx2.Request) -> tuple[str, re.Match]:
        path = request.url.raw_path.decode().split("?")[0]
        for name, method, pattern in self._ROUTES:
            match = re.fullmatch(pattern, path)
            if match and request.method == method:
                return name, match
        raise AssertionError(f"unexpected request {request.method} {request.url}")

    def _error(self, status: int, request: httpx2.Request, body: dict | None = None) -> httpx2.Response:
        headers = {"X-Error-Code": "RepoNotFound"} if status == 404 else {}
        return httpx2.Response(status, json=body or {"error": f"fake hub error {status}"}, headers=headers)

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, request, match):
        payload = json.loads(request.read())
        repo = f"{payload.get('organization') or 'fake-user'}/{payload['name']}"
        with self.lock:
            self.last_create_payload = payload
            if repo in self.repos:
                return httpx2.Response(409, json={"error": "You already created this model repo",
                                                  "url": f"https://huggingface.co/{repo}"})
            self.repos[repo] = payload
            self.branches[repo] = {"main"}
            self.trees[(repo, "main")] = {".gitattributes": {"mode": "regular", "content": b"*.safetensors lfs"}}
        return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}"})

    def _whoami(self, request, match):
        return httpx2.Response(200, json={"name": "fake-user", "type": "user"})

    def _repo_info(self, request, match):
        repo = match["repo"]
        if repo not in self.repos:
            return self._error(404, request)
        private = self.repos[repo].get("visibility") == "private"
        return httpx2.Response(200, json={"id": repo, "sha": "0" * 40, "private": private})

    def _validate_yaml(self, request, match):
        content = json.loads(request.read())["content"]
        assert content.startswith("---\n")
        return httpx2.Response(200, json={"errors": [], "warnings": []})

    def _branch(self, request, match):
        repo, branch = match["repo"], match["branch"]
        if repo not in self.repos:
            return self._error(404, request)
        with self.lock:
            if branch in self.branches[repo]:
                return httpx2.Response(409, json={"error": "Reference already exists"})
            self.branches[repo].add(branch)
            self.trees[(repo, branch)] = dict(self.trees[(repo, "main")])
        return httpx2.Response(200, json={})

    def _tree(self, request, match):
        tree = self.trees.get((match["repo"], unquote(match["rev"])))
        if tree is None:
            return self._error(404, request)
        prefix = f"{unquote(match['folder'])}/" if match["folder"] else ""
        entries, folders = [], set()
        for path, entry in sorted(tree.items()):
            if not path.startswith(prefix):
                continue
            if "/" in path[len(prefix):]:
                folders.add(prefix + path[len(prefix):].split("/", 1)[0])
            else:
                size = entry["size"] if entry["mode"] == "lfs" else len(entry["content"])
                entries.append({"type": "file", "path": path, "size": size, "oid": "1" * 40})
        entries += [{"type": "directory", "path": folder, "oid": "2" * 40} for folder in sorted(folders)]
        return httpx2.Response(200, json=entries)

    def _preupload(self, request, match):
        if match["repo"] not in self.repos:
            return self._error(404, request)
        files = json.loads(request.read())["files"]
        modes = [{"path": f["path"], "uploadMode": "lfs" if f["size"] >= self.lfs_min_size else "regular",
                  "shouldIgnore": False, "oid": None} for f in files]
        return httpx2.Response(200, json={"files": modes, "commitOid": "0" * 40})

    def _lfs_batch(self, request, match):
        payload = json.loads(request.read())
        assert payload["operation"] == "upload" and "basic" in payload["transfers"]
        objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                    "actions": {"upload": {"href": f"https://fake-s3.example/upload/{o['oid']}"},
                                "verify": {"href": f"https://huggingface.co/{match['repo']}.git/info/lfs/objects/verify"}}}
                   for o in payload["objects"]]
        return httpx2.Response(200, json={"transfer": "basic", "objects": objects})

    def _lfs_upload(self, request, match):
        # Read the body as the client streams it, chunk by chunk, never keeping it whole.
        sha, size, chunks, max_chunk = hashlib.sha256(), 0, 0, 0
        for chunk in request.stream:
            sha.update(chunk)
            size += len(chunk)
            chunks += 1
            max_chunk = max(max_chunk, len(chunk))
        assert sha.hexdigest() == match["oid"], "uploaded bytes do not match the announced sha256"
        with self.lock:
            self.uploads[match["oid"]] = {"size": size, "chunks": chunks, "max_chunk": max_chunk}
        return httpx2.Response(200)

    def _lfs_verify(self, request, match):
        payload = json.loads(request.read())
        assert payload["oid"] in self.uploads
        return httpx2.Response(200, json={})

    def _commit(self, request, match):
        repo, rev = match["repo"], httpx2.URL(str(request.url)).path.rsplit("/", 1)[1]
        if repo not in self.repos:
            return self._error(404, request)
        lines = [json.loads(line) for line in request.read().decode().splitlines()]
        header = lines[0]
        assert header["key"] == "header"
        files, deleted = {}, []
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = {"mode": "regular", "content": base64.b64decode(value["content"])}
            elif line["key"] == "lfsFile":
                assert value["oid"] in self.uploads, f"{value['path']} committed before its LFS upload"
                files[value["path"]] = {"mode": "lfs", "oid": value["oid"], "size": value["size"]}
            elif line["key"] == "deletedFile":
                deleted.append(value["path"])
        create_pr = parse_qs(request.url.query.decode()).get("create_pr") == ["1"]
        with self.lock:
            self.commits.append({"repo": repo, "revision": rev, "summary": header["value"]["summary"],
                                 "description": header["value"].get("description"), "files": files,
                                 "deleted": deleted, "create_pr": create_pr})
            number = len(self.commits)
            target = unquote(match["rev"])
            if create_pr:  # a pull request (numbered like the fake's commits) starts from its target's files
                target = f"refs/pr/{number}"
                self.trees[(repo, target)] = dict(self.trees[(repo, unquote(match["rev"]))])
            tree = self.trees[(repo, target)]  # a branch, or an open pull request's ref
            for path in deleted:
                assert path in tree, f"deleting {path}, which {target} does not hold"
                del tree[path]
            tree.update(files)
        oid = hashlib.sha1(f"{repo}{number}".encode()).hexdigest()
        return httpx2.Response(200, json={
            "commitUrl": f"https://huggingface.co/{repo}/commit/{oid}", "commitOid": oid,
            "pullRequestUrl": f"https://huggingface.co/{repo}/discussions/{number}" if create_pr else None})

    # ------------------------------------------------------------------ helpers
    def names(self) -> list[str]:
        return [name for name, _, _ in self.requests]


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    set_client_factory(lambda: httpx2.Client(transport=fake, event_hooks={"request": [hf_request_event_hook]},
                                             follow_redirects=True, timeout=None))
    yield fake
    set_client_factory(default_client_factory)


@pytest.fixture
def merged(tmp_path) -> Path:
    """An output folder shaped like RainMerger.save_pretrained's: two shards, index, configs, tokenizer, card."""
    out = tmp_path / "merged"
    out.mkdir()
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for i, name in enumerate(shards):
        with open(out / name, "wb") as f:
            for _ in range(SHARD_BYTES // (1024 * 1024)):
                f.write(os.urandom(1024 * 1024) if i == 0 else bytes(1024 * 1024))
    index = {"metadata": {"total_size": 2 * SHARD_BYTES},
             "weight_map": {"model.embed_tokens.weight": shards[0], "lm_head.weight": shards[1]}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / name).write_text(json.dumps({"name": name}))
    (out / "chat_template.jinja").write_text("{{ messages }}<think>\n")
    info = {"method": "rain", "lam": 1.0, "config": {"method": "rain", "lam": 1.0},
            "inputs": {"reasoning": {"name_or_path": "org/r", "hub_id": "org/r"}},
            "report": {"head_coefficients": [[1.0, 0.9], [1.1, 1.0]], "layers": [0, 1]}}
    (out / "rain_merging_config.json").write_text(json.dumps(info))
    write_model_card(out, info)
    (out / ".cache").mkdir()
    (out / ".cache" / "lock").write_text("local state, not for the Hub")
    return out


def _snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


EXPECTED_FILES = {
    "README.md", "chat_template.jinja", "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "rain_merging_config.json",
    "rain_merging_heatmap.png", "tokenizer.json", "tokenizer_config.json",
}


def test_push_creates_repo_and_one_commit_with_every_file(hub, merged):
    before = _snapshot(merged)
    tracemalloc.start()
    try:
        info = push_folder(merged, "me/r1-rain", private=True, token=TOKEN, commit_message="Add RAIN merge")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert hub.last_create_payload["name"] == "r1-rain" and hub.last_create_payload["organization"] == "me"
    assert hub.last_create_payload["visibility"] == "private"
    assert hub.names().count("create_repo") == 1 and hub.names().count("commit") == 1
    assert "branch" not in hub.names()
    (commit,) = hub.commits
    assert commit["repo"] == "me/r1-rain" and commit["revision"] == "main" and commit["summary"] == "Add RAIN merge"
    assert set(commit["files"]) == EXPECTED_FILES  # card, index and sidecar in the same commit; no .cache
    # the card was written without model_id: the uploaded one loads the repository, the local one is kept
    local_card = (merged / "README.md").read_bytes()
    assert b'model_id = "path/to/merged-model"' in local_card
    assert commit["files"]["README.md"]["content"] == local_card.replace(b"path/to/merged-model", b"me/r1-rain")
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        entry = commit["files"][shard]
        assert entry["mode"] == "lfs" and entry["size"] == SHARD_BYTES
        upload = hub.uploads[entry["oid"]]
        assert upload["size"] == SHARD_BYTES
        # streamed from disk: many small chunks, and the process never held a shard in memory
        assert upload["chunks"] > 1 and upload["max_chunk"] <= 1024 * 1024
    assert peak < SHARD_BYTES // 3, f"peak traced memory {peak} bytes: a shard was read into memory"
    assert info.oid and info.commit_url.startswith("https://huggingface.co/me/r1-rain/commit/")
    assert info.pr_url is None
    assert _snapshot(merged) == before


def test_existing_repo_branch_and_pull_request(hub, merged):
    push_folder(merged, "me/r1-rain", token=TOKEN)
    info = push_folder(merged, "me/r1-rain", token=TOKEN, revision="rain-v2", create_pr=True)
    assert hub.names().count("create_repo") == 2  # the second answered 409 and exist_ok kept going
    assert "rain-v2" in hub.branches["me/r1-rain"]
    assert hub.commits[-1]["revision"] == "rain-v2" and hub.commits[-1]["create_pr"] is True
    assert info.pr_url == "https://huggingface.co/me/r1-rain/discussions/2"
    assert "visibility" not in hub.last_create_payload  # private=None leaves visibility to the Hub


def test_wrong_token_is_an_auth_error(hub, merged):
    before = _snapshot(merged)
    with pytest.raises(HubError) as excinfo:
        push_folder(merged, "me/r1-rain", token="hf_wrong")
    message = str(excinfo.value)
    assert "401" in message and "token=" in message and "hf auth login" in message
    assert f"local output at {merged} is intact" in message
    assert excinfo.value.status_code == 401 and "\n" not in message
    assert "commit" not in hub.names()
    assert _snapshot(merged) == before


def test_forbidden_namespace(hub, merged):
    hub.fail["create_repo"] = 403
    with pytest.raises(HubError, match="HTTP 403.*hf auth login"):
        push_folder(merged, "someone-else/r1-rain", token=TOKEN)


def test_missing_repository_is_reported(hub, merged):
    hub.fail["preupload"] = 404
    before = _snapshot(merged)
    with pytest.raises(HubError, match="was not found.*dataset or Space") as excinfo:
        push_folder(merged, "me/r1-rain", token=TOKEN)
    assert excinfo.value.status_code == 404 and "intact" in str(excinfo.value)
    assert _snapshot(merged) == before and not hub.commits


@pytest.mark.parametrize("where", ["create_repo", "commit"])
def test_network_errors(hub, merged, where):
    hub.fail[where] = (httpx2.ConnectError("[Errno -2] Name or service not known") if where == "create_repo"
                       else httpx2.ReadTimeout("The read operation timed out"))
    before = _snapshot(merged)
    with pytest.raises(HubError, match="Network error") as excinfo:
        push_folder(merged, "me/r1-rain", token=TOKEN)
    assert "intact" in str(excinfo.value) and isinstance(excinfo.value, RuntimeError)
    assert isinstance(excinfo.value.__cause__, httpx2.TransportError)
    assert _snapshot(merged) == before and not hub.commits


def test_lfs_upload_failure_is_unwrapped(hub, merged):
    hub.fail["lfs_upload"] = 403
    with pytest.raises(HubError, match="HTTP 403"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    assert not hub.commits


def test_rejected_card_metadata(hub, merged):
    hub.fail["validate_yaml"] = 400
    hub.fail_body["validate_yaml"] = {"error": "Invalid metadata",
                                      "errors": [{"message": '"license" must be one of [apache-2.0, mit, ...]'}]}
    with pytest.raises(HubError, match="model card") as excinfo:
        push_folder(merged, "me/r1-rain", token=TOKEN)
    assert '"license" must be one of' in str(excinfo.value)  # the Hub's reason reaches the user
    assert not hub.commits


def test_pull_request_ref_is_committed_to_not_created(hub, merged):
    push_folder(merged, "me/r1-rain", token=TOKEN, create_pr=True)
    (merged / "rain_merging_heatmap.png").unlink()  # the PR's next commit drops it: listed on the PR, not on main
    push_folder(merged, "me/r1-rain", token=TOKEN, revision="refs/pr/1")
    assert "branch" not in hub.names()  # creating a branch named refs/pr/1 is a 400 on the Hub
    assert len(hub.commits) == 2 and "refs%2Fpr%2F1" in [url for name, _, url in hub.requests if name == "commit"][-1]
    assert hub.commits[-1]["deleted"] == ["rain_merging_heatmap.png"]
    assert set(hub.trees[("me/r1-rain", "main")]) == {".gitattributes"}  # main is untouched by the pull request


def test_commit_hash_revision_fails_before_any_request(hub, merged):
    with pytest.raises(HubError, match="commit hash.*branch name") as excinfo:
        push_folder(merged, "me/r1-rain", token=TOKEN, revision="a" * 40)
    assert hub.requests == []
    assert "a" * 40 not in str(excinfo.value).split("branch name")[1]  # the retry advice drops the bad revision
    with pytest.raises(HubError) as excinfo:
        push_folder(merged, "me/r1 rain!", token=TOKEN)
    assert "retry" not in str(excinfo.value) and f"local output at {merged} is intact" in str(excinfo.value)


def test_retry_hint_keeps_the_push_settings(hub, merged):
    with pytest.raises(HubError) as excinfo:
        push_folder(merged, "me/r1-rain", token="hf_wrong", private=True, revision="dev", create_pr=True)
    message = str(excinfo.value)
    assert f"push_folder('{merged}', 'me/r1-rain', private=True, revision='dev', create_pr=True)" in message
    assert "hf upload" not in message  # it would send the local card as it is and keep stale weights
    assert excinfo.value.reason in message and "intact" not in excinfo.value.reason


def test_other_repo_types_and_bad_ids_fail_before_any_request(hub, merged):
    with pytest.raises(HubError, match="dataset repository.*'me/r1-rain'"):
        push_folder(merged, "datasets/me/r1-rain", token=TOKEN)
    with pytest.raises(HubError, match="Space repository"):
        push_folder(merged, "spaces/me/r1-rain", token=TOKEN)
    with pytest.raises(HubError, match="not a valid repository id"):
        push_folder(merged, "me/r1 rain!", token=TOKEN)
    assert hub.requests == []


def test_offline_mode_is_explained(hub, merged, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        push_folder(merged, "me/r1-rain", token=TOKEN)


def test_private_push_to_an_existing_public_repository_is_refused(hub, merged):
    push_folder(merged, "me/r1-rain", token=TOKEN)  # created public
    with pytest.raises(HubError, match=r"me/r1-rain already exists and is public, so private=True cannot keep this "
                                       r"upload private .*update_repo_settings.*Nothing was uploaded"):
        push_folder(merged, "me/r1-rain", token=TOKEN, private=True)
    assert len(hub.commits) == 1
    push_folder(merged, "me/r1-private", token=TOKEN, private=True)  # made private by this push
    push_folder(merged, "me/r1-private", token=TOKEN, private=True)
    assert len(hub.commits) == 3


def test_links_out_of_the_folder_are_not_pushed(hub, merged, tmp_path):
    (tmp_path / "notes.txt").write_text("private notes next to the output")
    (merged / "notes.txt").symlink_to(tmp_path / "notes.txt")
    (merged / "card-link.md").symlink_to(merged / "README.md")  # inside the folder: pushed
    push_folder(merged, "me/r1-rain", token=TOKEN)
    files = set(hub.commits[-1]["files"])
    assert "notes.txt" not in files and "card-link.md" in files


def test_a_new_upload_deletes_the_weights_it_replaces(hub, merged, tmp_path, caplog):
    old = tmp_path / "old"
    (old / "original").mkdir(parents=True)
    kept = {"notes.md", "original/model.safetensors", "optimizer.pt", "training_args.bin", "adapter_model.safetensors",
            "adapter_config.json"}  # not a model's weights: left alone
    (old / "additional_chat_templates").mkdir()
    for name in ("model.safetensors", "rain_merging_heatmap.png", "config.json", "special_tokens_map.json",
                 "added_tokens.json", "additional_chat_templates/tool_use.jinja",
                 *kept):  # an old tokenizer's special tokens (or named templates) would change the new one's
        (old / name).write_bytes(b"an earlier merge: " + name.encode())
    push_folder(old, "me/r1-rain", token=TOKEN)
    (merged / "rain_merging_heatmap.png").unlink()  # the new merge ran without stage 2
    push_folder(merged, "me/r1-rain", token=TOKEN, create_pr=True)
    replaced = ["added_tokens.json", "additional_chat_templates/tool_use.jinja", "model.safetensors",
                "rain_merging_heatmap.png", "special_tokens_map.json"]
    assert hub.commits[-1]["deleted"] == replaced
    assert "model.safetensors" in hub.trees[("me/r1-rain", "main")]  # a pull request leaves main as it was
    with caplog.at_level("WARNING", logger="rain_hf.hub"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    # transformers would load an old model.safetensors before the new index: it goes in the same commit
    assert hub.commits[-1]["deleted"] == replaced
    remote = set(hub.trees[("me/r1-rain", "main")])
    assert remote == (EXPECTED_FILES - {"rain_merging_heatmap.png"}) | {".gitattributes"} | kept
    assert "holds adapter_config.json, so transformers will load it as a peft adapter" in caplog.text
    push_folder(merged, "me/r1-rain", token=TOKEN, revision="v2")  # a new branch starts from main's files
    assert hub.commits[-1]["deleted"] == []


def test_a_weight_file_linked_from_outside_stops_the_push(hub, merged, tmp_path):
    shard = merged / "model-00002-of-00002.safetensors"
    shard.rename(tmp_path / shard.name)
    shard.symlink_to(tmp_path / shard.name)
    with pytest.raises(FileNotFoundError, match="its file model-00002-of-00002.safetensors links to .*Copy"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    assert hub.requests == []


def test_a_dangling_link_or_a_missing_shard_stops_the_push(hub, merged, tmp_path):
    # a shard whose cache blob was deleted: pushing the rest would publish, or on a re-push delete, a part
    shard = merged / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.unlink()
    shard.symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match="its file model-00002-of-00002.safetensors links to .*gone.safetensors, "
                                                "which does not exist"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"its shard index names model-00002-of-00002.safetensors \(and 0 "
                                                r"more\), which the folder does not hold"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    # beside model.safetensors (which transformers loads) the index is stale: that is what is said
    (merged / "model.safetensors").write_bytes(data)
    with pytest.raises(FileNotFoundError, match="is stale beside model.safetensors, which transformers loads: delete "
                                                "the index"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    (merged / "model.safetensors").unlink()
    assert hub.requests == []
    shard.write_bytes(data)


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        push_folder(tmp_path / "nope", "me/x", token=TOKEN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no files"):
        push_folder(tmp_path / "empty", "me/x", token=TOKEN)


def test_merger_push_to_hub_sends_one_commit_with_card_and_weights(hub, tmp_path):
    """RainMerger.push_to_hub → save_pretrained → push_folder, through the same fake Hub."""
    from rain_hf import RainMerger, RainMergingConfig, testing

    paths = testing.build_triple(tmp_path / "triple", "qwen2")
    merger = RainMerger.from_pretrained(paths["base"], paths["reasoning"], paths["instruct"],
                                        RainMergingConfig(method="task_arithmetic", lam=0.5))
    merger.merge()
    merger.config.method = "ties"  # edited for a next merge: the push is still the task-arithmetic merge
    info = merger.push_to_hub("me/tiny-ta", token=TOKEN, private=True, save_directory=tmp_path / "saved")
    (commit,) = hub.commits
    assert commit["summary"] == "Upload task_arithmetic merge made with rain_hf"
    files = set(commit["files"])
    assert {"README.md", "config.json", "rain_merging_config.json", "tokenizer_config.json"} <= files
    assert any(name.endswith(".safetensors") and entry["mode"] == "lfs" for name, entry in commit["files"].items())
    assert files == {p.relative_to(tmp_path / "saved").as_posix() for p in (tmp_path / "saved").rglob("*")
                     if p.is_file()}
    card = commit["files"]["README.md"]["content"].decode()
    assert "task_arithmetic" in card and card.startswith("---\n")
    assert info.commit_url.startswith("https://huggingface.co/me/tiny-ta/commit/")
    assert 'model_id = "me/tiny-ta"' in card
    with pytest.raises(TypeError, match="positional"):  # keyword-only, as in transformers: not taken for private
        merger.push_to_hub("me/tiny-ta", "Add the merge", token=TOKEN)  # type: ignore[misc]
    assert len(hub.commits) == 1
    with pytest.raises(TypeError, match="private must be True, False or None, not 'false'"):  # before the save
        merger.push_to_hub("me/tiny-ta", token=TOKEN, private="false", save_directory=tmp_path / "again")
    assert not (tmp_path / "again").exists() and len(hub.commits) == 1


def test_merger_push_to_hub_card_snippet_loads_the_pushed_branch_and_namespace(hub, tmp_path, monkeypatch):
    from rain_hf import RainMerger, RainMergingConfig, testing

    paths = testing.build_triple(tmp_path / "triple", "qwen2")
    merger = RainMerger.from_pretrained(paths["base"], paths["reasoning"], paths["instruct"],
                                        RainMergingConfig(method="task_arithmetic", lam=0.5))
    merger.merge()
    merger.push_to_hub("me/tiny-ta", token=TOKEN, revision="dev", save_directory=tmp_path / "saved")
    card = hub.commits[-1]["files"]["README.md"]["content"].decode()
    assert 'model_id = "me/tiny-ta"\nrevision = "dev"' in card
    assert "AutoTokenizer.from_pretrained(model_id, revision=revision)" in card
    assert "AutoModelForCausalLM.from_pretrained(model_id, revision=revision," in card
    # a bare name lands in the token's namespace; the snippet says where; push_to_hub passes the save options on
    template = tmp_path / "card.md.j2"
    template.write_text("---\n{{ card_data }}\n---\n# mine: {{ model_id }} {{ model_revision }}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    merger.push_to_hub("tiny2", token=TOKEN, save_directory="~/saved", overwrite=True, card_template=template)
    assert (tmp_path / "saved" / "README.md").read_text().endswith("# mine: fake-user/tiny2 None\n")
    assert hub.commits[-1]["files"]["README.md"]["content"].decode().endswith("# mine: fake-user/tiny2 None\n")
    assert merger.save_pretrained("~/again").is_absolute()  # ~ expanded, so push_folder finds it
    push_folder("~/again", "me/tiny-ta", token=TOKEN)


def test_merger_push_to_hub_without_a_folder_deletes_its_copy(hub, tmp_path, monkeypatch):
    from rain_hf import RainMerger, RainMergingConfig, testing

    paths = testing.build_triple(tmp_path / "triple", "qwen2")
    merger = RainMerger.from_pretrained(paths["base"], paths["reasoning"], paths["instruct"],
                                        RainMergingConfig(method="task_arithmetic", lam=0.5))
    merger.merge()
    scratch = tmp_path / "tmp"  # from here on: the push's own temporary folder is the only one made
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    merger.push_to_hub("me/tiny-ta", token=TOKEN)
    (commit,) = hub.commits
    assert any(name.endswith(".safetensors") for name in commit["files"])
    assert list(scratch.iterdir()) == []
    with pytest.raises(HubError) as excinfo:
        merger.push_to_hub("me/tiny-ta", token="hf_wrong")
    assert list(scratch.iterdir()) == []
    message = str(excinfo.value)  # no advice to retry from the folder just deleted
    assert "401" in message and "deleted" in message and "save_directory=" in message and "intact" not in message
    # a push that must fail fails before the save: no minutes of writing shards to throw away
    for repo_id, revision, offline, expected in (("datasets/me/tiny-ta", None, False, "dataset repository"),
                                                 ("me/tiny-ta", "a" * 40, False, "commit hash"),
                                                 ("me/tiny-ta", None, True, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(type(merger), "save_pretrained", lambda *a, **k: pytest.fail("saved before the check"))
        with pytest.raises(HubError, match=expected) as early:
            merger.push_to_hub(repo_id, token=TOKEN, revision=revision)
        assert "Nothing was saved" in str(early.value)


def test_push_keeps_a_card_that_loads_the_target_and_passes_the_description(hub, merged):
    write_model_card(merged, json.loads((merged / "rain_merging_config.json").read_text()), model_id="me/r1-rain")
    push_folder(merged, "me/r1-rain", token=TOKEN, commit_description="λ = 1, both stages")
    (commit,) = hub.commits
    assert commit["files"]["README.md"]["content"] == (merged / "README.md").read_bytes()
    assert commit["description"] == "λ = 1, both stages"


def test_push_rewrites_the_cards_snippet_for_the_target_branch(hub, merged, caplog):
    info = json.loads((merged / "rain_merging_config.json").read_text())
    cards = {}
    for branch in (None, "dev", "v2"):  # what the card template writes for each target
        write_model_card(merged, info, model_id="me/r1-rain", model_revision=branch)
        cards[branch] = (merged / "README.md").read_bytes()
    assert cards[None] != cards["dev"]
    for written, target, expected in ((None, "dev", "dev"), ("dev", None, None), ("dev", "main", None),
                                      ("dev", "v2", "v2")):
        write_model_card(merged, info, model_id="other/name", model_revision=written)
        with caplog.at_level("INFO", logger="rain_hf.hub"):
            push_folder(merged, "me/r1-rain", token=TOKEN, revision=target)
        assert hub.commits[-1]["files"]["README.md"]["content"] == cards[expected], (written, target)
    assert "the uploaded card loads 'me/r1-rain' from the branch 'v2' instead" in caplog.text
    caplog.clear()
    (merged / "README.md").write_text("---\nlicense: mit\n---\n# my own card, no usage snippet\n")
    with caplog.at_level("WARNING", logger="rain_hf.hub"):
        push_folder(merged, "me/r1-rain", token=TOKEN, revision="dev")
    assert "usage snippet" not in caplog.text
    assert hub.commits[-1]["files"]["README.md"]["content"] == (merged / "README.md").read_bytes()


def test_push_refuses_a_linked_config_from_outside(hub, merged, tmp_path):
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    (merged / "config.json").unlink()
    (merged / "config.json").symlink_to(outside)
    with pytest.raises(FileNotFoundError, match="config.json links to .*outside the folder"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    assert hub.commits == []


def test_push_warns_about_a_single_file_beside_shards(hub, merged, caplog):
    (merged / "model.safetensors").write_bytes(b"stale")
    with caplog.at_level("WARNING", logger="rain_hf.hub"):
        push_folder(merged, "me/r1-rain", token=TOKEN)
    assert "holds both model.safetensors and a shard index" in caplog.text


def test_push_refuses_a_commit_message_in_the_place_of_private(hub, merged):
    with pytest.raises(TypeError, match="private must be True, False or None"):
        push_folder(merged, "me/r1-rain", private="Add RAIN merge", token=TOKEN)  # type: ignore[arg-type]
    assert hub.commits == []
    with pytest.raises(TypeError, match=r"private must be True, False or None, not 'false'\.$"):
        push_folder(merged, "me/r1-rain", private="false", token=TOKEN)  # type: ignore[arg-type]
