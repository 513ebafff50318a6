"""--report-to: Weights & Biases and TensorBoard receive exactly the records of log.jsonl (numbers only, step as
the x axis), rank 0, closed at the end; a missing package is an error naming it before any model loads.

wandb is tested through a fake `wandb` module in sys.modules that records init / log / finish (CI does not install
wandb), and in its real offline mode where it is installed. TensorBoard: a fake SummaryWriter always, and the real
event files read back with tensorboard's EventAccumulator where tensorboard is installed."""
import importlib.machinery
import json
import os
import sys
import types

import pytest

import runs
import train
from conftest import killed_after, llava_args, small_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory, "report", seed=3, n_images=16)


_args = llava_args


def _records(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _fake_wandb(calls):
    """A stand-in for the wandb package: init returns a run whose log / finish are recorded in `calls`."""
    wandb = types.ModuleType("wandb")
    wandb.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # accelerate probes find_spec("wandb")

    def init(**kw):
        calls.append(("init", kw))
        run = types.SimpleNamespace()
        run.log = lambda data, step=None: calls.append(("log", step, dict(data)))
        run.finish = lambda: calls.append(("finish",))
        return run
    wandb.init = init
    return wandb


def _fake_tensorboard(calls):
    tb = types.ModuleType("torch.utils.tensorboard")
    tb.__spec__ = importlib.machinery.ModuleSpec("torch.utils.tensorboard", None)

    class SummaryWriter:
        def __init__(self, log_dir=None):
            calls.append(("writer", log_dir))

        def add_scalar(self, tag, value, global_step=None):
            calls.append(("scalar", tag, value, global_step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))
    tb.SummaryWriter = SummaryWriter
    return tb


def test_wandb_and_tensorboard_receive_the_records_of_log_jsonl(world, tmp_path, monkeypatch):
    calls_w, calls_t = [], []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls_w))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", _fake_tensorboard(calls_t))
    out = str(tmp_path / "run")
    train.main(_args(world, out, "--max-steps", "4", "--report-to", "wandb,tensorboard", "--run-name", "cd-test",
                     "--eval-sugarcrepe", os.path.join(world, "sugarcrepe"), "--eval-every", "2"))
    recs = _records(out)
    assert [r.get("event") for r in recs][0] == "start" and any("val_cr_subsets" in r for r in recs)
    expected = [runs.sink_numbers(r) for r in recs]  # (step, numbers): what each sink must have received
    assert all(isinstance(v, (int, float)) for _, nums in expected for v in nums.values())
    assert any("/" in k for _, nums in expected for k in nums)  # val_cr_subsets flattened
    # wandb: one init with the run name and the arguments, one log per record (step = x axis), finish at the end
    assert calls_w[0][0] == "init" and calls_w[0][1]["name"] == "cd-test" and calls_w[0][1]["dir"] == out
    assert calls_w[0][1]["config"]["report_to"] == "wandb,tensorboard"
    assert [(c[1], c[2]) for c in calls_w if c[0] == "log"] == expected
    assert calls_w[-1] == ("finish",) and [c[0] for c in calls_w].count("finish") == 1
    # tensorboard: the same numbers as scalars, under out/tensorboard/<run name>, closed at the end
    assert calls_t[0] == ("writer", os.path.join(out, "tensorboard", "cd-test"))
    assert [(c[3], c[1], c[2]) for c in calls_t if c[0] == "scalar"] == \
        [(step, k, v) for step, nums in expected for k, v in nums.items()]
    assert calls_t[-1] == ("close",)


def test_a_resumed_run_continues_the_same_wandb_run(world, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    out = str(tmp_path / "cut")
    args = _args(world, out, "--max-steps", "4", "--save-every", "2", "--report-to", "wandb")
    with killed_after(3):
        train.main(args)
    assert calls[-1] == ("finish",)
    before = _records(out)
    train.main([*args, "--resume"])
    inits = [c[1] for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] and inits[1]["resume"] == "allow"
    # the sink got every record as it was written; the resumed log keeps each step once (step 3, run before
    # the kill and again after the resume from step 2, is in the log once, in the sink twice)
    after = _records(out)
    restart = [i for i, r in enumerate(after) if r.get("event") == "start"][-1]
    assert [(c[1], c[2]) for c in calls if c[0] == "log"] == [runs.sink_numbers(r) for r in before + after[restart:]]
    train.main([*args, "--overwrite"])  # a fresh run in the same --out is a new wandb run
    assert [c[1] for c in calls if c[0] == "init"][-1]["id"] != inits[0]["id"]


@pytest.mark.parametrize("sink,module", [("wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_sink_package_is_named_before_any_model_loads(world, tmp_path, monkeypatch, sink, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError

    def no_models(*a, **k):
        raise AssertionError("a model was loaded before the --report-to check")
    monkeypatch.setattr(train, "build_student", no_models)
    with pytest.raises(ImportError, match=f"--report-to {sink} needs the '{sink}' package.*pip install {sink}"):
        train.main(_args(world, str(tmp_path / "x"), "--report-to", sink))
    with pytest.raises(SystemExit):
        train.main(_args(world, str(tmp_path / "x"), "--report-to", "none,wandb"))
    with pytest.raises(SystemExit):
        train.main(_args(world, str(tmp_path / "x"), "--report-to", "mlflow"))
    assert runs.parse_report_to("none") == []


def test_tensorboard_event_files_hold_the_records(world, tmp_path):
    pytest.importorskip("tensorboard")  # the real package: event files written and read back
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = str(tmp_path / "tb")
    train.main(_args(world, out, "--max-steps", "3", "--report-to", "tensorboard"))
    expected = {}
    for r in _records(out):
        step, nums = runs.sink_numbers(r)
        for k, v in nums.items():
            expected.setdefault(k, []).append((step, v))
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, a), (_, b) in zip(got, points):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-6), tag  # event files store float32


def _wandb_records(path):
    """The records of a wandb offline run file (run-ID.wandb): wandb's LevelDB-style log (a 7-byte file header,
    32 KiB blocks, 7-byte chunk headers: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) of Record
    protobufs."""
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    raw = open(path, "rb").read()
    assert raw[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:  # block padding
            pos += left
            continue
        buf += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_records(world, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # the real package, offline: its run file read back
    import glob
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "wb")
    train.main(_args(world, out, "--max-steps", "3", "--report-to", "wandb", "--run-name", "offline-test"))
    run_id = open(os.path.join(out, "wandb_id")).read()
    files = glob.glob(os.path.join(out, "wandb", f"offline-run-*-{run_id}", f"run-{run_id}.wandb"))
    assert len(files) == 1, os.listdir(os.path.join(out, "wandb"))
    recs = _wandb_records(files[0])
    run = [r.run for r in recs if r.WhichOneof("record_type") == "run"][0]
    assert run.run_id == run_id and run.display_name == "offline-test"
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    history = [(r.history.step.num, {key(i): json.loads(i.value_json) for i in r.history.item
                                     if not key(i).startswith("_")})
               for r in recs if r.WhichOneof("record_type") == "history"]
    assert history == [runs.sink_numbers(r) for r in _records(out)]
    assert any(r.WhichOneof("record_type") == "exit" for r in recs)  # finished
