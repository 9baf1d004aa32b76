"""Session fixtures of the LongBench tests (helpers live in longbench_tiny.py)."""

import pytest
from longbench_tiny import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))
