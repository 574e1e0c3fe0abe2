"""transfer.outputs in-process: what a replacement leaves, what recover finishes (test_checkpoints.py kills real
processes between the steps; these run in the test's own process, where mutation testing sees them)."""

from __future__ import annotations

import json

from transfer import outputs


def test_write_json_replaces_the_file_and_leaves_nothing_else(tmp_path):
    final = tmp_path / "out.json"
    outputs.write_json(final, {"b": 1, "a": [2]})
    outputs.write_json(final, {"b": 3})
    assert final.read_text() == '{\n  "b": 3\n}\n' and json.loads(final.read_text()) == {"b": 3}
    assert [path.name for path in tmp_path.iterdir()] == ["out.json"]
