import os
import socket
import tempfile

import pytest

# Tests never touch the network (set before transformers/huggingface_hub are imported by test modules).
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
os.environ.update(_OFFLINE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="rain_hf-test-hf-home-")


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
