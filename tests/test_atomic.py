"""Atomic writes: the final path is either absent/old or whole, never partial."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from numpy.testing import assert_array_equal

from apsnake.atomic import atomic_output, write_parquet, write_text


class Boom(RuntimeError):
    pass


def test_success_renames_temporary_onto_path(tmp_path):
    path = tmp_path / "out.fits"
    with atomic_output(path) as tmp:
        assert tmp != path and tmp.parent == path.parent
        assert tmp.name.endswith(".fits")  # writers that dispatch on the suffix still work
        assert not path.exists()
        tmp.write_bytes(b"payload")
        assert not path.exists()  # nothing appears at the final path before the body ends
    assert path.read_bytes() == b"payload"
    assert os.listdir(tmp_path) == ["out.fits"]


def test_keeps_double_suffix_and_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "table.tar.gz"
    with atomic_output(path) as tmp:
        assert tmp.name.endswith(".tar.gz")
        tmp.write_text("x")
    assert path.read_text() == "x"
    assert os.listdir(path.parent) == ["table.tar.gz"]


def test_failure_leaves_new_path_absent_and_no_temporary(tmp_path):
    path = tmp_path / "new.parquet"
    with pytest.raises(Boom), atomic_output(path) as tmp:
        tmp.write_bytes(b"half a fi")
        raise Boom("killed")
    assert not path.exists()
    assert os.listdir(tmp_path) == []


def test_failure_leaves_old_content_untouched(tmp_path):
    path = tmp_path / "product.json"
    path.write_text("old")
    with pytest.raises(Boom), atomic_output(path) as tmp:
        tmp.write_text("new but incomplete")
        raise Boom()
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["product.json"]


def test_failure_before_anything_was_written_keeps_the_original_exception(tmp_path):
    path = tmp_path / "x.txt"
    with pytest.raises(Boom, match="first"), atomic_output(path):
        raise Boom("first")
    assert os.listdir(tmp_path) == []


def test_interrupt_also_cleans_up(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output(path) as tmp:
        tmp.write_text("partial")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_success_replaces_existing_file(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with atomic_output(str(path)) as tmp:  # a str path is accepted too
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["x.txt"]


def frame():
    return pd.DataFrame({"diaSourceId": np.array([3, 1, 2], np.int64), "ra": [10.5, 11.25, 12.0],
                         "band": ["g", "r", "i"], "flag": [True, False, True]}, index=[7, 8, 9])


def test_write_parquet_from_pandas_drops_the_index(tmp_path):
    path = tmp_path / "sub" / "t.parquet"
    write_parquet(frame(), path)
    back = pq.read_table(path)
    assert back.column_names == ["diaSourceId", "ra", "band", "flag"]
    expected = frame().reset_index(drop=True)
    pd.testing.assert_frame_equal(back.to_pandas(), expected)
    assert os.listdir(path.parent) == ["t.parquet"]


def test_write_parquet_from_arrow_table(tmp_path):
    table = pa.table({"a": pa.array([1, 2, 3], pa.int32()), "b": pa.array([0.5, None, 2.0])},
                     metadata={b"origin": b"test"})
    path = tmp_path / "t.parquet"
    write_parquet(table, path)
    back = pq.read_table(path)
    assert back.schema.field("a").type == pa.int32()
    assert back.equals(table.replace_schema_metadata(back.schema.metadata))
    assert back.schema.metadata[b"origin"] == b"test"
    assert_array_equal(back.column("a").to_numpy(), [1, 2, 3])


def test_write_parquet_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.parquet"
    write_parquet(frame(), path)

    def broken_write(table, where, **kwargs):
        with open(where, "wb") as f:
            f.write(b"PAR1 trunc")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk full"):
        write_parquet(frame().iloc[:1], path)
    monkeypatch.undo()
    assert pq.read_table(path).num_rows == 3
    assert os.listdir(tmp_path) == ["t.parquet"]


def test_write_text(tmp_path):
    path = tmp_path / "meta" / "done.json"
    text = '{"visit": 1, "note": "Δ µ ✓"}\n'
    write_text(text, path)
    assert path.read_text(encoding="utf-8") == text  # JSON is UTF-8
    write_text("second", path)
    assert path.read_text() == "second"
    assert os.listdir(path.parent) == ["done.json"]
