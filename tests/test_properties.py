"""Property-based tests (hypothesis): parsers and the image loader never crash.

Whatever the input — random text or bytes, torn files, truncated images, every odd
Pillow mode — the outcome is a clean result, a ``ValueError``/``UserError`` with a
one-line message, or a skip with a one-line reason; never another exception.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from advtune.data import build_dataset
from advtune.errors import UserError
from advtune.models import Preprocess
from advtune.storage import (
    MANIFEST_COLUMNS,
    ManifestWriter,
    TornManifestWarning,
    format_manifest,
    parse_manifest,
    read_manifest,
)

FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
SMALL = Preprocess(crop_size=8, resize_size=8)
# File names as os.listdir gives them: any text but "/" and NUL; no lone surrogates
# except the escapes of bytes that are not UTF-8.
NAME_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1
)


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message


# --------------------------------------------------------------------------- subset files


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for name in ("a.png", "b.png", "sub/c.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(root / name)
    return root


@FAST
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_subset_file_gives_a_subset_or_a_user_error(image_folder, content):
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "subset.txt"
        subset.write_bytes(content)
        try:
            ds = build_dataset(image_folder, transform=SMALL, subset=subset)
        except UserError as e:
            one_line(str(e).split(": ", 1)[0])  # the head; listed entries may hold anything
            return
    assert len(ds) >= 1 and set(ds.paths) <= {"a.png", "b.png", "sub/c.png"}


@FAST
@given(
    entries=st.lists(
        st.one_of(st.sampled_from(["a.png", "./b.png", "sub\\c.png", "# x", ""]), NAME_TEXT),
        max_size=6,
    )
)
def test_subset_sequence_gives_a_subset_or_a_user_error(image_folder, entries):
    try:
        ds = build_dataset(image_folder, transform=SMALL, subset=entries)
    except UserError:
        return
    assert ds.paths == sorted(set(ds.paths)) and set(ds.paths) <= {"a.png", "b.png", "sub/c.png"}


# --------------------------------------------------------------------------- manifests

# What advtune writes: distances and budgets finite and >= 0, confidences probabilities.
NONNEG = st.floats(0, allow_nan=False, allow_infinity=False, width=64)
PROB = st.floats(0, 1, width=64)
ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "path": NAME_TEXT,
            "label": st.integers(-1, 999),
            "clean_pred": st.integers(0, 999),
            "adv_pred": st.integers(0, 999),
            "success": st.booleans(),
            "linf": NONNEG,
            "l2": NONNEG,
            "index": st.integers(0, 10**6),
            "eps": st.one_of(st.none(), st.floats(0, 10)),
            "target": st.one_of(st.none(), st.integers(0, 999)),
            "clean_conf": PROB,
            "adv_conf": PROB,
            "attack_success": st.booleans(),
            "adv_path": st.one_of(st.just(""), NAME_TEXT),
            "broken_by": st.sampled_from(["", "clean", "apgd-ce"]),
            "adv_sha256": st.one_of(
                st.just(""), st.text("0123456789abcdef", min_size=64, max_size=64)
            ),
            "l1": st.one_of(st.none(), NONNEG),
        }
    ),
    max_size=8,
    unique_by=lambda r: (r["index"], r["eps"]),
)


@FAST
@given(text=st.text(max_size=400))
def test_manifest_parser_on_random_text(text):
    for candidate in (text, ",".join(MANIFEST_COLUMNS) + "\n" + text):
        for recover in (False, True):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", TornManifestWarning)
                    rows = parse_manifest(candidate, source="m.csv", recover=recover)
            except ValueError as e:
                assert str(e).startswith("m.csv"), e
                continue
            assert all(set(r) == set(MANIFEST_COLUMNS) for r in rows)


@FAST
@given(content=st.binary(max_size=400), with_header=st.booleans())
def test_manifest_reader_on_random_bytes(content, with_header):
    header = (",".join(MANIFEST_COLUMNS) + "\n").encode() if with_header else b""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.csv"
        path.write_bytes(header + content)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TornManifestWarning)
                read_manifest(path)
        except ValueError as e:
            assert str(path) in str(e)


@FAST
@given(rows=ROWS, data=st.data())
def test_torn_manifest_recovers_the_whole_rows_and_resumes(rows, data):
    def encode(text: str) -> bytes:
        return text.encode("utf-8", "surrogateescape")

    header = len(encode(format_manifest([])))
    ends = np.cumsum([header] + [len(encode(format_manifest([r]))) - header for r in rows])
    text = encode(format_manifest(rows))
    assert ends[-1] == len(text)
    # A kill mid-append: any cut after the (atomically written) header.
    cut = data.draw(st.integers(header, len(text)), label="cut")
    whole = int((ends[1:] <= cut).sum())  # rows written completely before the cut
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.csv"
        path.write_bytes(text[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert read_manifest(path) == rows[:whole]
            writer = ManifestWriter.resume(path, fsync=False)
        torn = cut not in ends
        assert any(issubclass(w.category, TornManifestWarning) for w in caught) == torn
        assert len(writer) == whole
        extra = dict(rows[0], index=10**7) if rows else None
        writer.extend([extra] if extra else [])
        assert read_manifest(path) == writer.rows  # the torn tail is gone, nothing else


@FAST
@given(rows=ROWS)
def test_manifest_round_trip(rows):
    text = format_manifest(rows)
    parsed = parse_manifest(text)
    assert parsed == rows and format_manifest(parsed) == text


# A value advtune never writes, per numeric column: the row is refused by line and
# column, never read as a NaN hole in a metric (issue 19).
BAD_VALUES = {
    "linf": st.sampled_from(["nan", "inf", "-inf", "-0.5", "abc", ""]),
    "l2": st.sampled_from(["nan", "-inf", "-1e-9", "x"]),
    "eps": st.sampled_from(["nan", "inf", "-0.1"]),
    "clean_conf": st.sampled_from(["1.5", "-0.1", "inf", "oops"]),
    "adv_conf": st.sampled_from(["2", "-inf"]),
    "label": st.sampled_from(["-2", "1.5", "nan", "x"]),
    "clean_pred": st.sampled_from(["-7", "0.5"]),
    "index": st.sampled_from(["-1", "nan"]),
    "target": st.sampled_from(["-1", "2.5"]),
    "adv_sha256": st.sampled_from(["xyz", "0" * 63, "G" * 64]),
    "l1": st.sampled_from(["nan", "inf", "-1", "x"]),
}


@FAST
@given(rows=ROWS.filter(bool), data=st.data())
def test_a_manifest_value_out_of_range_names_line_and_column(rows, data):
    column = data.draw(st.sampled_from(sorted(BAD_VALUES)))
    bad = data.draw(BAD_VALUES[column])
    which = data.draw(st.integers(0, len(rows) - 1))
    # One line per row (names with line breaks are the round-trip test's business).
    rows = [{**r, "path": f"p{i}", "adv_path": ""} for i, r in enumerate(rows)]
    lines = format_manifest(rows).splitlines(keepends=True)
    header = lines[0].rstrip("\n").split(",")
    import csv

    record = next(csv.reader([lines[which + 1]]))
    record[header.index(column)] = bad
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(record)
    lines[which + 1] = buffer.getvalue()
    with pytest.raises(ValueError) as info:
        parse_manifest("".join(lines), source="m.csv")
    message = str(info.value)
    one_line(message)
    assert f"line {which + 2}" in message and f"{column!r}" in message, message


@FAST
@given(value=st.integers(min_value=10**9 + 1, max_value=10**60))
def test_an_int_param_without_a_declared_bound_is_capped(value):
    from advtune.attacks._registry import INT_CEILING, Param

    # A budget gets BUDGET_MAX as its default ``high``; the ceiling guards what declares none.
    param = Param("depth", int, default=10, low=1)
    with pytest.raises(ValueError, match=f"<= {INT_CEILING}"):
        param.validate(value)
    with pytest.raises(ValueError, match=f"<= {INT_CEILING}"):
        param.parse(str(value))
    assert param.validate(INT_CEILING) == INT_CEILING


# Integer flags, their bound and the text of a value just above it.
def _flag_bounds():
    from advtune import cli
    from advtune.attacks._registry import BUDGET_MAX

    return {
        "--seed": cli.MAX_SEED,
        "--limit": cli.MAX_LIMIT,
        "--workers": cli.MAX_WORKERS,
        "--batch-size": cli.MAX_BATCH_SIZE,
        "--image-size": cli.MAX_IMAGE_SIZE,
        "--steps": BUDGET_MAX,
    }


@FAST
@given(
    flag=st.sampled_from(sorted(_flag_bounds())),
    excess=st.integers(1, 10**40),
    command=st.sampled_from(["generate", "evaluate"]),
)
def test_every_integer_flag_refuses_values_above_its_bound_naming_it(flag, excess, command):
    import contextlib

    from advtune.cli import main

    bound = _flag_bounds()[flag]
    err = io.StringIO()
    # A checkpoint that does not exist: the bound must be checked before any model load.
    args = [command, "--model", "resnet18", "--weights", "/nonexistent/ck.pt", "--attack", "pgd"]
    with contextlib.redirect_stderr(err):
        rc = main([*args, flag, str(bound + excess), "--out", "/nonexistent/out"])
    message = err.getvalue().strip()
    assert rc == 2 and len(message.splitlines()) == 1, message
    named = f"<= {bound}" in message or f", {bound}]" in message  # "<= b" or "in [a, b]"
    assert named and "checkpoint" not in message, message


@FAST
@given(
    names=st.lists(
        st.text("ab\u00e9x", min_size=200, max_size=300), min_size=1, max_size=4, unique=True
    )
)
def test_adv_names_fit_the_file_system_and_stay_distinct(names):
    from advtune.run.outputs import adv_relpaths

    paths = [f"d/{n}{ext}" for n in names for ext in (".jpg", ".png")]
    out = adv_relpaths(paths)
    assert len(set(out.values())) == len(paths)
    for target in out.values():
        assert all(len(part.encode("utf-8")) <= 255 for part in target.split("/"))
        assert target.endswith(".png")


# --------------------------------------------------------------------------- images


def _load(payload: bytes, name: str):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(payload)
        Image.new("RGB", (4, 4)).save(Path(tmp) / "zz_good.png")  # so the folder has one
        ds = build_dataset(tmp, transform=SMALL, subset=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sample = ds[ds.paths.index(name)]
        return sample, ds.skipped


def _check_outcome(sample, skipped):
    if sample is None:
        assert len(skipped) == 1
        one_line(skipped[0][1])
    else:
        image = sample["image"]
        assert image.shape == (3, 8, 8) and image.min() >= 0 and image.max() <= 1
        assert np.allclose((image * 255).numpy(), (image * 255).round().numpy(), atol=1e-4)


@FAST
@given(payload=st.binary(max_size=600), ext=st.sampled_from([".png", ".jpg", ".gif", ".tif"]))
def test_random_bytes_load_or_skip(payload, ext):
    _check_outcome(*_load(payload, "x" + ext))


def _encoded(mode: str, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    size = (9, 7)
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, size[::-1], dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(-(2**20), 2**20, size[::-1], dtype=np.int32), "I")
    elif mode == "F":
        img = Image.fromarray(rng.normal(0, 2, size[::-1]).astype(np.float32), "F")
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(
            "P", palette=Image.Palette.ADAPTIVE
        )
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        pixels = rng.integers(0, 256, (*size[::-1], bands), dtype=np.uint8)
        img = Image.fromarray(
            pixels[:, :, 0] if bands == 1 else pixels, "RGB" if bands == 3 else None
        )
        img = img.convert(mode) if img.mode != mode else img
    buffer = io.BytesIO()
    img.save(buffer, format=fmt)
    return buffer.getvalue()


# (mode, format) pairs Pillow can write; 16-bit PNG is I;16 in PNG.
ODD = [
    ("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("I;16", "PNG"), ("I", "TIFF"),
    ("RGBA", "PNG"), ("RGB", "PNG"), ("F", "TIFF"), ("CMYK", "TIFF"), ("CMYK", "JPEG"),
    ("L", "JPEG"), ("RGB", "JPEG"), ("I;16", "TIFF"), ("P", "GIF"), ("RGBA", "WEBP"),
]  # fmt: skip
EXT = {"PNG": ".png", "TIFF": ".tif", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp"}


@pytest.mark.parametrize(("mode", "fmt"), ODD)
def test_every_odd_mode_loads(mode, fmt):
    try:
        payload = _encoded(mode, fmt, 0)
    except (OSError, KeyError, ValueError) as e:  # this Pillow cannot write it
        pytest.skip(f"Pillow cannot write {mode} as {fmt}: {e}")
    sample, skipped = _load(payload, "odd" + EXT[fmt])
    assert sample is not None, skipped
    _check_outcome(sample, skipped)


@FAST
@given(case=st.sampled_from(ODD), seed=st.integers(0, 3), data=st.data())
def test_truncated_odd_images_load_or_skip(case, seed, data):
    mode, fmt = case
    try:
        payload = _encoded(mode, fmt, seed)
    except (OSError, KeyError, ValueError):
        assume(False)
    cut = data.draw(st.integers(0, len(payload) - 1), label="cut")
    _check_outcome(*_load(payload[:cut], "t" + EXT[fmt]))
