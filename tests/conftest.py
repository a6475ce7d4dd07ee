import atexit
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
os.environ.pop("HF_TOKEN", None)  # module-scoped fixtures start benchmark subprocesses before _offline runs
# Caches of the session (and of its subprocesses) stay out of $HOME: HF_HOME, the nltk data rain_hf builds,
# matplotlib's font cache, torch's inductor cache.
_SESSION_DIR = tempfile.mkdtemp(prefix="rain_hf-tests-")
os.environ["HF_HOME"] = os.path.join(_SESSION_DIR, "hf_home")
os.environ["RAIN_HF_NLTK_DATA"] = os.path.join(_SESSION_DIR, "nltk_data")
os.environ["MPLCONFIGDIR"] = os.path.join(_SESSION_DIR, "matplotlib")
os.environ["XDG_CACHE_HOME"] = os.path.join(_SESSION_DIR, "cache")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_SESSION_DIR, "torchinductor")
atexit.register(shutil.rmtree, _SESSION_DIR, ignore_errors=True)  # also when the run is interrupted


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


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
