from pathlib import Path

import pytest

from models import QJLConfig

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_the_paper_configuration():
    c = QJLConfig()
    assert (c.key_quantization_bits, c.key_quantization_bits_initial_layers, c.initial_layers_count) == (256, 512, 15)
    assert (c.outlier_count_general, c.outlier_count_initial_layers) == (8, 8)
    assert (c.outlier_sketch_dim_general, c.outlier_sketch_dim_initial_layers) == (256, 128)
    assert (c.value_quantization_bits, c.group_size, c.buffer_size, c.seed) == (2, 32, 128, 42)
    assert QJLConfig.from_json(ROOT / "config/qjl_paper_llama2.json") == c


def test_layer_budget():
    c = QJLConfig()
    assert tuple(c.layer_budget(0)) == (512, 8, 128)
    assert tuple(c.layer_budget(14)) == (512, 8, 128)
    assert tuple(c.layer_budget(15)) == (256, 8, 256)
    assert tuple(QJLConfig(outlier_count_general=0).layer_budget(20)) == (256, 0, 0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(key_quantization_bits=100), "key_quantization_bits"),
        (dict(key_quantization_bits_initial_layers=0), "key_quantization_bits_initial_layers"),
        (dict(outlier_sketch_dim_general=12), "outlier_sketch_dim_general"),
        (dict(outlier_sketch_dim_general=512), "outlier_sketch_dim_general"),
        (dict(outlier_sketch_dim_initial_layers=0), "outlier_sketch_dim_initial_layers must be > 0"),
        (dict(outlier_count_general=-1), "outlier_count_general"),
        (dict(value_quantization_bits=3), "value_quantization_bits"),
        (dict(buffer_size=100), "buffer_size"),
        (dict(group_size=0), "group_size"),
        (dict(initial_layers_count=-2), "initial_layers_count"),
    ],
)
def test_invalid_combinations_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QJLConfig(**kwargs)


@pytest.mark.parametrize(
    "config,head_dim,match",
    [
        (QJLConfig(), 300, "head_dim must be in"),
        (QJLConfig(group_size=48, buffer_size=96), 64, "group_size"),
        (QJLConfig(outlier_count_general=80), 64, "outlier_count_general"),
        (QJLConfig(hadamard=True), 96, "power-of-two"),
        (QJLConfig(group_size=8, buffer_size=128), 72, "multiple of 16"),
    ],
)
def test_head_dim_checks(config, head_dim, match):
    with pytest.raises(ValueError, match=match):
        config.check_head_dim(head_dim)


def test_unknown_preset_keys_are_an_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"key_quantization_bits": 256, "typo_bits": 3}')
    with pytest.raises(ValueError, match="typo_bits"):
        QJLConfig.from_json(path)


@pytest.mark.parametrize("text,match", [("[1, 2]", "JSON object of fields, got a list"),
                                        ('{"key_quantization_bits": 256,', "not valid JSON"),
                                        ("256", "JSON object of fields, got a int")])
def test_from_json_names_the_file_of_a_malformed_config(tmp_path, text, match):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as error:
        QJLConfig.from_json(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(value_quantization_bits=2.0), "value_quantization_bits must be an int"),
        (dict(key_quantization_bits=256.0), "key_quantization_bits must be an int"),
        (dict(group_size=True), "group_size must be an int"),
        (dict(buffer_size="128"), "buffer_size must be an int"),
        (dict(seed=1.5), "seed must be an int"),
        (dict(initial_layers_count=None), "initial_layers_count must be an int"),
        (dict(orthogonalize="no"), "orthogonalize must be a bool"),
        (dict(hadamard=1), "hadamard must be a bool"),
    ],
)
def test_every_field_has_its_type(kwargs, match):
    # 2.0 used to pass the range checks and crash mid-generation; "no" counted as True.
    with pytest.raises(TypeError, match=match):
        QJLConfig(**kwargs)


@pytest.mark.parametrize("seed", [-1, 2**63])
def test_seed_range(seed):
    with pytest.raises(ValueError, match="seed must be"):
        QJLConfig(seed=seed)


def test_preset_with_a_float_is_an_error(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"value_quantization_bits": 2.0}')
    with pytest.raises(TypeError, match="value_quantization_bits"):
        QJLConfig.from_json(path)


@pytest.mark.parametrize(
    "args,error,match",
    [
        ((30, 0), ValueError, "reference_layers must be a positive number of layers, got 0"),  # was ZeroDivisionError
        ((30, -32), ValueError, "reference_layers must be a positive"),  # was a message about initial_layers_count
        ((True,), TypeError, "num_layers must be an int, got bool"),  # was 1 layer
        ((30, 32.0), TypeError, "reference_layers must be an int, got float"),
        ((0,), ValueError, "num_layers must be a positive"),
    ],
)
def test_scaled_to_layers_checks_its_arguments(args, error, match):
    with pytest.raises(error, match=match):
        QJLConfig().scaled_to_layers(*args)
