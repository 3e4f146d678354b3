"""support.atomic (one atomic write) and support.progress (one progress printer)."""

import json
import os

import pytest

from bitq_tvm.support.atomic import atomic_path, write_bytes, write_json, write_text
from bitq_tvm.support.progress import Countdown, say


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "plan.json"
    write_json(path, {"a": 1}, indent=2, newline=True)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write("half a fi")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, untouched
    assert os.listdir(tmp_path) == ["plan.json"]  # no temporary left behind
    write_text(path, "new")
    write_bytes(tmp_path / "lines", [b"1\n", b"2\n"])
    assert path.read_text() == "new" and (tmp_path / "lines").read_bytes() == b"1\n2\n"
    with atomic_path(tmp_path / "lib.so", ".so") as tmp:
        assert tmp.endswith(".so") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "wb").close()
    assert (tmp_path / "lib.so").exists()


def test_progress_lines_and_countdown(capsys, monkeypatch):
    say("compiling")
    say("task 1/2", "tune")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "[bitq-tvm] compiling\n[bitq-tvm tune] task 1/2\n"
    clock = iter([100.0, 110.0, 110.0])  # started at 90 s: 10 s for the first of 4 steps
    monkeypatch.setattr("bitq_tvm.support.progress.time.perf_counter", lambda: next(clock))
    countdown = Countdown(4, started=90.0)
    assert countdown.suffix(1) == "[20 s, ETA 30 s]"
