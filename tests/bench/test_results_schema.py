"""A results file of an older schema is kept aside, never overwritten or lost, when a new run starts."""

import json

import pytest
from stdit.bench import results


def _old(path, version=1, rows=3):
    lines = [json.dumps({"stdit_results": version})] + [json.dumps({"suite": "kernels", "n": i}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path.read_bytes()


def test_older_schema_is_moved_aside_with_its_bytes(tmp_path):
    path = tmp_path / "results.jsonl"
    data = _old(path)
    assert results.older_schema(path) == 1
    moved = results.retire_older_schema(path)
    assert moved == tmp_path / "results.schema1.jsonl" and moved.read_bytes() == data and not path.exists()
    data2 = _old(path)  # a second old file never replaces the first one kept
    moved2 = results.retire_older_schema(path)
    assert moved2 == tmp_path / "results.schema1.1.jsonl" and moved2.read_bytes() == data2
    assert moved.read_bytes() == data


@pytest.mark.parametrize("content", [None, "current", "not json\n", '{"stdit_results": 99}\n', '[1, 2]\n'])
def test_other_files_are_left_alone(tmp_path, content):
    """Our own schema, a newer one, a corrupt file or no file: nothing moves (reading them still refuses)."""
    path = tmp_path / "results.jsonl"
    if content == "current":
        results.write_rows(path, [])
    elif content is not None:
        path.write_text(content)
    before = path.read_bytes() if path.exists() else None
    assert results.retire_older_schema(path) is None
    assert (path.read_bytes() if path.exists() else None) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if content is None else ["results.jsonl"])
