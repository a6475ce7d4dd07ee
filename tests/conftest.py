import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network (set before transformers/huggingface_hub are imported by test modules).
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
os.environ.update(_OFFLINE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HOME"] = _SESSION_HF_HOME = tempfile.mkdtemp(prefix="rain_hf-test-hf-home-")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    """Every test: offline Hugging Face libraries, its own HF_HOME, no token, and no outgoing connection."""
    for key, value in _OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def _no_network(*args, **kwargs):
        raise RuntimeError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def organism_root() -> Path:
    """The built organism (``RAIN_HF_ORGANISM`` or the committed one). The committed one is part of the repository,
    so its absence fails the tests; another that is not built skips them."""
    committed = REPO / "benchmarks" / "organism"
    root = Path(os.environ.get("RAIN_HF_ORGANISM", committed))
    if not ((root / "checkpoints" / "instruct" / "model.safetensors").is_file()
            and (root / "data" / "eval_prompts.jsonl").is_file()):
        if root.resolve() == committed.resolve():
            pytest.fail(f"the committed organism is missing from {root} (a partial checkout, or Git LFS?): "
                        "restore it with git, or rebuild it with python -m benchmarks.organism.build")
        pytest.skip(f"the organism at {root} is not built (python -m benchmarks.organism.build --out {root})")
    return root


@pytest.fixture(scope="session")
def run_quick(organism_root):
    """``run_quick(module, out, *args)``: ``python -m <module> --quick [args]`` on the organism, writing into ``out``.

    A child process: OMP_WAIT_POLICY only counts before torch loads, and spinning OpenMP threads make the run
    several times slower on a shared machine.
    """

    def run(module: str, out: Path, *args: str) -> None:
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(
            [sys.executable, "-m", module, "--quick", "--organism", str(organism_root), "--out", str(out), *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    return run
