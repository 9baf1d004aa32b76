"""Prediction files (crash tolerance, merge, settings guard) and data loading."""

import json
import os

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
    with pytest.raises(ValueError, match=r"\(differences: \['bits'\]; bits: \[256, 512\] recorded, \[128, 512\] now\)"):
        records.check_settings(tmp_path, {"method": "qjl", "bits": [128, 512]})


def test_settings_guard_names_the_changed_field_of_a_long_setting(tmp_path):
    # A long dict (the QJL configuration) used to be cut at 80 characters on both sides, so the two
    # printed values looked the same and hid the one field that changed.
    config = {f"field_{i:02d}": 256 for i in range(12)} | {"seed": 42}
    records.check_settings(tmp_path, {"method": "qjl", "qjl_config": config})
    with pytest.raises(ValueError, match=r"qjl_config\.seed: 42 recorded, 7 now") as error:
        records.check_settings(tmp_path, {"method": "qjl", "qjl_config": config | {"seed": 7}})
    assert "field_00" not in str(error.value)


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


def test_directory_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    directory = tmp_path / "out" / "qjl" / "qasper"
    with records.DirectoryLock(directory):
        with pytest.raises(ValueError, match=rf"{directory} is in use by another run \(pid {os.getpid()} on "):
            records.DirectoryLock(directory).acquire()
    with records.DirectoryLock(directory):  # released: free again
        pass
    lock = records.DirectoryLock(tmp_path / "new" / "kivi" / "qasper").acquire()
    lock.release(remove=True)  # a method that cannot run leaves no directory behind
    assert not (tmp_path / "new" / "kivi").exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="cannot write to the output directory .*a_file"):
        records.DirectoryLock(tmp_path / "a_file" / "qjl" / "qasper").acquire()


def test_partial_settings_check_compares_only_given_keys(tmp_path):
    records.check_settings(tmp_path, {"method": "qjl", "data_sha256": "a" * 64, "data_source": "/x/qasper.jsonl"})
    records.check_settings(tmp_path, {"data_sha256": "a" * 64, "data_source": "/moved/qasper.jsonl"}, partial=True)
    with pytest.raises(ValueError, match=r"differences: \['data_sha256'\]; data_sha256: \"a{10}.*recorded.*data_sour"):
        records.check_settings(tmp_path, {"data_sha256": "b" * 64, "data_source": "/y/qasper.jsonl"}, partial=True)
    records.check_settings(tmp_path / "new", {"data_sha256": "b" * 64}, partial=True)
    assert not (tmp_path / "new").exists()  # partial checks write nothing


def _rows(n: int, **changes) -> list[dict]:
    rows = [{"input": f"q{i}", "context": f"c{i}", "answers": [f"a{i}"], "length": 10 * i} for i in range(n)]
    for i, row in enumerate(rows):
        row.update({k: v(i) if callable(v) else v for k, v in changes.items()})
    return rows


def test_rows_are_checked_with_file_and_line(tmp_path):
    path = tmp_path / "qasper.jsonl"
    lines = [json.dumps(r) for r in _rows(3)]
    path.write_text(lines[0] + "\n\n" + lines[1] + "\n{oops\n" + lines[2] + "\n")  # the bad line is line 4
    with pytest.raises(ValueError, match=rf"{path}:4: not valid JSON"):
        data.load_examples("qasper", data_dir=tmp_path)
    for field, value, what in (
        ("answers", "a0", "a list of strings"), ("answers", [1], "a list of strings"), ("input", None, "a string"),
        ("context", ["c"], "a string"), ("length", "10", "a non-negative integer"),
        ("all_classes", "A", "null or a list of strings"),
    ):  # fmt: skip
        rows = _rows(3)
        rows[2][field] = value
        path.write_text("\n" + "".join(json.dumps(r) + "\n" for r in rows))  # row 2 on line 4
        with pytest.raises(ValueError, match=rf"{path}:4: field '{field}' must be {what}"):
            data.load_examples("qasper", data_dir=tmp_path, n_data=1)  # every row is checked, not only the first
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=rf"{path}:1: a LongBench row must be a JSON object"):
        data.load_examples("qasper", data_dir=tmp_path)


def test_classification_rows_need_their_class_names(tmp_path):
    # trec / lsht score with classification_score, which reads all_classes: a row with null or no
    # all_classes passed the checks and crashed the scoring after generation (and on every resume)
    for longbench_e in (False, True):
        directory = write_longbench_data(tmp_path / f"e{longbench_e}", {"trec": 3}, longbench_e=longbench_e)
        path = directory / ("trec_e.jsonl" if longbench_e else "trec.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for value, got in ((None, "NoneType None"), ([], "list []"), ("missing", "no such field")):
            changed = [dict(r) for r in rows]
            if value == "missing":
                del changed[2]["all_classes"]
            else:
                changed[2]["all_classes"] = value
            path.write_text("".join(json.dumps(r) + "\n" for r in changed))
            with pytest.raises(ValueError) as error:  # every row is checked, not only the first
                data.load_examples("trec", longbench_e=longbench_e, data_dir=directory, n_data=1)
            assert str(error.value) == (f"{path}:3: field 'all_classes' must be a non-empty list of strings for trec "
                                        f"(its metric, classification_score, looks for the class names in the "
                                        f"prediction), got {got}")
    qasper = tmp_path / "qasper.jsonl"  # other datasets: all_classes stays optional
    qasper.write_text("".join(json.dumps(r) + "\n" for r in _rows(2)))
    assert [e["all_classes"] for e in data.load_examples("qasper", data_dir=tmp_path)] == [None, None]
    assert data.needs_classes("trec") and data.needs_classes("lsht") and not data.needs_classes("qasper")


@pytest.mark.parametrize("dataset,good,bad", [
    ("passage_retrieval_en", "Paragraph 3", "paragraph 3"),
    ("passage_retrieval_zh", "段落3", "第3段"),
])  # fmt: skip
def test_retrieval_answers_must_name_their_paragraph(tmp_path, dataset, good, bad):
    # the retrieval metrics read the paragraph number from the answer: one without it passed the checks
    # and failed the scoring with an IndexError after generation
    rows = [dict(r, answers=[good]) for r in _rows(3)]
    path = tmp_path / f"{dataset}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(data.load_examples(dataset, data_dir=tmp_path)) == 3
    rows[1]["answers"] = [good, bad]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"{path}:2: every answer of {dataset} must contain .* got '{bad}'"):
        data.load_examples(dataset, data_dir=tmp_path)


def test_duplicate_ids_are_refused_with_their_lines(tmp_path):
    path = tmp_path / "qasper.jsonl"
    rows = _rows(4, _id=lambda i: f"id{i % 2}")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = rf"{path}: 2 duplicate _id\(s\) \(_id 'id0' on lines 1, 3; _id 'id1' on lines 2, 4\)"
    with pytest.raises(ValueError, match=expected):
        data.load_examples("qasper", data_dir=tmp_path)
    rows = _rows(2)
    rows[0]["_id"] = "1"  # collides with the _id the second row (no _id) is given: its position
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="_id '1' on lines 1, 2"):
        data.load_examples("qasper", data_dir=tmp_path)


def test_data_hash_covers_the_whole_file(tmp_path):
    path = tmp_path / "qasper.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(4)))
    full, first = data.load_data("qasper", data_dir=tmp_path), data.load_data("qasper", data_dir=tmp_path, n_data=2)
    assert [e["_id"] for e in first.examples] == ["0", "1"] and full.sha256 == first.sha256  # --n_data may change
    assert full.settings() == {"data_source": str(path.resolve()), "data_sha256": full.sha256, "data_rows": 4}
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(4, answers=["other"])))
    assert data.load_data("qasper", data_dir=tmp_path).sha256 != full.sha256


def test_project_tasks_need_their_data_dir(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("asked the hub for a project task"))
    with pytest.raises(data.DataUnavailableError, match=r"passkey needs --data_dir: .*`python synthetic_tasks.py"):
        data.load_examples("passkey")
    with pytest.raises(data.DataUnavailableError, match=r"stdlib_niah.jsonl not found.*`python stdlib_tasks.py"):
        data.load_examples("stdlib_niah", data_dir=tmp_path)
