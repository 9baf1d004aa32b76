from pathlib import Path

import pytest

from models import QJLConfig, qjl_bit_report

ROOT = Path(__file__).resolve().parents[2]


def test_paper_configuration_matches_hand_computation():
    report = qjl_bit_report(QJLConfig(), num_layers=32, head_dim=128)
    # general layer: 256 + 256 sign bits + 2 float32 norms + 8 uint8 indices per 32 tokens, / 128 channels
    general = (256 + 256 + 2 * 32 + 8 * 8 / 32) / 128
    initial = (512 + 128 + 2 * 32 + 8 * 8 / 32) / 128
    values = (2 * 128 + 2 * 16 * 128 / 32) / 128
    assert general == pytest.approx(4.515625) and initial == pytest.approx(5.515625) and values == 3.0
    assert report.layers[0].key_bits_per_channel == pytest.approx(initial)
    assert report.layers[14].key_bits_per_channel == pytest.approx(initial)
    assert report.layers[15].key_bits_per_channel == pytest.approx(general)
    assert all(l.value_bits_per_channel == pytest.approx(values) for l in report.layers)
    keys = (15 * initial + 17 * general) / 32
    assert report.key_bits_per_channel == pytest.approx(keys)
    assert report.kv_bits_per_channel == pytest.approx((keys + values) / 2)
    assert report.compression_vs_fp16 == pytest.approx(16 / ((keys + values) / 2))
    text = report.format()
    assert "0-14" in text and "15-31" in text and "4.008x" in text


def test_exact_values_and_no_outliers():
    config = QJLConfig(value_quantization_bits=16, outlier_count_general=0, initial_layers_count=0)
    report = qjl_bit_report(config, num_layers=2, head_dim=64)
    assert report.value_bits_per_channel == 16
    assert report.key_bits_per_channel == pytest.approx((256 + 64) / 64)


def test_report_cli_prints_the_paper_table(capsys):
    from models import report

    report.main([])
    out = capsys.readouterr().out
    assert "0-14" in out and "15-31" in out and "3.9922" in out and "4.008x" in out
    report.main(["--config", str(ROOT / "config/qjl_runtime_llama3.json"), "--num_layers", "1"])
    row = capsys.readouterr().out.splitlines()[2].split()
    assert row[:4] == ["0", "256", "0", "0"] and float(row[4]) == pytest.approx((256 + 64) / 128)
