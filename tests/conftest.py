import os
from pathlib import Path

import pytest

# Tests never touch the network or a tracker; built artifacts go to a per-repo cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("AGENTTUNE_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "agenttune"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from agenttune.tiny import load_tiny_tokenizer

    return load_tiny_tokenizer()
