"""scripts/gpu_targets.py on CPU: the report judges targets from what was measured, says
"not measured" for what a CPU cannot measure, and resumes without measuring again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fakes import load_script

from advtune.storage import read_json

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(out: Path, *more: str) -> list[str]:
    return [
        "--out",
        str(out),
        "--device",
        "cpu",
        "--model",
        "resnet18",
        "--size",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--success-images",
        "64",
        *more,
    ]


def test_cpu_run_reports_measured_targets_and_resumes(tmp_path, capsys, monkeypatch):
    script = load_script("gpu_targets")
    out = tmp_path / "targets"
    assert script.main(_args(out, "--configs", "fp32,bf16-cl")) == 0
    text = (out / "targets.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"

    bench = read_json(out / "json/bench/fp32.json")
    frozen = next(r for r in bench["rows"] if r["mode"] == "frozen")
    saved = frozen["saved_mib_per_image"]
    # The saved-bytes verdict quotes the measurement and judges it (tiny at 32 px).
    assert f"| {saved:.2f} MiB/img | **met** |" in text
    # What needs CUDA is "not measured", never a number.
    peak_row = next(line for line in text.splitlines() if "fp32 peak" in line)
    assert peak_row.endswith("| not measured |") and "frozen n/a MiB/img" in peak_row
    batch_row = next(line for line in text.splitlines() if "-image batch fits" in line)
    assert batch_row.endswith("| not measured |")
    # One speed comparison per configuration with both deploy and frozen rows.
    for config in ("fp32", "bf16-cl"):
        rows = {r["mode"]: r for r in read_json(out / f"json/bench/{config}.json")["rows"]}
        f, d = rows["frozen"]["images_steps_per_s"], rows["deploy"]["images_steps_per_s"]
        verdict = "**met**" if f >= d else "**not met**"
        assert f"| frozen at least as fast as deploy ({config}) | {f:.0f} vs {d:.0f}" in text
        assert re.search(rf"deploy \({config}\) \|[^|]*\| {re.escape(verdict)} \|", text)
    # Success on the trained digits CNN: per eps, and the largest change against fp32.
    success = {c: read_json(out / f"json/success/{c}.json") for c in ("fp32", "bf16-cl")}
    assert success["fp32"]["images"] == 64
    delta = max(
        abs(success["bf16-cl"]["success_percent"][k] - success["fp32"]["success_percent"][k])
        for k in success["fp32"]["success_percent"]
    )
    assert "| bf16-cl | " in text and f"| {delta:.2f} |" in text
    assert any(v > 0 for v in success["fp32"]["success_percent"].values())

    # A rerun measures nothing again (a cut-off run resumes) and reports the same.
    def no_bench(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr("advtune.bench.run_bench", no_bench)
    monkeypatch.setattr(script, "_success", no_bench)
    assert script.main(_args(out, "--configs", "fp32,bf16-cl")) == 0
    assert script.main(_args(out, "--configs", "none")) == 0
    assert (out / "targets.md").read_text() == text


@pytest.mark.parametrize(
    ("more", "named"),
    [
        (("--configs", "fp64"), ["'fp64'", "fp32"]),
        (("--configs", "fp32", "--success-images", "0"), ["--success-images", "got 0"]),
        (("--configs", "fp32", "--device", "tpu"), ["'tpu'"]),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, capsys, more, named):
    assert load_script("gpu_targets").main(_args(tmp_path, *more)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(n in err for n in named), err
