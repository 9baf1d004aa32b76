"""Prediction files (crash tolerance, merge, settings guard) and data loading."""

import json

import pytest
from longbench_tiny import write_longbench_data

from longbench_eval import data, records


def _rec(i: int) -> dict:
    return {"_id": f"id{i}", "index": i, "pred": f"p{i}"}


def _write(path, recs) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")


def test_truncated_last_line_is_ignored_and_repaired(tmp_path):
    path = tmp_path / records.PREDICTIONS
    _write(path, [_rec(0), _rec(1), _rec(2)])
    text = path.read_text()
    path.write_text(text[: text.rindex('"pred"')])  # crash in the middle of the third record
    assert [r["_id"] for r in records.read_records(path)] == ["id0", "id1"]
    with records.PredictionWriter(path) as writer:  # cuts the partial line before appending
        writer.write(_rec(2))
    assert records.read_records(path) == [_rec(0), _rec(1), _rec(2)]


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / records.PREDICTIONS
    path.write_text(json.dumps(_rec(0)) + "\n" + json.dumps(_rec(1)))
    assert len(records.read_records(path)) == 2
    with records.PredictionWriter(path) as writer:
        writer.write(_rec(2))
    assert [r["index"] for r in records.read_records(path)] == [0, 1, 2]


def test_corrupt_middle_line_is_an_error(tmp_path):
    path = tmp_path / records.PREDICTIONS
    path.write_text(json.dumps(_rec(0)) + "\n{oops\n" + json.dumps(_rec(1)) + "\n")
    with pytest.raises(ValueError, match=":2: corrupt"):
        records.read_records(path)


def test_merge_orders_dedupes_and_removes_rank_files(tmp_path):
    _write(tmp_path / records.PREDICTIONS, [_rec(3)])
    _write(records.part_path(tmp_path, 0), [_rec(0), _rec(2)])
    _write(records.part_path(tmp_path, 1), [_rec(1), _rec(3)])  # id3 twice (crash after a merge)
    merged = records.merge(tmp_path)
    assert [r["index"] for r in merged] == [0, 1, 2, 3]
    assert records.read_records(tmp_path / records.PREDICTIONS) == merged
    assert sorted(p.name for p in tmp_path.iterdir()) == [records.PREDICTIONS]


def test_settings_guard(tmp_path):
    records.check_settings(tmp_path, {"method": "qjl", "bits": (256, 512)})
    records.check_settings(tmp_path, {"method": "qjl", "bits": [256, 512]})  # same in JSON form
    with pytest.raises(ValueError, match=r"other settings \(differences: \['bits'\]\)"):
        records.check_settings(tmp_path, {"method": "qjl", "bits": [128, 512]})


def test_load_examples_from_data_dir(tmp_path):
    write_longbench_data(tmp_path, {"qasper": 5})
    write_longbench_data(tmp_path / "data", {"trec": 2}, longbench_e=True)  # data.zip's layout
    examples = data.load_examples("qasper", data_dir=tmp_path, n_data=3)
    assert [e["index"] for e in examples] == [0, 1, 2]
    assert examples[1]["_id"] == "qasper-001" and examples[1]["all_classes"] is None
    trec = data.load_examples("trec", longbench_e=True, data_dir=tmp_path)
    assert len(trec) == 2 and trec[0]["all_classes"] == ["Location", "Number", "Person"]


def test_missing_data_names_both_sources(tmp_path, monkeypatch):
    with pytest.raises(data.DataUnavailableError) as local:
        data.load_examples("qasper", longbench_e=True, data_dir=tmp_path)
    assert "qasper_e.jsonl" in str(local.value) and "THUDM/LongBench" in str(local.value)

    import datasets
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(data.DataUnavailableError) as hub:
        data.load_examples("qasper")
    assert "--data_dir" in str(hub.value) and "THUDM/LongBench" in str(hub.value)


def test_shards_are_disjoint_and_complete():
    examples = [{"index": i} for i in range(7)]
    shards = [data.shard(examples, rank, 3) for rank in range(3)]
    assert [[e["index"] for e in s] for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
