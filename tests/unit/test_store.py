"""Tests of capwrap.recording.store.RunStore on real files (no mocks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from capwrap.errors import ConfigError, StoreError
from capwrap.recording.store import RunStore

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.0.hook_mlp_out"


def _fill(step: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.full(shape, step, dtype=np.float32)


def test_roundtrip_scalars_and_arrays(tmp_path):
    path = tmp_path / "run"
    rng = np.random.default_rng(0)
    acts = [rng.standard_normal((2, 3, 4)).astype(np.float32) for _ in range(3)]
    norms = [torch.randn(5, dtype=torch.float16) for _ in range(3)]
    with RunStore.create(path, meta={"model": "tiny"}, arrays={"norms": ((5,), "float16")}) as store:
        for i, step in enumerate([0, 10, 20]):
            scalars = {"loss": 1.5 - i, "lr": torch.tensor(0.1)}
            if step == 10:
                scalars.update(nan=math.nan, pinf=math.inf, ninf=-math.inf)
            store.append(step, scalars=scalars, arrays={HOOK: torch.from_numpy(acts[i]), "norms": norms[i]})
        assert store.last_step == 20

    run = RunStore.open(path)
    assert run.steps == [0, 10, 20] and len(run) == 3 and run.meta == {"model": "tiny"}
    assert run.array_spec(HOOK) == ((2, 3, 4), "float32") and run.array_spec("norms") == ((5,), "float16")
    got = run.array(HOOK)
    assert got.shape == (3, 2, 3, 4) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy(), np.stack(acts))
    got16 = run.array("norms")
    assert got16.dtype == torch.float16 and torch.equal(got16, torch.stack(norms))

    df = run.scalars()
    assert df.index.name == "step" and list(df.index) == [0, 10, 20]
    assert df["loss"].tolist() == [1.5, 0.5, -0.5]
    assert df["lr"].tolist() == pytest.approx([0.1] * 3)
    assert math.isnan(df.loc[10, "nan"]) and df.loc[10, "pinf"] == math.inf and df.loc[10, "ninf"] == -math.inf
    assert math.isnan(df.loc[0, "pinf"])  # a step without the scalar reads as NaN

    meta = json.loads((path / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["arrays"]["norms"]["dtype"] == "float16"
    assert meta["arrays"][HOOK]["shape"] == [2, 3, 4]


def test_array_recorded_only_at_some_steps(tmp_path):
    with RunStore.create(tmp_path / "run") as store:
        for step in range(10):
            arrays = {"probe": _fill(step, (4,))} if step % 3 == 0 else None
            store.append(step, scalars={"loss": float(step)}, arrays=arrays)
    run = RunStore.open(tmp_path / "run")
    assert run.array_steps("probe") == [0, 3, 6, 9]
    assert run.array("probe")[:, 0].tolist() == [0.0, 3.0, 6.0, 9.0]
    assert run.scalars()["loss"].tolist() == [float(s) for s in range(10)]


def test_array_is_file_backed_and_copy_on_write(tmp_path):
    path = tmp_path / "run"
    with RunStore.create(path, arrays={"empty": ((3,), "float32")}) as store:
        store.append(0, arrays={"a": _fill(7, (100, 100))})
    run = RunStore.open(path)
    first = run.array("a")
    assert first.shape == (1, 100, 100) and bool((first == 7).all())
    first += 1  # private copy-on-write edit: must not reach the file nor crash
    assert bool((RunStore.open(path).array("a") == 7).all())
    assert run.array("empty").shape == (0, 3) and run.array_steps("empty") == []


def test_reader_follows_a_live_writer(tmp_path):
    writer = RunStore.create(tmp_path / "run")
    writer.append(1, scalars={"loss": 1.0})
    reader = RunStore.open(tmp_path / "run")
    assert reader.steps == [1]
    writer.append(2, scalars={"loss": 2.0}, arrays={"x": _fill(2, (3,))})
    assert reader.steps == [1, 2]
    assert reader.last_step == 2 and reader.array("x").tolist() == [[2.0, 2.0, 2.0]]
    writer.close()


def test_names_with_odd_characters_and_update_meta(tmp_path):
    names = ["blocks.0.attn.hook_z", "a/b c", "A/b c", "ü"]
    with RunStore.create(tmp_path / "run", meta={"seed": 0}) as store:
        store.append(0, arrays={n: _fill(i, (2,)) for i, n in enumerate(names)})
        store.update_meta(seed=1, note="done")
    run = RunStore.open(tmp_path / "run")
    assert run.meta == {"seed": 1, "note": "done"} and sorted(run.array_names) == sorted(names)
    files = [p.name for p in (tmp_path / "run" / "arrays").iterdir()]
    assert len({f.lower() for f in files}) == len(names)
    assert all(set(f) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-%~") for f in files)
    for i, n in enumerate(names):
        assert run.array(n).tolist() == [[float(i)] * 2]


def test_partial_tail_is_ignored_then_truncated_on_resume(tmp_path):
    path = tmp_path / "run"
    with RunStore.create(path) as store:
        for step in range(3):
            store.append(step, scalars={"loss": float(step)}, arrays={"x": _fill(step, (4,))})
    log, data = path / "steps.jsonl", path / "arrays" / "x.bin"
    good_log = log.read_bytes()
    with open(data, "ab") as f:
        f.write(_fill(99, (4,)).tobytes() + b"\x01\x02")  # bytes written before a crash, never committed
    with open(log, "ab") as f:
        f.write(b'{"step": 3, "scalars": {"lo')  # the writer died mid-line

    run = RunStore.open(path)
    assert run.steps == [0, 1, 2] and run.array("x")[:, 0].tolist() == [0.0, 1.0, 2.0]
    assert log.read_bytes().startswith(good_log) and len(log.read_bytes()) > len(good_log)  # read-only

    with RunStore.resume(path) as store:
        assert log.read_bytes() == good_log and data.stat().st_size == 3 * 16
        store.append(3, scalars={"loss": 3.0}, arrays={"x": _fill(3, (4,))})
    run = RunStore.open(path)
    assert run.steps == [0, 1, 2, 3] and run.array("x")[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert b"lo\n" not in log.read_bytes() and len(log.read_bytes().splitlines()) == 4


def test_complete_garbage_line_at_the_end_is_ignored_but_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "run"
    with RunStore.create(path) as store:
        store.append(0, scalars={"loss": 0.0})
    with open(path / "steps.jsonl", "ab") as f:
        f.write(b"garbage\n")
    assert RunStore.open(path).steps == [0]
    with open(path / "steps.jsonl", "ab") as f:
        f.write(b'{"step": 5, "scalars": {}, "arrays": {}}\n')
    with pytest.raises(StoreError, match="corrupt"):
        RunStore.open(path)


def test_append_that_fails_midway_commits_nothing_and_the_next_append_is_clean(tmp_path):
    path = tmp_path / "run"
    store = RunStore.create(path)
    store.append(0, arrays={"a": _fill(0, (4,))})
    (path / "arrays" / "b.bin").mkdir()  # makes writing "b" fail after "a" was written
    with pytest.raises(OSError):
        store.append(1, arrays={"a": _fill(1, (4,)), "b": _fill(1, (4,))})
    assert store.steps == [0]
    (path / "arrays" / "b.bin").rmdir()
    store.append(2, arrays={"a": _fill(2, (4,)), "b": _fill(2, (4,))})
    store.close()
    run = RunStore.open(path)
    assert run.array("a")[:, 0].tolist() == [0.0, 2.0] and run.array_steps("a") == [0, 2]
    assert run.array_steps("b") == [2] and run.array("b")[:, 0].tolist() == [2.0]


WRITER = """
import sys, time, numpy as np
sys.path.insert(0, {repo!r})
from capwrap.recording.store import RunStore
store = RunStore.create({path!r})
print("ready", flush=True)
step = 0
while True:
    arrays = {{"acts": np.full((16, 64), step, np.float32)}}
    if step % 3 == 0:
        arrays["norms"] = np.full((257,), step, np.float16)
    store.append(step, scalars={{"loss": float(step)}}, arrays=arrays)
    step += 1
"""


def test_killed_writer_leaves_a_consistent_store(tmp_path):
    path = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER.format(repo=str(REPO), path=str(path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()

    run = RunStore.open(path)
    steps = run.steps
    assert len(steps) > 0 and steps == list(range(len(steps)))
    assert run.array_steps("acts") == steps
    acts = run.array("acts")
    assert acts.shape == (len(steps), 16, 64)
    assert torch.equal(acts, torch.tensor(steps, dtype=torch.float32)[:, None, None].expand(-1, 16, 64))
    norm_steps = [s for s in steps if s % 3 == 0]
    assert run.array_steps("norms") == norm_steps
    assert run.array("norms")[:, 0].tolist() == [float(np.float16(s)) for s in norm_steps]
    assert run.scalars()["loss"].tolist() == [float(s) for s in steps]

    with RunStore.resume(path) as store:  # drops the uncommitted tail, then appends cleanly
        store.append(steps[-1] + 1, arrays={"acts": _fill(-1, (16, 64))})
    run = RunStore.open(path)
    assert run.steps == steps + [steps[-1] + 1] and run.array("acts")[-1, 0, 0].item() == -1.0


def test_rollback_drops_later_steps_and_appending_goes_on_from_there(tmp_path):
    path = tmp_path / "run"
    with RunStore.create(path) as store:
        for step in range(6):
            arrays = {"x": _fill(step, (4,))} if step % 2 == 0 else None
            store.append(step, scalars={"loss": float(step)}, arrays=arrays)
        store.rollback(3)
        assert store.steps == [0, 1, 2, 3] and store.array_steps("x") == [0, 2]
        store.append(4, scalars={"loss": -4.0}, arrays={"x": _fill(-4, (4,))})
        store.rollback(10)  # nothing after 10: no change
    run = RunStore.open(path)
    assert run.steps == [0, 1, 2, 3, 4] and run.scalars()["loss"].tolist() == [0.0, 1.0, 2.0, 3.0, -4.0]
    assert run.array_steps("x") == [0, 2, 4] and run.array("x")[:, 0].tolist() == [0.0, 2.0, -4.0]
    assert (path / "arrays" / "x.bin").stat().st_size == 3 * 16
    with pytest.raises(StoreError, match="read-only"):
        run.rollback(0)


# ------------------------------------------------------------------------------------------ errors


def test_create_on_existing_store_needs_overwrite(tmp_path):
    path = tmp_path / "run"
    with RunStore.create(path) as store:
        store.append(0, scalars={"loss": 1.0})
    with pytest.raises(StoreError, match="overwrite=True") as info:
        RunStore.create(path)
    assert "RunStore.resume" in str(info.value)
    with RunStore.create(path, overwrite=True) as store:
        assert store.steps == []
    (tmp_path / "empty").mkdir()
    RunStore.create(tmp_path / "empty").close()  # an empty directory is fine


def test_overwrite_refuses_to_delete_a_directory_that_is_not_a_store(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a run store"):
        RunStore.create(tmp_path, overwrite=True)
    assert (tmp_path / "precious.txt").exists()


def test_open_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist") as info:
        RunStore.open(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(info.value)
    with pytest.raises(StoreError, match="no meta.json"):
        RunStore.open(tmp_path)
    RunStore.create(tmp_path / "run").close()
    (tmp_path / "run" / "meta.json").write_text('{"format_version": 1, "us')
    with pytest.raises(StoreError, match="corrupt"):
        RunStore.open(tmp_path / "run")
    with pytest.raises(StoreError):
        RunStore.resume(tmp_path / "missing")


def test_append_errors(tmp_path):
    store = RunStore.create(tmp_path / "run", arrays={HOOK: ((2, 3), "float32")})
    store.append(5, arrays={HOOK: np.zeros((2, 3))})
    for bad_step in (5, 4):
        with pytest.raises(ConfigError, match="last step 5"):
            store.append(bad_step)
    with pytest.raises(ConfigError, match=r"\(2, 3\).*\(3, 2\)"):
        store.append(6, arrays={HOOK: np.zeros((3, 2))})
    with pytest.raises(ConfigError, match="non-numeric"):
        store.append(6, scalars={"loss": "low"})
    with pytest.raises(ConfigError, match="non-numeric"):
        store.append(6, scalars={"loss": None})
    with pytest.raises(ConfigError, match="dtype"):
        RunStore.create(tmp_path / "other", arrays={"x": ((2,), "int8")})
    assert store.steps == [5]  # failed appends committed nothing
    store.append(6, arrays={HOOK: np.ones((2, 3))})
    assert store.array(HOOK)[:, 0, 0].tolist() == [0.0, 1.0]
    store.close()
    with pytest.raises(StoreError, match="resume"):
        store.append(7)


def test_unknown_array_name_suggests_the_closest(tmp_path):
    with RunStore.create(tmp_path / "run") as store:
        store.append(0, arrays={"blocks.0.hook_resid_post": np.zeros(2), "hook_embed": np.zeros(2)})
    run = RunStore.open(tmp_path / "run")
    with pytest.raises(ConfigError, match="blocks.0.hook_resid_post"):
        run.array("blocks.0.hook_resid_pots")
    with pytest.raises(ConfigError, match="Unknown array"):
        run.array_steps("nothing")


def test_read_only_store_refuses_writes(tmp_path):
    RunStore.create(tmp_path / "run").close()
    run = RunStore.open(tmp_path / "run")
    with pytest.raises(StoreError, match="read-only"):
        run.append(0, scalars={"loss": 1.0})
    with pytest.raises(StoreError, match="read-only"):
        run.update_meta(x=1)
    assert run.steps == []


@pytest.mark.skipif(sys.platform == "win32", reason="writer lock uses fcntl")
def test_two_writers_are_refused(tmp_path):
    store = RunStore.create(tmp_path / "run")
    with pytest.raises(StoreError, match="Another process"):
        RunStore.resume(tmp_path / "run")
    store.close()
    RunStore.resume(tmp_path / "run").close()


# ------------------------------------------------------------------------------ readers and rollback


def test_a_live_reader_follows_a_rollback_and_the_lines_appended_after_it(tmp_path):
    """A resumed train() rolls back and records the dropped steps again: a reader opened before
    sees the new recording, whether its lines are longer than the dropped ones or just as long.
    Until 2026-12-08 the reader raised "undecodable commit line ... the store is corrupt" (longer)
    or kept the dropped values (as long)."""
    path = tmp_path / "run"
    writer = RunStore.create(path)
    for step in range(6):
        writer.append(step, scalars={"loss": float(step)}, arrays={"a": _fill(step, (2,))})
    reader = RunStore.open(path)
    assert reader.steps == list(range(6))
    writer.rollback(3)
    assert reader.steps == [0, 1, 2, 3] and reader.array("a")[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0]
    for step in range(4, 9):  # longer lines: loss 104.0 ... 108.0
        writer.append(step, scalars={"loss": 100.0 + step}, arrays={"a": _fill(100 + step, (2,))})
    assert reader.steps == list(range(9))
    assert reader.scalars()["loss"].tolist() == [0.0, 1.0, 2.0, 3.0, 104.0, 105.0, 106.0, 107.0, 108.0]
    assert reader.array("a")[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 104.0, 105.0, 106.0, 107.0, 108.0]

    size = (path / "steps.jsonl").stat().st_size
    writer.rollback(6)  # lines of the same length: the log ends where it ended
    writer.append(7, scalars={"loss": 207.0}, arrays={"a": _fill(207, (2,))})
    writer.append(8, scalars={"loss": 208.0}, arrays={"a": _fill(208, (2,))})
    assert (path / "steps.jsonl").stat().st_size == size
    assert reader.scalars()["loss"].tolist()[-3:] == [106.0, 207.0, 208.0]
    assert reader.array("a")[-3:, 0].tolist() == [106.0, 207.0, 208.0]
    writer.close()


def test_a_reader_sees_the_step_a_resumed_writer_appends_in_place_of_a_cut_tail(tmp_path):
    """The crash's partial line is cut by resume() and a line of its very length takes its place:
    the log has the size the reader last saw, and still the reader reads the new step."""
    path = tmp_path / "run"
    with RunStore.create(path) as store:
        for step in range(3):
            store.append(step)
    line = b'{"step":3,"scalars":{},"arrays":{}}\n'
    with open(path / "steps.jsonl", "ab") as f:
        f.write(b'{"step":3,"scalars":{"loss":1.0' + b"x" * (len(line) - 31))  # the writer died mid-line
    reader = RunStore.open(path)
    assert reader.steps == [0, 1, 2]
    with RunStore.resume(path) as store:
        store.append(3)
    assert (path / "steps.jsonl").read_bytes().endswith(line)
    assert reader.steps == [0, 1, 2, 3]


READER_ACROSS_ROLLBACK = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from capwrap.recording.store import RunStore
writer = RunStore.create({path!r})
for step in range(6):
    writer.append(step, arrays={{"acts": np.full((64, 64), step, np.float32)}})  # 16 KiB a record
acts = RunStore.open({path!r}).array("acts")  # mapped
writer.rollback(2)
writer.append(3, arrays={{"acts": np.full((64, 64), -3, np.float32)}})
print(float(acts[-1].sum()), float(acts[3].sum()), flush=True)
"""


def test_a_readers_mapped_records_survive_a_rollback(tmp_path):
    """rollback() put a shortened file in place of the mapped one instead of cutting it: a reader
    touching a dropped record read it, and was not killed by SIGBUS (as it was until 2026-12-08)."""
    path = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", READER_ACROSS_ROLLBACK.format(repo=str(REPO), path=str(path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -7: SIGBUS
    assert proc.stdout.split() == [str(5.0 * 64 * 64), str(3.0 * 64 * 64)]  # the old records, unchanged
    run = RunStore.open(path)
    assert run.array("acts")[:, 0, 0].tolist() == [0.0, 1.0, 2.0, -3.0]
    assert (path / "arrays" / "acts.bin").stat().st_size == 4 * 64 * 64 * 4
    assert sorted(p.name for p in (path / "arrays").iterdir()) == ["acts.bin"]


def _store_of_six_steps(path: Path) -> RunStore:
    store = RunStore.create(path)
    for step in range(6):
        arrays = {"x": _fill(step, (4,))} if step % 2 == 0 else {}
        store.append(step, scalars={"loss": float(step)}, arrays={**arrays, "y": _fill(-step, (3,))})
    return store


def test_a_rollback_a_crash_interrupted_is_finished_or_undone_by_resume(tmp_path):
    """rollback() writes shortened copies beside the array files, cuts the log (its commit point),
    then puts the copies in place. Here the two crashes are made by hand: before the cut, resume()
    deletes the copies and the store is the old one; after it, resume() puts the copies in place."""
    for cut in (False, True):
        path = tmp_path / f"run_{cut}"
        _store_of_six_steps(path).close()
        arrays, log = path / "arrays", path / "steps.jsonl"
        for name, keep in (("x", 2), ("y", 4)):  # rollback(3) keeps x of steps 0, 2 and y of steps 0-3
            record = (arrays / f"{name}.bin").read_bytes()
            (arrays / f"{name}.bin.rollback").write_bytes(record[: keep * len(record) // (3 if name == "x" else 6)])
        if cut:
            lines = log.read_bytes().splitlines(keepends=True)
            log.write_bytes(b"".join(lines[:4]))
        reader = RunStore.open(path)  # a reader before resume reads the committed steps
        assert reader.steps == ([0, 1, 2, 3] if cut else list(range(6)))
        with RunStore.resume(path) as store:
            assert sorted(p.name for p in arrays.iterdir()) == ["x.bin", "y.bin"]
            expected = [0, 1, 2, 3] if cut else list(range(6))
            assert store.steps == expected
            store.append(10, arrays={"x": _fill(10, (4,)), "y": _fill(10, (3,))})
        run = RunStore.open(path)
        assert run.array("x")[:, 0].tolist() == [float(s) for s in expected if s % 2 == 0] + [10.0]
        assert run.array("y")[:, 0].tolist() == [float(-s) for s in expected] + [10.0]


def test_a_rollback_that_fails_before_its_commit_point_changes_nothing(tmp_path):
    path = tmp_path / "run"
    store = _store_of_six_steps(path)
    before = {p.name: p.read_bytes() for p in (path / "arrays").iterdir()}
    log = (path / "steps.jsonl").read_bytes()
    (path / "arrays" / "y.bin.rollback").mkdir()  # the copy of y cannot be written
    with pytest.raises(OSError):
        store.rollback(3)
    (path / "arrays" / "y.bin.rollback").rmdir()
    assert {p.name: p.read_bytes() for p in (path / "arrays").iterdir()} == before  # x's copy removed
    assert (path / "steps.jsonl").read_bytes() == log and store.steps == list(range(6))
    store.rollback(3)
    store.append(4, arrays={"x": _fill(40, (4,))})
    store.close()
    run = RunStore.open(path)
    assert run.steps == [0, 1, 2, 3, 4] and run.array("x")[:, 0].tolist() == [0.0, 2.0, 40.0]
    assert run.array_steps("y") == [0, 1, 2, 3]


# --------------------------------------------------------------------------- more bad inputs


@pytest.mark.skipif(sys.platform == "win32", reason="writer lock uses fcntl")
def test_overwrite_refuses_to_delete_a_store_another_writer_appends_to(tmp_path):
    """Until 2026-12-08 create(overwrite=True) deleted the store under a live writer (whose later
    steps then went to deleted files) while resume() was refused."""
    path = tmp_path / "run"
    writer = RunStore.create(path)
    writer.append(0, scalars={"loss": 1.0}, arrays={"a": _fill(0, (2,))})
    with pytest.raises(StoreError, match="Another process is appending to .*overwrite=True refuses to delete it"):
        RunStore.create(path, overwrite=True)
    writer.append(1, scalars={"loss": 2.0}, arrays={"a": _fill(1, (2,))})
    assert RunStore.open(path).steps == [0, 1]
    writer.close()
    with RunStore.create(path, overwrite=True) as store:
        assert store.steps == [] and store.array_names == []


def test_zero_size_arrays_are_appended_and_read(tmp_path):
    path = tmp_path / "run"
    with RunStore.create(path) as store:
        store.append(0, arrays={"none": np.zeros((0, 4), np.float32), "x": _fill(0, (2,))})
        store.append(1, arrays={"none": torch.zeros(0, 4)})
    run = RunStore.open(path)
    assert run.array("none").shape == (2, 0, 4) and run.array_steps("none") == [0, 1]
    assert (path / "arrays" / "none.bin").stat().st_size == 0
    with RunStore.resume(path) as store:
        store.rollback(0)
        store.append(2, arrays={"none": np.zeros((0, 4))})
    assert RunStore.open(path).array_steps("none") == [0, 2]


def test_a_store_path_under_a_file_names_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    for make in (RunStore.create, RunStore.open, RunStore.resume):
        with pytest.raises(StoreError, match=r"notes.txt is a file, not a folder") as info:
            make(tmp_path / "notes.txt" / "run" / "deeper")
        assert str(tmp_path / "notes.txt" / "run" / "deeper") in str(info.value)
    assert (tmp_path / "notes.txt").read_text() == "x"


def test_a_step_must_be_a_count(tmp_path):
    with RunStore.create(tmp_path / "run") as store:
        for bad in (True, np.bool_(False), torch.tensor(True)):
            with pytest.raises(ConfigError, match="step must be an int, got the bool"):
                store.append(bad)
        for bad in (-1, np.int64(-5)):
            with pytest.raises(ConfigError, match=r"step must be >= 0, got -\d"):
                store.append(bad)
        with pytest.raises(ConfigError, match="step must be an int"):
            store.append(1.0)
        assert store.steps == []
        store.append(np.int64(0))
        store.append(torch.tensor(1))
        assert store.steps == [0, 1]


def test_appending_to_an_array_file_that_lost_records_is_refused(tmp_path):
    """An array file shorter than its committed records (an incomplete copy) was silently
    padded with zeros by the next append."""
    path = tmp_path / "run"
    with RunStore.create(path) as store:
        store.append(0, arrays={"a": _fill(1, (4,))})
        store.append(1, arrays={"a": _fill(2, (4,))})
    file = path / "arrays" / "a.bin"
    file.write_bytes(file.read_bytes()[:-4])
    with RunStore.resume(path) as store:
        with pytest.raises(StoreError, match=r"a.bin holds 28 bytes where the records of array 'a' .* need 32"):
            store.append(2, arrays={"a": _fill(3, (4,))})
        store.rollback(0)  # the advice: go back to a step before the loss
        store.append(2, arrays={"a": _fill(3, (4,))})
    assert RunStore.open(path).array("a")[:, 0].tolist() == [1.0, 3.0]


ROLLING_WRITER = """
import sys, numpy as np
sys.path.insert(0, {repo!r})
from capwrap.recording.store import RunStore
store = RunStore.create({path!r})
store.append(0, scalars={{"gen": 0.0}}, arrays={{"acts": np.zeros((16, 64), np.float32)}})
print("ready", flush=True)
step, n = 1, 1
while True:  # every 7th append goes back 3 steps, as a resumed run goes back to its checkpoint
    store.append(step, scalars={{"gen": float(n // 7)}}, arrays={{"acts": np.full((16, 64), step, np.float32)}})
    step, n = step + 1, n + 1
    if n % 7 == 0:
        store.rollback(step - 4)
        step -= 3
"""

FOLLOWING_READER = """
import sys, time
sys.path.insert(0, {repo!r})
from capwrap.recording.store import RunStore
run, held, t0, reads = RunStore.open({path!r}), [], time.time(), 0
while time.time() - t0 < 1.0:
    steps = run.steps
    assert steps == list(range(len(steps))), steps
    acts = run.array("acts")
    assert acts[:, 0, 0].tolist() == [float(s) for s in range(len(acts))], acts[:, 0, 0].tolist()
    held = [*held[-20:], acts]
    for old in held:  # records mapped before a rollback dropped them are still there
        float(old[-1].sum())
    reads += 1
print("reads", reads, "rollbacks seen", run._reparses, flush=True)
"""


def test_a_reader_follows_a_writer_that_keeps_rolling_back(tmp_path):
    """A writer appends and rolls back, over and over; a reader in another process follows it. The
    reader always sees consecutive steps with their own records, and is never killed (SIGBUS) by a
    mapped record the writer dropped; then the writer is killed, and the store resumes cleanly."""
    path = tmp_path / "run"
    writer = subprocess.Popen(
        [sys.executable, "-c", ROLLING_WRITER.format(repo=str(REPO), path=str(path))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout.readline().strip() == "ready"
        reader = subprocess.run(
            [sys.executable, "-c", FOLLOWING_READER.format(repo=str(REPO), path=str(path))],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    assert reader.returncode == 0, (reader.returncode, reader.stderr[-3000:])  # -7: SIGBUS
    assert int(reader.stdout.split()[-1]) > 0  # it saw rollbacks

    n = len(RunStore.open(path).steps)
    with RunStore.resume(path) as store:
        store.append(n, arrays={"acts": _fill(n, (16, 64))})
    run = RunStore.open(path)
    assert run.steps == list(range(n + 1)) and run.array("acts")[:, 0, 0].tolist() == [float(s) for s in range(n + 1)]
    assert [p.name for p in (path / "arrays").iterdir()] == ["acts.bin"]
