"""The code paths taken only on CUDA (or under NCCL), exercised on the CPU.

No GPU is available where most of the suite runs, so :class:`FakeCuda` stands in for the
CUDA runtime: ``torch.cuda``'s queries and memory statistics are recorded and scripted,
tensors sent to a ``cuda`` device stay on the CPU (and are remembered as "on the GPU"),
and a simulated allocator raises ``torch.cuda.OutOfMemoryError`` for any single CUDA
allocation above a budget. The real code of ``advtune.runtime``, ``advtune.bench``,
``advtune.run``, ``advtune.data`` and ``advtune.run.comm`` then runs its CUDA
branches; the tests check what it chooses (batch sizes), which calls it makes and in
which order (synchronize before reading a clock, peak statistics reset before the
measured loop), and that every collective goes through the gloo control group with CPU
tensors (NCCL cannot carry CPU tensors).

The tests at the end (``needs_cuda``) run the same paths on a real GPU and are skipped
without one.
"""

from __future__ import annotations

import datetime
import json
import pickle
import socket
import threading
import types
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from fakes import TensorImages, linear_classifier
from torch import nn

from advtune import bench, runtime
from advtune.data import build_dataset, make_loader
from advtune.errors import UserError
from advtune.run import AttackConfig, RunSpec, run
from advtune.run import comm as distributed
from advtune.run import loop as ev
from advtune.run.probe import auto_batch_size as run_auto_batch_size
from advtune.run.report import device_info

MIB = 2**20
SIZE = 8
CLASSES = 5

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# --------------------------------------------------------------------------- fake CUDA


def _is_cuda(device) -> bool:
    try:
        return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"
    except RuntimeError:  # a string that is no device (e.g. a dtype name)
        return False


class _Identities:
    """A set of tensors by identity, holding no references (a WeakSet compares tensors
    with ``==``, which is elementwise)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        key = id(t)
        self._refs[key] = weakref.ref(t, lambda _, key=key: self._refs.pop(key, None))

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


class FakeCuda:
    """A scripted CUDA runtime (see the module docstring).

    Attributes:
        events: ``(name, detail)`` in call order: ``torch.cuda`` calls, ``to`` (a copy
            to a CUDA device, with its ``non_blocking`` flag), ``alloc`` (a CUDA factory
            call), ``oom`` (a simulated out-of-memory), ``pin`` (a pinned tensor).
        allocated: what ``memory_allocated`` answers (bytes).
        peak: what ``max_memory_allocated`` answers (bytes).
        budget: largest single CUDA allocation in bytes (``None``: no limit).
        on_gpu: tensors that would live on the GPU (weak references).
        on_empty_cache: called at every ``empty_cache`` (e.g. to check that nothing is
            still referenced then).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, devices: int = 2) -> None:
        self.events: list[tuple[str, object]] = []
        self.allocated = 3 * MIB
        self.peak = 11 * MIB
        self.budget: int | None = None
        self.devices = devices
        self.current = 0
        self.on_gpu = _Identities()
        self.on_empty_cache = lambda: None
        self._patch(monkeypatch)

    # -- bookkeeping

    def names(self, *wanted: str) -> list[str]:
        return [name for name, _ in self.events if not wanted or name in wanted]

    def details(self, name: str) -> list[object]:
        return [detail for n, detail in self.events if n == name]

    def _index(self, device) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        d = torch.device(device)
        return d.index if d.index is not None else self.current

    def _record(self, name: str, device=None) -> None:
        self.events.append((name, f"cuda:{self._index(device)}"))

    # -- the patches

    def _patch(self, mp: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        mp.setattr(cuda, "is_available", lambda: True)
        mp.setattr(cuda, "device_count", lambda: self.devices)
        mp.setattr(cuda, "current_device", lambda: self.current)
        mp.setattr(cuda, "set_device", self._set_device)
        mp.setattr(cuda, "get_device_name", lambda d=None: f"Fake GPU {self._index(d)}")
        mp.setattr(
            cuda,
            "get_device_properties",
            lambda d=None: types.SimpleNamespace(
                name=f"Fake GPU {self._index(d)}", total_memory=80 * 2**30
            ),
        )
        mp.setattr(cuda, "synchronize", lambda d=None: self._record("synchronize", d))
        mp.setattr(cuda, "empty_cache", self._empty_cache)
        mp.setattr(cuda, "reset_peak_memory_stats", lambda d=None: self._record("reset_peak", d))
        mp.setattr(cuda, "memory_allocated", self._memory_allocated)
        mp.setattr(cuda, "max_memory_allocated", self._max_memory_allocated)
        # Tensors "sent to the GPU" stay on the CPU.
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            target = next((a for a in args if _is_cuda(a)), kwargs.get("device"))
            if not _is_cuda(target):
                return real_to(tensor, *args, **kwargs)
            non_blocking = kwargs.get("non_blocking", next((a for a in args if a is True), False))
            self._allocate(tensor.numel() * tensor.element_size())
            self.events.append(("to", (f"cuda:{self._index(target)}", bool(non_blocking))))
            args = tuple("cpu" if _is_cuda(a) else a for a in args)
            if "device" in kwargs:
                kwargs["device"] = "cpu"
            out = real_to(tensor, *args, **{**kwargs, "copy": True})
            self.on_gpu.add(out)
            return out

        mp.setattr(torch.Tensor, "to", to)
        for name in ("rand", "randn", "zeros", "ones", "empty", "full"):
            mp.setattr(torch, name, self._factory(getattr(torch, name)))
        # Pinned memory (the data loader pins batches bound for CUDA).
        mp.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: self._pin(t))
        accelerator = getattr(torch, "accelerator", None)
        if accelerator is not None:  # torch >= 2.6: the DataLoader asks torch.accelerator
            mp.setattr(accelerator, "is_available", lambda: True)
            mp.setattr(accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))

    def _set_device(self, device) -> None:
        self._record("set_device", device)
        self.current = self._index(device)

    def _empty_cache(self) -> None:
        self.events.append(("empty_cache", None))
        self.on_empty_cache()

    def _memory_allocated(self, device=None) -> int:
        self._record("memory_allocated", device)
        return self.allocated

    def _max_memory_allocated(self, device=None) -> int:
        self._record("max_memory_allocated", device)
        return self.peak

    def _allocate(self, nbytes: int) -> None:
        if self.budget is not None and nbytes > self.budget:
            self.events.append(("oom", nbytes))
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {nbytes / MIB:.2f} MiB (simulated)"
            )

    def _pin(self, tensor):
        self.events.append(("pin", tuple(tensor.shape)))
        return tensor

    def _factory(self, real):
        def make(*args, **kwargs):
            if not _is_cuda(kwargs.get("device")):
                return real(*args, **kwargs)
            # The size: a tuple first (always for full(size, value)), or the ints.
            sized = args and isinstance(args[0], (tuple, list))
            shape = args[0] if sized or real is torch.full else args
            numel = 1
            for s in shape:
                numel *= int(s)
            dtype = kwargs.get("dtype") or torch.get_default_dtype()
            # Checked before allocating: the probes ask for far more than a CPU test should.
            self._allocate(numel * torch.empty((), dtype=dtype).element_size())
            self.events.append(("alloc", numel))
            out = real(*args, **{**kwargs, "device": "cpu"})
            self.on_gpu.add(out)
            return out

        return make


@pytest.fixture
def fake_cuda(monkeypatch):
    runtime.clear_batch_size_cache()
    yield FakeCuda(monkeypatch)
    runtime.clear_batch_size_cache()


# --------------------------------------------------------------------------- small fixtures


def linear_model(seed: int = 0) -> nn.Module:
    return linear_classifier(seed, size=SIZE, classes=CLASSES, name="linear", categories=False)


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, CLASSES),
    ).eval()


def batches_of(ds: TensorImages, size: int) -> list[dict]:
    out = []
    for start in range(0, len(ds), size):
        idx = list(range(start, min(start + size, len(ds))))
        out.append(
            {
                "image": ds.images[idx],
                "label": torch.tensor([ds.labels[i] for i in idx]),
                "index": torch.tensor(idx),
                "path": [ds.paths[i] for i in idx],
            }
        )
    return out


PGD = AttackConfig(
    attack="pgd", norm="linf", eps=(8 / 255,), params={"steps": 2}, targeted="random", seed=1
)


def _clock(events: list) -> types.SimpleNamespace:
    """A ``time`` module stand-in whose ``perf_counter`` reads are logged into ``events``."""
    ticks = iter(range(1, 10**6))

    def perf_counter() -> float:
        events.append(("clock", None))
        return float(next(ticks))

    return types.SimpleNamespace(perf_counter=perf_counter)


# --------------------------------------------------------------------------- runtime


def test_oom_messages_of_the_cuda_libraries_count_as_oom():
    assert runtime.is_oom_error(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert runtime.is_oom_error(RuntimeError("CUDA error: out of memory"))
    assert runtime.is_oom_error(
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    )
    assert runtime.is_oom_error(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    # Errors that are not about memory must propagate (a retry would not help).
    assert not runtime.is_oom_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not runtime.is_oom_error(RuntimeError("CUDNN_STATUS_NOT_SUPPORTED"))


def test_auto_batch_size_on_cuda_probes_synchronizes_and_frees(fake_cuda, tmp_path):
    fits = 37
    refs: list[weakref.ref] = []
    sizes: list[int] = []
    alive_at_empty_cache: list[bool] = []
    fake_cuda.on_empty_cache = lambda: alive_at_empty_cache.append(
        any(r() is not None for r in refs)
    )

    def step(model, x):
        sizes.append(x.shape[0])
        if x.shape[0] > fits:
            # An activation the failed step held: must be freed before empty_cache runs.
            activation = torch.empty(x.shape[0], 16)
            refs.append(weakref.ref(activation))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    model = nn.Linear(2, 2)
    cache = tmp_path / "batch_size.json"
    kw = {"input_shape": (3, 4, 4), "device": "cuda:1", "key": "k", "cache_file": cache}
    assert runtime.auto_batch_size(model, step=step, **kw) == 33  # 90 % of 37, rounded down
    assert max(sizes) > fits and fits in sizes  # bisected down to the exact size
    # Every probe's input was allocated on the probed device ...
    assert len(fake_cuda.details("alloc")) == len(sizes)
    # ... each successful probe was synchronized (kernels are asynchronous: an error of
    # the step surfaces there) on that device; after every probe the cache was emptied,
    # with nothing of the failed step still referenced.
    assert fake_cuda.details("synchronize") == ["cuda:1"] * sum(s <= fits for s in sizes)
    assert fake_cuda.names("empty_cache") == ["empty_cache"] * len(sizes)
    assert len(alive_at_empty_cache) == len(sizes) and not any(alive_at_empty_cache)
    # A second process reads the answer from the file without touching the GPU.
    runtime.clear_batch_size_cache()
    n = len(fake_cuda.events)
    assert runtime.auto_batch_size(model, step=step, **kw) == 33  # 90 % of 37, rounded down
    assert len(fake_cuda.events) == n


def test_auto_batch_size_default_step_on_cuda(fake_cuda):
    # The default step (CE of the argmax, input gradient) on inputs the allocator can hold.
    fake_cuda.budget = 20 * 3 * 4 * 4 * 4  # 20 images of 3x4x4 float32
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    size = runtime.auto_batch_size(model, input_shape=(3, 4, 4), device="cuda")
    assert size == 18  # 90 % of 20
    assert fake_cuda.names("oom") and set(fake_cuda.details("synchronize")) == {"cuda:0"}


def test_oom_backoff_frees_the_failed_chunk_before_emptying_the_cache(fake_cuda):
    refs: list[weakref.ref] = []
    alive: list[bool] = []
    fake_cuda.on_empty_cache = lambda: alive.append(any(r() is not None for r in refs))

    def fn(chunk):
        work = chunk * 2
        if chunk.shape[0] > 3:
            refs.append(weakref.ref(work))  # pinned by the traceback if that is kept
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return work

    x = torch.arange(10.0)
    result = runtime.run_with_oom_backoff(fn, x)
    assert torch.equal(result.value, x * 2)
    assert result.chunk_size == 2 and result.oom_count == 2  # 10 -> 5 -> 2
    assert fake_cuda.names("empty_cache") == ["empty_cache"] * 2
    assert alive == [False, False]


# --------------------------------------------------------------------------- bench


def test_bench_peak_memory_sequence_and_arithmetic(fake_cuda, monkeypatch):
    steps_log = fake_cuda.events
    real_steps = bench._pgd_steps

    def pgd_steps(model, x, y, steps, delta):
        steps_log.append(("steps", steps))
        return real_steps(model, x, y, steps, delta)

    monkeypatch.setattr(bench, "_pgd_steps", pgd_steps)
    monkeypatch.setattr(bench, "time", _clock(fake_cuda.events))
    fake_cuda.allocated, fake_cuda.peak = 5 * MIB, 29 * MIB
    dev = torch.device("cuda:1")
    rate, peak = bench.pgd_throughput(
        conv_model().to(dev), batch=4, size=SIZE, steps=3, device=dev, measure_peak=True
    )
    # Peak of the timed loop above what was allocated before it (model, images), per image.
    assert peak == (29 - 5) / 4
    assert rate > 0
    names = fake_cuda.names(
        "steps", "synchronize", "empty_cache", "reset_peak", "memory_allocated", "clock",
        "max_memory_allocated",
    )  # fmt: skip
    assert names == [
        "steps",  # warm-up (compiles under --compile): neither timed nor measured
        "synchronize",
        "empty_cache",
        "reset_peak",
        "memory_allocated",
        "clock",
        "steps",
        "synchronize",  # the kernels finish before the clock is read
        "clock",
        "max_memory_allocated",
    ]
    assert fake_cuda.details("steps") == [1, 3]
    devices = {d for n, d in fake_cuda.events if n in ("synchronize", "reset_peak")}
    assert devices == {"cuda:1"}


def test_run_bench_on_cuda_measures_every_row(fake_cuda):
    per_image = 3 * SIZE * SIZE * 4
    fake_cuda.budget = 100 * per_image  # the simulated GPU holds 100 input images
    fake_cuda.allocated, fake_cuda.peak = 2 * MIB, 6 * MIB
    result = bench.run_bench(
        "conv",
        modes=("eval", "tune"),
        batch_size=4,
        size=SIZE,
        steps=2,
        device="cuda",
        max_batch_limit=1000,
        model_factory=conv_model,
    )
    assert result.device == "cuda" and result.device_name == "Fake GPU 0"
    for row in result.rows:
        assert row.error is None
        assert row.saved_mib_per_image > 0 and row.images_steps_per_s > 0
        assert row.peak_mib_per_image == 1.0  # (6 - 2) MiB over 4 images
        # find_max_batch bisects to within 5 % below the largest batch that fits.
        assert 95 <= row.max_batch <= 100
    assert "CUDA only" not in result.table()
    # The cache is emptied after each mode, so one mode's blocks do not shrink the next's.
    assert fake_cuda.names("empty_cache").count("empty_cache") >= len(result.rows)


def test_run_bench_max_batch_limit_zero_skips_the_probe(fake_cuda):
    fake_cuda.budget = 100 * 3 * SIZE * SIZE * 4
    result = bench.run_bench(
        "conv", modes=("frozen",), batch_size=4, size=SIZE, steps=1, device="cuda",
        max_batch_limit=0, model_factory=conv_model,
    )  # fmt: skip
    (row,) = result.rows
    assert row.max_batch is None and row.images_steps_per_s > 0
    with pytest.raises(UserError, match="--max-batch-limit must be >= 0, got -1"):
        bench.run_bench("conv", device="cuda", max_batch_limit=-1, model_factory=conv_model)


def test_run_bench_on_cuda_reports_oom_rows_and_goes_on(fake_cuda):
    fake_cuda.budget = 3 * 3 * SIZE * SIZE * 4  # not even the 4-image batch fits
    result = bench.run_bench(
        "conv", modes=("eval", "tune"), batch_size=4, size=SIZE, steps=1, device="cuda",
        model_factory=conv_model,
    )  # fmt: skip
    assert [r.error for r in result.rows] == ["out of memory (OutOfMemoryError)"] * 2
    assert "failed: out of memory" in result.table()


def test_cuda_device_names(fake_cuda):
    """One parser for --device everywhere (bench, evaluate, load_model, torchrun)."""
    assert runtime.parse_device("auto") == "cuda"
    assert runtime.parse_device("cuda:1") == "cuda:1"
    assert distributed.parse_device is runtime.parse_device
    with pytest.raises(UserError, match="only 2 CUDA device"):
        runtime.parse_device("cuda:2")
    with pytest.raises(UserError, match="cuda:N"):
        runtime.parse_device("cuda:x")


# --------------------------------------------------------------------------- evaluator


def _run_attack(ds, device, model=None):
    rows = []
    stats = ev.attack_loader(
        model or linear_model(), batches_of(ds, 3), PGD, sink=lambda out: rows.extend(out.rows),
        device=device, pad_to=3,
    )  # fmt: skip
    return rows, stats


def test_run_attack_on_cuda_copies_async_syncs_before_timing_and_reads_peak(fake_cuda, monkeypatch):
    ds = TensorImages(7)
    reference, _ = _run_attack(ds, "cpu")
    fake_cuda.events.clear()
    monkeypatch.setattr(ev, "time", _clock(fake_cuda.events))
    fake_cuda.peak = 123456
    rows, stats = _run_attack(ds, torch.device("cuda:1"))
    assert rows == reference  # the CUDA branches change nothing in the results
    assert stats.peak_memory_bytes == 123456 and stats.images == 7 and stats.batches == 3
    # Images go to the GPU asynchronously (from pinned memory when the loader pins).
    assert fake_cuda.details("to")[:1] == [("cuda:1", True)]
    names = fake_cuda.names("reset_peak", "to", "synchronize", "clock", "max_memory_allocated")
    assert names[:2] == ["reset_peak", "clock"] and names[-2:] == ["clock", "max_memory_allocated"]
    body = names[2:-2]
    # Per batch: the copy, the attack clock starts, ..., synchronize, the clock is read.
    per_batch = [i for i, n in enumerate(body) if n == "synchronize"]
    assert len(per_batch) == 3
    for i in per_batch:
        assert body[i + 1] == "clock" and "clock" in body[:i]
    devices = {d for n, d in fake_cuda.events if n in ("reset_peak", "synchronize")}
    assert devices == {"cuda:1"}


def test_run_attack_on_cuda_backs_off_and_frees_before_empty_cache(fake_cuda, monkeypatch):
    ds = TensorImages(7)
    reference, _ = _run_attack(ds, "cpu")
    real = ev.attack_batch
    refs: list[weakref.ref] = []
    alive: list[bool] = []
    fake_cuda.on_empty_cache = lambda: alive.append(any(r() is not None for r in refs))

    def attack_batch(model, images, *args, **kwargs):
        if images.shape[0] > 2:
            held = images.clone()  # what the failed call had allocated
            refs.append(weakref.ref(held))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(ev, "attack_batch", attack_batch)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        rows, stats = _run_attack(ds, "cuda")
    assert stats.oom_backoffs == 1 and stats.final_batch_size == 1
    assert alive == [False]
    # Every image attacked once; at chunk size 1 each image's result is its own.
    assert [r["index"] for r in rows] == list(range(7))
    assert len(rows) == len(reference)


def test_auto_batch_size_of_the_evaluator_on_cuda(fake_cuda, tmp_path):
    per_image = 3 * SIZE * SIZE * 4
    fake_cuda.budget = 50 * per_image
    kw = {
        "input_shape": (3, SIZE, SIZE), "device": "cuda", "key": {"model": "linear"},
        "limit": 500, "cache_file": tmp_path / "cache.json",
    }  # fmt: skip
    size = run_auto_batch_size(linear_model(), PGD, **kw)
    # 90 % of the largest batch whose one-step attack (clean pass, PGD, re-check) fits:
    # between 48 and 50 images fit (bisection within 5 %), so 43 to 45.
    assert 43 <= size <= 45
    assert fake_cuda.names("oom") and "synchronize" in fake_cuda.names()
    [entry] = json.loads((tmp_path / "cache.json").read_text())["entries"].values()
    assert entry["key"]["device"] == "Fake GPU 0" and entry["batch_size"] == size


def test_device_info_on_cuda(fake_cuda):
    info = device_info("cuda")
    assert info == {
        "type": "cuda", "name": "Fake GPU 0", "index": 0, "total_memory_bytes": 80 * 2**30,
    }  # fmt: skip
    assert device_info("cuda:1")["index"] == 1


# --------------------------------------------------------------------------- data


def test_loader_for_cuda_pins_batches_and_records_skipped_images(fake_cuda, tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (SIZE, SIZE), (40 * i, 0, 0)).save(root / f"a{i}.png")
    (root / "a1b_broken.png").write_bytes(b"not an image")
    from torchvision.transforms.functional import to_tensor

    ds = build_dataset(root, transform=to_tensor)
    loader = make_loader(ds, batch_size=2, num_workers=0, device="cuda:1")
    assert loader.pin_memory is True
    with pytest.warns(UserWarning, match="skipping a1b_broken.png"):
        batches = list(loader)
    # The structure survives pinning (which rebuilds containers, tuples included).
    assert [b["path"] for b in batches] == [["a0.png", "a1.png"], ["a2.png"]]
    assert [path for path, _ in ds.skipped] == ["a1b_broken.png"]
    pinned = fake_cuda.details("pin")
    assert (2, 3, SIZE, SIZE) in pinned and (1, 3, SIZE, SIZE) in pinned
    assert not make_loader(ds, batch_size=2, device="cpu").pin_memory


# --------------------------------------------------------------------------- distributed


class FakeProcessGroups:
    """``torch.distributed`` for ``init``: records the calls, joins nothing."""

    def __init__(self, monkeypatch, events, *, device_id_keyword: bool = True) -> None:
        import torch.distributed as dist

        self.events = events
        self.control = object()
        self.initialized = False
        if device_id_keyword:

            def init_process_group(backend=None, init_method=None, timeout=None,
                                   world_size=-1, rank=-1, store=None, group_name="",
                                   pg_options=None, device_id=None):  # fmt: skip
                self._init(backend=backend, timeout=timeout, device_id=device_id)

        else:  # torch 2.2's signature: no device_id

            def init_process_group(backend=None, init_method=None, timeout=None,
                                   world_size=-1, rank=-1, store=None, group_name="",
                                   pg_options=None):  # fmt: skip
                self._init(backend=backend, timeout=timeout)

        monkeypatch.setattr(dist, "is_available", lambda: True)
        monkeypatch.setattr(dist, "is_initialized", lambda: self.initialized)
        monkeypatch.setattr(dist, "init_process_group", init_process_group)
        monkeypatch.setattr(dist, "new_group", self._new_group)
        monkeypatch.setattr(distributed, "_JOINED", None)

    def _init(self, **kwargs) -> None:
        self.events.append(("init_process_group", kwargs))
        self.initialized = True

    def _new_group(self, ranks=None, timeout=None, backend=None, **kwargs):
        self.events.append(("new_group", {"backend": backend, "timeout": timeout}))
        return self.control


def _torchrun_env(monkeypatch, rank, world, local):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")


@pytest.mark.parametrize("device_id_keyword", [True, False], ids=["torch>=2.3", "torch2.2"])
def test_init_under_nccl_sets_the_device_first_and_uses_a_gloo_control_group(
    fake_cuda, monkeypatch, device_id_keyword
):
    _torchrun_env(monkeypatch, rank=3, world=4, local=1)
    groups = FakeProcessGroups(monkeypatch, fake_cuda.events, device_id_keyword=device_id_keyword)
    ctx = distributed.init_comm("auto")
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 1)
    assert ctx.device == "cuda:1" and ctx.backend == "nccl" and ctx.group is groups.control
    timeout = datetime.timedelta(seconds=42)
    expected_init = {"backend": "nccl", "timeout": timeout}
    if device_id_keyword:
        expected_init["device_id"] = torch.device("cuda:1")
    # The GPU is selected before NCCL starts (NCCL, the pin-memory thread and plain
    # "cuda" tensors use the current device), then the gloo group for control messages.
    assert fake_cuda.events == [
        ("set_device", "cuda:1"),
        ("init_process_group", expected_init),
        ("new_group", {"backend": "gloo", "timeout": timeout}),
    ]
    assert distributed.init_comm("auto") is ctx  # idempotent
    assert len(fake_cuda.events) == 3


def test_init_with_too_few_gpus_fails_before_joining(fake_cuda, monkeypatch):
    _torchrun_env(monkeypatch, rank=2, world=4, local=2)  # fake_cuda has 2 GPUs
    FakeProcessGroups(monkeypatch, fake_cuda.events)
    with pytest.raises(UserError, match="LOCAL_RANK 2 has no GPU"):
        distributed.init_comm("cuda")
    assert fake_cuda.events == []


def test_init_on_cpu_is_gloo_without_a_second_group(monkeypatch):
    import torch.distributed as dist

    events: list = []
    _torchrun_env(monkeypatch, rank=0, world=2, local=0)
    FakeProcessGroups(monkeypatch, events)
    ctx = distributed.init_comm("cpu")
    assert ctx.backend == "gloo" and ctx.device == "cpu" and ctx.group is dist.group.WORLD
    assert [name for name, _ in events] == ["init_process_group"]
    assert "device_id" not in events[0][1] or events[0][1]["device_id"] is None


def test_device_id_keyword_detection():
    assert distributed._accepts_device_id(lambda backend=None, device_id=None: None)
    assert not distributed._accepts_device_id(lambda backend=None, timeout=None: None)
    import torch.distributed as dist

    # The keyword arrived in torch 2.3.
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    assert distributed._accepts_device_id(dist.init_process_group) is (version >= (2, 3))


class FakeCollectives:
    """Collectives between threads standing in for ranks, on a fake gloo control group.

    Every call checks what real NCCL/gloo would need: the control group (never the
    default group, which is NCCL on CUDA), CPU tensors that were never sent to the GPU,
    and picklable objects (each rank gets its own unpickled copy).
    """

    def __init__(self, monkeypatch, world: int, fake: FakeCuda) -> None:
        import torch.distributed as dist

        self.world, self.fake = world, fake
        self.group = object()
        self.local = threading.local()
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=60)
        self.calls: list[tuple[int, str]] = []
        self.violations: list[str] = []
        for name in ("all_reduce", "broadcast_object_list", "all_gather_object", "gather_object"):
            monkeypatch.setattr(dist, name, getattr(self, name))
        for name in ("barrier", "broadcast", "all_gather", "gather", "reduce", "scatter"):
            monkeypatch.setattr(dist, name, self._forbidden(name))

    def _forbidden(self, name):
        def call(*args, **kwargs):
            self.violations.append(f"{name} is not used by advtune")
            raise RuntimeError(f"unexpected collective {name}")

        return call

    def _check(self, name: str, group, tensors=()) -> int:
        rank = self.local.rank
        self.calls.append((rank, name))
        if group is not self.group:
            self.violations.append(f"{name} on group {group!r}, not the control group")
        for t in tensors:
            if t.device.type != "cpu" or t in self.fake.on_gpu:
                self.violations.append(f"{name} got a GPU tensor")
        return rank

    def _exchange(self, rank: int, value):
        self.slots[rank] = pickle.dumps(value)
        self.barrier.wait()
        out = [pickle.loads(s) for s in self.slots]
        self.barrier.wait()
        return out

    def all_reduce(self, tensor, op=None, group=None, async_op=False):
        rank = self._check("all_reduce", group, [tensor])
        values = self._exchange(rank, tensor)
        tensor.copy_(torch.stack(values).sum(0))

    def broadcast_object_list(self, object_list, src=0, group=None, device=None):
        rank = self._check("broadcast_object_list", group)
        values = self._exchange(rank, list(object_list))
        object_list[:] = values[src]

    def all_gather_object(self, object_list, obj, group=None):
        rank = self._check("all_gather_object", group)
        object_list[:] = self._exchange(rank, obj)

    def gather_object(self, obj, object_gather_list=None, dst=0, group=None):
        rank = self._check("gather_object", group)
        values = self._exchange(rank, obj)
        if rank == dst:
            object_gather_list[:] = values


def test_distributed_run_under_nccl_talks_only_through_the_gloo_group(
    fake_cuda, monkeypatch, tmp_path
):
    """Two ranks (threads) on "GPUs" cuda:0 and cuda:1 with NCCL as the default group: the
    whole run's collectives use the gloo control group with CPU tensors, and the merged
    results equal a single process's."""
    ds = TensorImages(7)

    def spec(name):
        return RunSpec(
            attack=PGD, out_dir=tmp_path / name, command="evaluate", batch_size=2, num_workers=0
        )

    single = run(spec("single"), linear_model(), ds)
    world = 2
    comm = FakeCollectives(monkeypatch, world, fake_cuda)

    def rank_main(rank: int):
        comm.local.rank = rank
        ctx = distributed.TorchCommunicator(
            rank=rank, world_size=world, local_rank=rank, device=f"cuda:{rank}",
            backend="nccl", group=comm.group,
        )  # fmt: skip
        return run(spec("dist"), linear_model(), ds, comm=ctx)

    with ThreadPoolExecutor(world) as pool:
        reports = list(pool.map(rank_main, range(world)))
    assert comm.violations == []
    assert reports[1] is None and reports[0]["status"] == "complete"
    # Both ranks took part in the same collectives, in the same order.
    per_rank = [[name for r, name in comm.calls if r == rank] for rank in range(world)]
    assert per_rank[0] == per_rank[1] and "all_reduce" in per_rank[0]
    # Each rank attacked on its own device; rank 0 merged everything.
    copies = {d for d, _ in fake_cuda.details("to")}
    assert copies == {"cuda:0", "cuda:1"}
    merged = (tmp_path / "dist" / "manifest.csv").read_text()
    assert merged == (tmp_path / "single" / "manifest.csv").read_text()
    assert reports[0]["metrics"] == single["metrics"]
    ranks = reports[0]["distributed"]["ranks"]
    assert [r["device"]["name"] for r in ranks] == ["Fake GPU 0", "Fake GPU 1"]
    assert all(r["peak_memory_bytes"] == fake_cuda.peak for r in ranks)


# --------------------------------------------------------------------------- real GPU


@needs_cuda
def test_real_cuda_oom_backoff_recovers_and_auto_batch_size_fits():
    """A real CUDA out-of-memory error (the allocator capped to a small share) is caught,
    its memory released, and the smaller chunks run; auto_batch_size stays within it."""
    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = 2 * 2**30 / total  # 2 GiB for this process
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    runtime.clear_batch_size_cache()
    try:
        model = conv_model().to(dev)
        per_image = 256 * 2**20  # 256 MiB per image: 16 images cannot fit in 2 GiB

        def fn(chunk):
            work = torch.zeros(chunk.shape[0], per_image // 4, device=dev)
            return model(chunk) + work[:, :1] * 0

        x = torch.rand(16, 3, SIZE, SIZE, device=dev)
        result = runtime.run_with_oom_backoff(fn, x)
        assert result.oom_count >= 1 and result.value.shape == (16, CLASSES)
        torch.testing.assert_close(result.value, model(x))

        def step(m, batch):
            torch.empty(batch.shape[0], per_image // 4, device=dev)

        size = runtime.auto_batch_size(model, input_shape=(3, SIZE, SIZE), step=step, limit=64)
        assert 1 <= size < 8
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()


@needs_cuda
def test_real_cuda_bench_and_loader():
    result = bench.run_bench(
        "conv", modes=("eval", "tune"), batch_size=8, size=32, steps=2, device="cuda",
        max_batch_limit=256, model_factory=conv_model,
    )  # fmt: skip
    for row in result.rows:
        assert row.error is None and row.peak_mib_per_image > 0
        assert row.images_steps_per_s > 0 and row.max_batch == 256
    ds = TensorImages(5)
    loader = make_loader(ds, batch_size=2, num_workers=1, device="cuda")
    batches = list(loader)
    assert all(b["image"].is_pinned() for b in batches)
    rows, stats = _run_attack(ds, "cuda", linear_model().to("cuda"))
    assert stats.peak_memory_bytes > 0 and len(rows) == 5


@needs_cuda
def test_real_nccl_process_group_with_gloo_control_group(monkeypatch):
    """One rank of NCCL (eager, with device_id where torch has it) plus the gloo control
    group: the object collectives and the counts all_reduce work on CPU tensors."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                       "WORLD_SIZE": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    backend, group = distributed._join("cuda:0", datetime.timedelta(seconds=120))
    try:
        assert backend == "nccl" and dist.get_backend() == "nccl"
        assert dist.get_backend(group) == "gloo"
        counts = torch.tensor([1, 2, 3])
        dist.all_reduce(counts, group=group)
        assert counts.tolist() == [1, 2, 3]
        box = [{"rows": [1, 2]}]
        dist.broadcast_object_list(box, src=0, group=group)
        out = [None]
        dist.all_gather_object(out, ("digest", 7), group=group)
        gathered = [None]
        dist.gather_object({"rank": 0}, gathered, dst=0, group=group)
        assert box == [{"rows": [1, 2]}] and out == [("digest", 7)] and gathered == [{"rank": 0}]
    finally:
        dist.destroy_process_group()


def test_single_process_cuda_n_becomes_the_current_device(monkeypatch, tmp_path, capsys):
    from advtune import cli

    calls = []
    monkeypatch.setattr(distributed, "parse_device", lambda device, local_rank=None: "cuda:1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    # A missing subset file stops the run right after the device is chosen.
    code = cli.main(
        ["evaluate", "--model", "resnet18", "--weights", "random", "--data", str(tmp_path / "d"),
         "--subset", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"),
         "--device", "cuda:1", "--attack", "fgsm"]
    )  # fmt: skip
    assert code == 2 and "missing.txt" in capsys.readouterr().err
    assert calls == [torch.device("cuda:1")]
