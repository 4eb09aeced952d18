"""advtune.storage: atomic writes and the append-only, crash-safe manifest."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

from advtune import storage as aio
from advtune.errors import UserError
from advtune.storage import (
    MANIFEST_COLUMNS,
    ManifestWriter,
    TornManifestWarning,
    format_manifest,
    parse_manifest,
    read_manifest,
    row_key,
)


def row(index: int, eps: float | None = 4 / 255, **changes) -> dict:
    base = {
        "path": f"dir/img{index}.png", "label": index % 7, "clean_pred": 3, "adv_pred": 5,
        "success": index % 2 == 0, "linf": 0.015686274509803921, "l2": 1.0 / (index + 3),
        "index": index, "eps": eps, "target": None, "clean_conf": 0.75, "adv_conf": 0.125,
        "attack_success": True, "adv_path": f"dir/img{index}.png", "broken_by": "", "adv_sha256": "", "l1": 0.5,
    }  # fmt: skip
    return {**base, **changes}


def rows(indices, eps=(4 / 255,)) -> list[dict]:
    return [row(i, e) for i in indices for e in eps]


# --------------------------------------------------------------------------- appends


def test_appends_batches_and_matches_a_sorted_rewrite(tmp_path):
    path = tmp_path / "manifest.csv"
    writer = ManifestWriter(path)
    writer.extend(rows([1, 0]))  # first write: whole file, sorted
    inode = path.stat().st_ino
    sizes = [path.stat().st_size]
    for start in range(2, 10, 2):
        # eps listed high to low, as a config may list them: sorted within the batch
        writer.extend(rows([start, start + 1], eps=(8 / 255, 2 / 255)))
        sizes.append(path.stat().st_size)
    assert path.stat().st_ino == inode, "appends must not replace the file"
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert writer.sorted_on_disk
    assert path.read_text() == format_manifest(writer.rows)
    assert [row_key(r) for r in read_manifest(path)] == sorted(row_key(r) for r in writer.rows)
    writer.close()
    assert path.stat().st_ino == inode  # nothing to consolidate


@pytest.mark.parametrize("keep_sorted", [True, False])
def test_out_of_order_batch_is_sorted_in(tmp_path, keep_sorted):
    path = tmp_path / "manifest.csv"
    # A resumed torchrun run: the done rows are scattered over the dataset.
    path.write_text(format_manifest(rows([1, 4, 7])))
    with ManifestWriter.resume(path, keep_sorted=keep_sorted) as writer:
        writer.extend(rows([0, 2]))  # first write: rewrite, sorted
        assert writer.sorted_on_disk
        writer.extend(rows([3, 5]))  # below index 7 on disk
        # keep_sorted: rewritten sorted now; else appended, sorted in at close
        assert writer.sorted_on_disk is keep_sorted
        on_disk = read_manifest(path)
        assert sorted(map(row_key, on_disk)) == [row_key(r) for r in writer.rows]
        writer.extend(rows([8]))  # in order again: appended either way
        assert writer.sorted_on_disk is keep_sorted
    assert writer.sorted_on_disk
    assert path.read_text() == format_manifest(rows([0, 1, 2, 3, 4, 5, 7, 8]))


def test_duplicate_rows_are_refused_whole_batch(tmp_path):
    path = tmp_path / "m.csv"
    writer = ManifestWriter(path, rows([0, 1]))
    with pytest.raises(ValueError, match=r"duplicate manifest row for index 1.*m\.csv"):
        writer.extend(rows([2, 1]))
    with pytest.raises(ValueError, match="duplicate manifest row for index 3"):
        writer.extend(rows([3, 3]))
    assert len(writer) == 2 and not path.exists()  # nothing was added or written


def test_failed_write_leaves_whole_rows_and_rolls_back(tmp_path, monkeypatch):
    path = tmp_path / "m.csv"
    writer = ManifestWriter(path)
    writer.extend(rows([0, 1]))
    before = path.read_bytes()
    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(aio.os, "fsync", full_disk)
    with pytest.raises(OSError, match=r"File too large: '.*m\.csv'") as info:
        writer.extend(rows([2, 3]))
    assert info.value.errno == errno.EFBIG
    assert path.read_bytes() == before, "a failed append must be cut back"
    assert len(writer) == 2 and writer.done_paths() == {"dir/img0.png", "dir/img1.png"}
    monkeypatch.setattr(aio.os, "fsync", real_fsync)
    writer.extend(rows([2, 3]))  # the next batch goes through
    assert path.read_text() == format_manifest(rows(range(4)))


def test_a_file_changed_by_someone_else_is_not_appended_to(tmp_path):
    path = tmp_path / "m.csv"
    writer = ManifestWriter(path)
    writer.extend(rows([0]))
    other = ManifestWriter(path)  # a second run on the same folder
    other.extend(rows([5]))
    with pytest.raises(UserError, match=r"m\.csv' was changed by another process"):
        writer.extend(rows([1]))
    assert read_manifest(path) == rows([5])


def test_write_past_file_size_limit_is_an_oserror_not_a_kill(tmp_path):
    # RLIMIT_FSIZE: the kernel sends SIGXFSZ; Python ignores it, so the write fails with
    # EFBIG and the manifest keeps whole rows (run in a child: the limit is per process).
    resource = pytest.importorskip("resource")
    del resource
    code = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from test_storage import rows
        from advtune.storage import ManifestWriter, read_manifest
        w = ManifestWriter({str(tmp_path / "m.csv")!r})
        w.extend(rows(range(3)))
        resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))
        try:
            for i in range(3, 1000, 3):
                w.extend(rows(range(i, i + 3)))
        except OSError as e:
            print("errno", e.errno, len(w), len(read_manifest(w.path)))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _, code_, in_memory, on_disk = out.stdout.split()
    assert int(code_) == errno.EFBIG and in_memory == on_disk and int(on_disk) >= 3


# --------------------------------------------------------------------------- recovery


def test_torn_last_line_is_dropped_on_resume(tmp_path):
    path = tmp_path / "manifest.csv"
    full = format_manifest(rows(range(3)))
    path.write_text(full + format_manifest(rows([3])).splitlines()[1][:17])  # killed mid-row
    with pytest.warns(TornManifestWarning, match=r"manifest\.csv, line 5: dropped a torn"):
        writer = ManifestWriter.resume(path)
    assert [r["index"] for r in writer.rows] == [0, 1, 2]
    with pytest.raises(ValueError, match=r"manifest\.csv, line 5"):
        read_manifest(path, recover=False)
    writer.extend(rows([3]))  # the first write replaces the torn file whole
    assert path.read_text() == format_manifest(rows(range(4)))


def test_torn_quoted_field_is_dropped(tmp_path):
    odd = row(1, path='a "quoted"\nname.png')
    text = format_manifest([row(0), odd])
    cut = text.index("\n", text.index('"quoted"'))  # right after the embedded newline
    with pytest.warns(TornManifestWarning):
        assert parse_manifest(text[: cut + 1], recover=True) == [row(0)]
    assert parse_manifest(text) == [row(0), odd]  # whole, it round-trips


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "missing columns"),
        (b"path,label\nx,1\n", "missing columns"),
        (format_manifest(rows([0])).replace(",1,0.0156", ",yes,0.0156").encode(), "line 2"),
        (format_manifest(rows([0, 1]))[:-1].encode() + b",extra\n", "line 3: expected 17"),
        (format_manifest(rows([0]) + rows([0])).encode(), "line 3: duplicate row.*line 2"),
        (format_manifest(rows([0])).replace(",0,0.0", ",-1,0.0").encode(), "'index' must be"),
        (format_manifest(rows([0, 1])).encode() + b"\xff\xfe\n", "line 4: expected 17 fields"),
        (format_manifest(rows([0])).encode() + b'p,"x"y\n', "line 3"),
    ],
)
def test_corrupt_manifest_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "manifest.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_manifest(path)
    assert str(path) in str(info.value)


def test_atomic_write_failure_names_the_file(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(aio.os, "fsync", no_space)
    with pytest.raises(OSError, match=r"No space left on device: '.*report\.json'") as info:
        aio.write_json(tmp_path / "report.json", {"a": 1})
    assert info.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []


def test_unreadable_manifest_is_a_valueerror_naming_it(tmp_path):
    (tmp_path / "manifest.csv").mkdir()
    with pytest.raises(ValueError, match=r"cannot read manifest .*manifest\.csv"):
        read_manifest(tmp_path / "manifest.csv")
    assert read_manifest(tmp_path / "missing.csv") == []


def test_odd_file_names_round_trip(tmp_path):
    # Carriage returns, quotes, commas, newlines, and bytes that are not UTF-8 (as
    # os.listdir gives them: surrogate escapes) are all legal in POSIX file names.
    names = ["a\rb.png", 'q"uo,te.png', "new\nline.png", b"\xff\xfe.png".decode(*aio._ENCODING)]
    odd = [row(i, path=name, adv_path=name) for i, name in enumerate(names)]
    path = tmp_path / "m.csv"
    with ManifestWriter(path) as writer:
        writer.extend(odd[:2])
        writer.extend(odd[2:])
    assert read_manifest(path) == odd
    # header, 4 rows, the quoted newline in path and adv_path
    assert path.read_bytes().count(b"\n") == 1 + 4 + 2
    assert aio.merge_manifests([path], tmp_path / "merged.csv") == odd
    assert (tmp_path / "merged.csv").read_bytes() == path.read_bytes()


def test_reordered_columns_still_parse():
    order = list(reversed(MANIFEST_COLUMNS))
    text = ",".join(order) + "\n" + ",".join(
        format_manifest(rows([2])).splitlines()[1].split(",")[::-1]
    ) + "\n"  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parse_manifest(text) == rows([2])


def test_bench_manifest_script(capsys):
    from fakes import load_script

    load_script("bench_manifest").main(["--sizes", "10,50", "--repeats", "2", "--no-fsync"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "batch 32 rows, 2 repeats, fsync False"
    table = [line.split("|") for line in lines[2:]]
    assert [int(r[0]) for r in table] == [10, 50]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in table)
