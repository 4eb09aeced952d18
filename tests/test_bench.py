"""advtune.bench: the saved-bytes counter, the benchmark driver and its CLI on CPU."""

from __future__ import annotations

import json

import pytest
import torch
from modelzoo import calibrate_bn
from torch import nn

import advtune
from advtune import cli
from advtune.bench import (
    count_saved_bytes,
    main,
    peak_bytes,
    peak_bytes_per_image,
    run_bench,
    saved_bytes_per_image,
)
from advtune.errors import UserError


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    return calibrate_bn(model, (4, 3, 16, 16))


def test_count_saved_bytes_deduplicates_shared_storage():
    x = torch.rand(1000, requires_grad=True)
    # x * x saves x twice; x[:500] * 2 saves nothing; the view shares x's storage.
    assert count_saved_bytes(lambda: (x * x).sum()) == 4000
    assert count_saved_bytes(lambda: (x[:10] * x[10:20]).sum()) == 4000
    y = torch.rand(1000, dtype=torch.float64, requires_grad=True)
    assert count_saved_bytes(lambda: (x * y.float()).sum()) == 8000  # x, and y.float()


def test_peak_bytes_counts_tensors_alive_at_once():
    def work():
        a = torch.ones(1000)  # 4000 bytes
        b = a + a  # 8000 alive (tensor operands: Python scalars would allocate too)
        del a
        return b * b  # 8000 alive again; the result is dropped inside the measurement

    assert peak_bytes(work) == 8000
    kept = torch.ones(10)
    assert peak_bytes(lambda: kept.sum()) == 4  # tensors made before the call do not count


def test_step_peak_of_a_tiny_model_is_deterministic_and_below_eval():
    frozen = advtune.tune(_tiny_model(), "frozen")
    peaks = [peak_bytes_per_image(frozen, size=16, batches=(2, 4)) for _ in range(2)]
    floors = [peak_bytes_per_image(frozen, size=16, batches=(2, 4), grad=False) for _ in "ab"]
    eval_peak = peak_bytes_per_image(advtune.tune(_tiny_model(), "eval"), size=16, batches=(2, 4))
    assert peaks[0] == peaks[1] > 0
    assert floors[0] == floors[1] > 0
    # The native no-grad forward is not a strict floor: frozen's lean layers may hold less
    # at once (here the stem's folded input gradient and the uint8 pool offsets).
    assert peaks[0] < eval_peak
    with pytest.raises(ValueError, match="increasing"):
        peak_bytes_per_image(frozen, size=16, batches=(4, 2))


def test_saved_bytes_per_image_is_marginal_and_exact_for_a_tiny_model():
    model = _tiny_model()
    size = 16
    per_image = {
        mode: saved_bytes_per_image(advtune.tune(model, mode), size=size, batches=(2, 4))
        for mode in ("eval", "frozen")
    }
    # Frozen by hand: ReLU masks (8·16·16 and 16·8·8 bits), MaxPool offsets (8·8·8 bytes),
    # the log-softmax and the int64 target of the loss. Packed masks round per batch, not per
    # image; 16·8·8 and 8·16·16 bits are whole bytes, so the marginal is exact.
    expected = 8 * 16 * 16 / 8 + 16 * 8 * 8 / 8 + 8 * 8 * 8 + 10 * 4 + 8
    assert per_image["frozen"] == expected
    # Eval: input image, conv1 out (BN input), ReLU out (also the maxpool input), maxpool
    # indices (int64), maxpool out (conv2 input), conv2 out, ReLU out, the pooled vector
    # (linear input), the log-softmax and the target.
    eval_expected = (
        3 * 16 * 16 * 4
        + 2 * 8 * 16 * 16 * 4
        + 8 * 8 * 8 * 8
        + 8 * 8 * 8 * 4
        + 2 * 16 * 8 * 8 * 4
        + 16 * 4
        + 10 * 4
        + 8
    )
    assert per_image["eval"] == eval_expected


def test_run_bench_cpu_reports_what_it_can():
    result = run_bench(
        "tiny",
        modes=("eval", "deploy", "frozen"),
        size=16,
        steps=1,
        batch_size=2,
        device="cpu",
        peak_batches=(2, 4),
        repeats=3,
        model_factory=_tiny_model,
    )
    assert [r.mode for r in result.rows] == ["eval", "deploy", "frozen"]
    for row in result.rows:
        assert row.saved_mib_per_image > 0 and row.images_steps_per_s > 0
        assert len(row.images_steps_per_s_runs) == 3
        assert row.images_steps_per_s == sorted(row.images_steps_per_s_runs)[1]  # median
        assert row.step_peak_mib_per_image > 0 and row.floor_mib_per_image > 0  # every device
        assert row.peak_mib_per_image is None and row.max_batch is None  # CUDA only
    ratios = result.ratios()
    assert ratios["eval"]["saved_mib_per_image"] == 1.0
    assert ratios["frozen"]["saved_mib_per_image"] < 0.2
    assert ratios["frozen"]["step_peak_mib_per_image"] < 1.0
    text = result.table()
    assert "frozen" in text and "CUDA only" in text and "cost, not accuracy" in text
    assert "median of 3 interleaved runs" in text
    assert json.loads(json.dumps(result.to_dict()))["rows"][2]["mode"] == "frozen"


def test_bench_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "r18.json"
    argv = ["bench", "--model", "resnet18", "--size", "32", "--steps", "1", "--batch-size", "2"]
    argv += ["--device", "cpu", "--modes", "eval,frozen", "--json", str(out), "--no-peak"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "resnet18" in printed and "frozen" in printed
    data = json.loads(out.read_text())
    assert data["model"] == "resnet18" and data["device"] == "cpu"
    assert [r["mode"] for r in data["rows"]] == ["eval", "frozen"]
    frozen = data["ratios_vs_eval"]["frozen"]["saved_mib_per_image"]
    assert 0 < frozen < 0.1


def test_bench_cli_recompute_row(tmp_path, capsys):
    out = tmp_path / "effnet.json"
    argv = ["bench", "--model", "efficientnet_b0", "--size", "32", "--steps", "0", "--no-peak"]
    argv += ["--device", "cpu", "--modes", "eval,frozen", "--recompute", "--json", str(out)]
    argv += ["--saved-batches", "1,2"]
    assert cli.main(argv) == 0
    assert "frozen+recompute" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["rows"]] == ["eval", "frozen+recompute"]
    assert 0 < data["ratios_vs_eval"]["frozen+recompute"]["saved_mib_per_image"] < 0.25


def test_bench_times_frozen_and_recompute_interleaved():
    result = run_bench(
        "tiny",
        modes=("frozen", "frozen+recompute"),
        size=16,
        steps=1,
        batch_size=2,
        device="cpu",
        peak_batches=None,
        repeats=2,
        model_factory=_tiny_model,
    )
    assert [r.mode for r in result.rows] == ["frozen", "frozen+recompute"]
    assert all(len(r.images_steps_per_s_runs) == 2 for r in result.rows)


def test_bench_user_errors(capsys):
    with pytest.raises(UserError, match="resnt50"):
        run_bench("resnt50", device="cpu")
    with pytest.raises(UserError, match="modes"):
        run_bench("resnet18", modes=("fast",), device="cpu", size=32)
    with pytest.raises(UserError, match="attack"):
        run_bench("resnet18", attack="cw", device="cpu", size=32)
    with pytest.raises(UserError, match="--repeats must be >= 1, got 0"):
        run_bench("resnet18", device="cpu", size=32, repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            run_bench("resnet18", device="cuda", size=32)
    assert main(["--model", "resnt50", "--device", "cpu"]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_kernel_ablation_times_every_switch_and_restores_them():
    from advtune import bench_kernels
    from advtune.lean import kernel_policy

    before = kernel_policy()
    rows = bench_kernels.frozen_kernel_ablation(_tiny_model(), size=16, batch=2, repeats=3)
    assert kernel_policy() is before
    names = [r["variant"] for r in rows]
    assert names[:3] == ["eval", "deploy", "frozen"]
    assert len(names) == 3 + len(bench_kernels.SWITCHES)
    assert "frozen, numpy_max_threads=0" in names and "frozen, native_below=0" in names
    for r in rows:
        assert len(r["runs_s"]) == 3 and r["median_s"] == sorted(r["runs_s"])[1] > 0
    assert next(r for r in rows if r["variant"] == "frozen")["paired_vs_frozen_ms"] == 0


def test_kernel_ablation_cli_on_the_digits_cnn(capsys):
    from advtune import bench_kernels

    bench_kernels.ablation_main(
        ["--model", "digits", "--batch-size", "2", "--repeats", "1", "--steps", "2"]
    )
    out = capsys.readouterr().out
    assert out.startswith("digits, 32px, batch 2") and "frozen, native_below=0" in out
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        bench_kernels.frozen_kernel_ablation(_tiny_model(), size=16, batch=2, repeats=1, steps=0)


def test_mask_kernel_times_cover_both_implementations(capsys):
    from advtune import bench_kernels

    times = bench_kernels.mask_kernel_times((2, 3, 8, 8), repeats=2)
    assert set(times["pack x > 0"]) == set(times["mask a gradient"]) == {"numpy", "torch"}
    assert set(times["native relu"]) == {"native"}
    assert all(v > 0 for d in times.values() for v in d.values())
    bench_kernels.masks_main(["--shape", "2,3,8,8", "--repeats", "1"])
    assert "pack x > 0" in capsys.readouterr().out
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        bench_kernels.mask_kernel_times((2, 3), repeats=0)
    with pytest.raises(SystemExit) as exit_info:
        bench_kernels.masks_main(["--shape", "2,x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "advtune: error: argument --shape: invalid integer 'x': expected a whole number like 4"
    )
