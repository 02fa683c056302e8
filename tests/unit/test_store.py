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
