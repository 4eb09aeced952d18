"""torchrun support: sharding, per-rank manifests, merge, failures and resume (CPU, gloo).

Multi-process runs go through ``python -m torch.distributed.run --nproc-per-node 2`` in a
subprocess, on a tiny ImageNet-layout folder of real JPEGs and a randomly initialised
resnet18 at 32×32 (saved as a checkpoint so every process loads the same weights). Each is
compared with the same command run in this process without torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fakes import write_run_inputs
from stophook import STOP_HOOK_ENV

from advtune.cli import main
from advtune.errors import UserError
from advtune.run import comm as distributed
from advtune.run.outputs import consolidate, partial_manifest_name
from advtune.storage import format_manifest, read_manifest

TORCHRUN_TIMEOUT_S = 240


# --------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return write_run_inputs(tmp_path_factory.mktemp("dist"))


def args_for(command, data, ckpt, out, *more):
    # PGD with a random start and random targets: both use the per-sample seeds.
    eps = ["--eps", "4/255"] if command == "generate" else ["--eps", "2/255,8/255"]
    return [
        command, "--model", "resnet18", "--weights", str(ckpt), "--data", str(data),
        "--out", str(out), "--image-size", "32", "--batch-size", "2", "--workers", "0",
        "--attack", "pgd", *eps, "--steps", "2", "--targeted", "random", "--seed", "3",
        "-q", *more,
    ]  # fmt: skip


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STOPHOOK = Path(__file__).with_name("stophook.py")


def torchrun(args, *, nproc=2, env=None):
    """``torchrun --nproc-per-node 2 -m advtune ...`` on the CPU (gloo), in a subprocess."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # The test stop hook (tests/stophook.py) is a script that wraps advtune's main.
    launcher = [str(STOPHOOK)] if STOP_HOOK_ENV in (env or {}) else ["-m", "advtune"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *launcher,
        *args,
    ]  # fmt: skip
    return subprocess.run(
        cmd, env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True, text=True, timeout=TORCHRUN_TIMEOUT_S,
    )  # fmt: skip


def assert_same_results(a, b, *, pngs=False):
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()
    ra = json.loads((a / "report.json").read_text())
    rb = json.loads((b / "report.json").read_text())
    assert ra["status"] == rb["status"] == "complete"
    assert ra["metrics"] == rb["metrics"]
    assert ra["config"] == rb["config"]
    assert ra["data"] == rb["data"]
    if pngs:
        files = sorted(p.relative_to(a) for p in (a / "adv").rglob("*.png"))
        assert files and files == sorted(p.relative_to(b) for p in (b / "adv").rglob("*.png"))
        for p in files:
            assert (a / p).read_bytes() == (b / p).read_bytes()
    # Nothing but the single-process files is left behind.
    assert not list(a.glob("*.rank*-of-*")) and not list(a.rglob("*.tmp"))
    return ra, rb


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """Single-process runs (in this process, without torchrun)."""
    data, ckpt = setup
    base = tmp_path_factory.mktemp("ref")
    for command in ("generate", "evaluate"):
        assert main(args_for(command, data, ckpt, base / command)) == 0
    return base


# --------------------------------------------------------------------------- units


def test_env_world_parses_torchrun_variables():
    assert distributed.env_world({}) == (0, 1, 0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert distributed.env_world(env) == (3, 4, 1)
    with pytest.raises(UserError, match="WORLD_SIZE must be an integer, got 'two'"):
        distributed.env_world({"WORLD_SIZE": "two"})
    with pytest.raises(UserError, match="RANK 4 is out of range for WORLD_SIZE 4"):
        distributed.env_world({"RANK": "4", "WORLD_SIZE": "4"})


def test_single_process_communicator_needs_no_process_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    comm = distributed.init_comm("cpu")
    assert (comm.rank, comm.world_size, comm.is_distributed, comm.is_main) == (0, 1, False, True)
    assert comm.device == "cpu" and comm.backend is None
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.init_comm("auto").is_distributed
    # Collectives degrade to identities.
    assert comm.broadcast({"a": 1}) == {"a": 1}
    assert comm.gather(5) == [5] and comm.all_gather(5) == [5]
    assert comm.sum([1, 2, 3]) == [1, 2, 3]


@pytest.mark.parametrize(
    ("text", "local_rank", "expected"),
    [("cpu", None, "cpu"), (" CPU ", None, "cpu"), ("cpu", 3, "cpu")],
)
def test_parse_device_cpu(text, local_rank, expected):
    assert distributed.parse_device(text, local_rank=local_rank) == expected


@pytest.mark.parametrize(
    ("text", "local_rank", "message"),
    [
        ("cuda:1", 0, "every rank on one GPU"),
        ("tpu", 0, "unknown device 'tpu'; use auto, cpu or cuda"),
        ("tpu", None, "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
        ("cuda:x", None, "unknown device 'cuda:x'"),
    ],
)
def test_parse_device_refusals(text, local_rank, message):
    with pytest.raises(UserError, match=message):
        distributed.parse_device(text, local_rank=local_rank)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize(("text", "local_rank"), [("cuda", 0), ("cuda", None), ("cuda:0", None)])
def test_parse_device_without_cuda(text, local_rank):
    assert distributed.parse_device("auto", local_rank=local_rank) == "cpu"
    with pytest.raises(UserError, match="CUDA is not available"):
        distributed.parse_device(text, local_rank=local_rank)


@pytest.mark.parametrize("n", [0, 1, 5, 16, 17])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_index_once(n, world):
    indices = list(range(100, 100 + n))
    shards = [distributed.shard(indices, r, world) for r in range(world)]
    flat = sorted(i for s in shards for i in s)
    assert flat == indices  # no gaps, no duplicates (no padding)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards[0][:2] == indices[0 : 2 * world : world]  # rank r takes r, r+W, ...
    with pytest.raises(ValueError, match="rank must be in"):
        distributed.shard(indices, world, world)


def _row(index, eps=None, **changes):
    row = {
        "path": f"img{index}.JPEG", "label": 1, "clean_pred": 1, "adv_pred": 2,
        "success": True, "linf": 0.01, "l2": 0.1, "index": index, "eps": eps, "target": None,
        "clean_conf": 0.5, "adv_conf": 0.4, "attack_success": True,
        "adv_path": f"img{index}.png", "broken_by": "", "adv_sha256": "", "l1": 0.5,
    }  # fmt: skip
    return {**row, **changes}


def test_consolidate_merges_partials_only_on_resume(tmp_path):
    names = [partial_manifest_name(r, 2) for r in range(2)]
    assert names == ["manifest.rank0-of-2.csv", "manifest.rank1-of-2.csv"]
    (tmp_path / names[0]).write_text(format_manifest([_row(0), _row(2)]))
    (tmp_path / names[1]).write_text(format_manifest([_row(1)]))
    (tmp_path / "report.rank0-of-2.json").write_text("{}")  # an older version's file
    (tmp_path / "manifest.csv").write_text(format_manifest([_row(0)]))  # overlap: fine
    with pytest.raises(UserError, match=r"already holds results.*--resume"):
        consolidate(tmp_path, resume=False, overwrite=False)
    with pytest.raises(UserError, match="exclude each other"):
        consolidate(tmp_path, resume=True, overwrite=True)
    assert len(list(tmp_path.iterdir())) == 4  # nothing touched by the refusals
    consolidate(tmp_path, resume=True, overwrite=False)
    assert [r["index"] for r in read_manifest(tmp_path / "manifest.csv")] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]
    consolidate(tmp_path, resume=False, overwrite=False)  # nothing left to do


def test_consolidate_refuses_conflicting_rows_and_overwrite_removes_pngs(tmp_path):
    (tmp_path / "manifest.rank0-of-2.csv").write_text(format_manifest([_row(0)]))
    (tmp_path / "manifest.rank0-of-3.csv").write_text(format_manifest([_row(0, adv_pred=7)]))
    with pytest.raises(UserError, match=r"conflicting results for image 'img0\.JPEG'"):
        consolidate(tmp_path, resume=True, overwrite=False)
    (tmp_path / "adv").mkdir()
    (tmp_path / "adv" / "img0.png").write_bytes(b"png")
    (tmp_path / "adv" / "other.png").write_bytes(b"not ours")
    consolidate(tmp_path, resume=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adv", "other.png"]


def test_rounds_count_progress_and_drain_single_process():
    from advtune.run.batch import BatchOutput
    from advtune.run.callbacks import RunCallbacks
    from advtune.run.runner import _Rounds

    seen = []

    class Spy(RunCallbacks):
        def on_batch(self, batches):
            seen.append(("batch", batches))

        def on_progress(self, progress):
            seen.append(("progress", progress.done, progress.successes, progress.eligible))

    rounds = _Rounds(distributed.Communicator(), [Spy()], total=4)
    # Untargeted: successes count among correctly classified images (the table's rule).
    rows = [
        {"label": 1, "clean_pred": 1, "clean_conf": 0.5, "success": True},
        {"label": 1, "clean_pred": 0, "clean_conf": 0.5, "success": True},
    ]
    out = BatchOutput(rows=rows, images=[], model_calls=1)
    rounds.batch_done(out, 2, 1, targeted=False)
    rounds.batch_done(out, 2, 2, targeted=False)
    assert seen == [("progress", 2, 1, 1), ("batch", 1), ("progress", 4, 2, 2), ("batch", 2)]
    assert rounds.finish(failed=False) == set()
    assert _Rounds(distributed.Communicator(), [], total=0).finish(failed=True) == {0}


# --------------------------------------------------------------------------- torchrun


def test_torchrun_generate_equals_single_process(setup, reference, tmp_path):
    data, ckpt = setup
    out = tmp_path / "out"
    proc = torchrun(args_for("generate", data, ckpt, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, single = assert_same_results(out, reference / "generate", pngs=True)
    report = json.loads((out / "report.json").read_text())
    ranks = report["distributed"]["ranks"]
    assert report["distributed"]["world_size"] == 2 and report["distributed"]["backend"] == "gloo"
    # Rank r took indices r, r+2, r+4 of the 6 images.
    assert [r["images"] for r in ranks] == [3, 3] and {r["status"] for r in ranks} == {"complete"}
    assert report["timings"]["images_this_session"] == 6
    assert report["settings"]["world_size"] == 2
    # Out-of-memory back-off figures are reported as a single process reports them.
    assert report["settings"]["oom_backoffs"] == 0 == single["settings"]["oom_backoffs"]
    assert report["settings"]["final_batch_size"] == single["settings"]["final_batch_size"]
    assert all(r["oom_backoffs"] == 0 for r in ranks)
    assert "distributed" not in single


def test_failing_rank_fails_the_run_and_resume_continues(setup, reference, tmp_path):
    data, ckpt = setup
    out = tmp_path / "out"
    # Rank 1 is interrupted after its first batch; rank 0 stops after its current one.
    proc = torchrun(args_for("evaluate", data, ckpt, out), env={STOP_HOOK_ENV: "1@1"})
    assert proc.returncode != 0
    assert "advtune: interrupted" in proc.stderr  # rank 1's own message
    assert "rank 1 of 2 failed" in proc.stderr and "--resume" in proc.stderr  # rank 0's
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted"
    assert [r["status"] for r in report["distributed"]["ranks"]] == ["stopped", "interrupted"]
    done = [r["index"] for r in read_manifest(out / "manifest.csv")]
    assert done and len(done) < 12 and done == sorted(done)
    # Resume with another world size (a single process): the same final result.
    assert main([*args_for("evaluate", data, ckpt, out), "--resume"]) == 0
    resumed, _ = assert_same_results(out, reference / "evaluate")
    assert resumed["timings"]["resumed"] is True
    assert (out / "robust_accuracy.png").exists()


def test_killed_run_resumes_per_rank(setup, reference, tmp_path):
    data, ckpt = setup
    out = tmp_path / "out"
    args = args_for("evaluate", data, ckpt, out)
    # Every rank SIGKILLs itself after one batch: no clean-up code runs at all.
    proc = torchrun(args, env={STOP_HOOK_ENV: "1:kill"})
    assert proc.returncode != 0
    partial = sorted(p.name for p in out.glob("manifest.rank*"))
    assert partial == ["manifest.rank0-of-2.csv", "manifest.rank1-of-2.csv"]
    # Rank r's first batch: indices r and r + 2, one row per eps.
    assert [r["index"] for r in read_manifest(out / partial[0])] == [0, 0, 2, 2]
    assert [r["index"] for r in read_manifest(out / partial[1])] == [1, 1, 3, 3]
    assert not list(out.rglob("*.tmp"))
    # Without --resume the folder is protected.
    rc = main(args)
    assert rc == 2
    proc = torchrun([*args, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed, _ = assert_same_results(out, reference / "evaluate")
    assert [r["images"] for r in resumed["distributed"]["ranks"]] == [1, 1]


class _RankOf2(distributed.TorchCommunicator):
    """Rank ``rank`` of 2 whose collectives answer from ``peer`` (no process group)."""

    def __init__(self, rank, peer):
        super().__init__(
            rank=rank, world_size=2, local_rank=rank, device="cpu", backend="gloo", group=None
        )
        self.peer = peer

    def broadcast(self, obj):
        return obj if self.is_main else self.peer

    def all_gather(self, obj):
        return [obj, self.peer] if self.is_main else [self.peer, obj]


def test_on_main_runs_once_and_raises_rank0s_user_error_on_every_rank():
    calls = []
    assert _RankOf2(0, None).on_main(lambda: calls.append(0) or ["a"]) == ["a"]
    assert _RankOf2(1, (["a"], None)).on_main(lambda: calls.append(1)) == ["a"]
    assert calls == [0]  # rank 1 never ran it: it got rank 0's result
    with pytest.raises(UserError, match="already holds results"):
        _RankOf2(1, (None, "already holds results")).on_main(lambda: calls.append(1))

    def refuse():
        raise UserError("already holds results")

    comm = _RankOf2(0, None)
    comm.broadcast = lambda obj: obj  # rank 0 sends (value, message) to the others
    with pytest.raises(UserError, match="already holds results"):
        comm.on_main(refuse)
    # One process: the function's own error, unchanged.
    with pytest.raises(UserError, match="already holds results"):
        distributed.Communicator().on_main(refuse)


def test_require_same_names_every_rank_and_its_value():
    distributed.Communicator().require_same(1, label="1 image", what="datasets", hint="h")
    same = ((5, "abc"), "5 images", "host-b")
    _RankOf2(0, same).require_same((5, "abc"), label="5 images", what="datasets", hint="h")
    other = ((4, "abd"), "4 images", "host-b")
    with pytest.raises(UserError) as e:
        _RankOf2(0, other).require_same(
            (5, "abc"), label="5 images", what="datasets", hint="check --data on every node"
        )
    message = str(e.value)
    assert "the ranks list different datasets" in message
    assert "rank 0 (" in message and "5 images" in message
    assert "rank 1 (host-b): 4 images" in message and message.endswith("check --data on every node")


def test_describe_is_the_jobs_shape_only_when_distributed():
    assert distributed.Communicator().describe() is None
    assert _RankOf2(0, None).describe() == {"world_size": 2, "backend": "gloo"}
