"""advtune.data: layouts, decoding, subsets and ordering, skipped files, loaders."""

from __future__ import annotations

import io
import os
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advtune import data
from advtune.data import (
    SkipImage,
    build_dataset,
    collate_samples,
    decode_image,
    imagenet_categories,
    imagenet_wnids,
    make_loader,
    resolve_subset_path,
    robustbench_subset,
    sample_dir,
)
from advtune.errors import UserError
from advtune.models import Preprocess

SMALL = Preprocess(crop_size=16, resize_size=16)
WNIDS = imagenet_wnids()


def write_image(path: Path, *, size=(24, 20), seed=0, fmt=None) -> Path:
    """A small random RGB photo-like file (JPEG or PNG by suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format=fmt)
    return path


def val_name(i: int) -> str:
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def off_grid(image: Image.Image) -> torch.Tensor:
    """A transform whose output is not on the 8-bit grid."""
    return SMALL(image) * 0.9 + 0.0123


# --------------------------------------------------------------------------- shipped data


def test_shipped_files():
    assert len(WNIDS) == 1000 and sorted(WNIDS) == WNIDS and WNIDS[0] == "n01440764"
    categories = imagenet_categories()
    assert len(categories) == 1000 and categories[0] == "tench"
    lines = robustbench_subset().read_text().split()
    assert len(lines) == len(set(lines)) == 5000
    assert all(line.split("/")[0] in set(WNIDS) for line in lines)
    assert (sample_dir() / "LICENSE.txt").is_file()


def test_bundled_sample():
    ds = build_dataset(transform=Preprocess())
    assert ds.layout == "sample" and not ds.labeled and len(ds) == 5
    assert ds.paths == sorted(ds.paths) and "camera.png" in ds.paths  # camera.png is grayscale
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["image"].shape == (3, 224, 224) and sample["image"].dtype == torch.float32
        assert sample["label"] == -1 and sample["index"] == i
    assert ds.skipped == []
    # The same folder given explicitly is still recognised as the sample.
    assert build_dataset(sample_dir(), transform=SMALL).layout == "sample"


# --------------------------------------------------------------------------- layouts


def test_imagenet_class_folders(tmp_path):
    write_image(tmp_path / WNIDS[0] / "a.JPEG")
    write_image(tmp_path / WNIDS[0] / "b.JPEG", seed=1)
    write_image(tmp_path / WNIDS[999] / "c.png", seed=2)
    write_image(tmp_path / WNIDS[7] / "nested" / "d.jpg", seed=3)
    (tmp_path / WNIDS[7] / "notes.txt").write_text("not an image")
    write_image(tmp_path / WNIDS[7] / ".hidden.jpg")
    ds = build_dataset(tmp_path, transform=SMALL)
    assert ds.layout == "imagenet-folders" and ds.labeled
    assert ds.root == tmp_path.resolve()
    assert ds.paths == sorted(
        [
            f"{WNIDS[0]}/a.JPEG",
            f"{WNIDS[0]}/b.JPEG",
            f"{WNIDS[999]}/c.png",
            f"{WNIDS[7]}/nested/d.jpg",
        ]
    )
    assert [ds[i]["label"] for i in range(len(ds))] == [
        int(WNIDS.index(p.split("/")[0])) for p in ds.paths
    ]


def test_unknown_wordnet_folder_falls_back_to_unlabeled(tmp_path):
    write_image(tmp_path / WNIDS[0] / "a.jpg")
    write_image(tmp_path / "n99999999" / "b.jpg")
    with pytest.warns(UserWarning, match="n99999999 is not an ImageNet-1k class"):
        ds = build_dataset(tmp_path, transform=SMALL)
    assert ds.layout == "image-folder" and not ds.labeled and ds.labels == [-1, -1]


def _flat_val(folder: Path, n: int) -> list[str]:
    return [write_image(folder / val_name(i), seed=i).name for i in range(1, n + 1)]


def test_loc_csv_in_folder_above_and_given(tmp_path):
    # Kaggle's layout: the csv sits four levels above ILSVRC/Data/CLS-LOC/val.
    top = tmp_path / "kaggle"
    val = top / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    _flat_val(val, 3)
    truth = {1: WNIDS[5], 2: WNIDS[0], 3: WNIDS[999]}
    rows = ["ImageId,PredictionString"] + [
        f"{val_name(i)[:-5]},{w} 10 20 30 40 {w} 1 2 3 4" for i, w in truth.items()
    ]
    (top / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    expected = [5, 0, 999]
    ds = build_dataset(val, transform=SMALL)
    assert ds.layout == "imagenet-loc-csv" and ds.labeled
    assert ds.paths == [val_name(i) for i in (1, 2, 3)] and ds.labels == expected
    # Given explicitly (moved elsewhere) and found inside the folder itself.
    moved = tmp_path / "labels.csv"
    (top / "LOC_val_solution.csv").rename(moved)
    assert build_dataset(val, transform=SMALL, labels=moved).labels == expected
    moved.rename(val / "LOC_val_solution.csv")
    assert build_dataset(val, transform=SMALL).labels == expected


def test_loc_csv_errors(tmp_path):
    _flat_val(tmp_path, 2)
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text(f"ImageId,PredictionString\n{val_name(1)[:-5]},{WNIDS[1]} 1 2 3 4\n")
    with pytest.raises(UserError, match=r"1 image has no label in .*ILSVRC2012_val_00000002"):
        build_dataset(tmp_path, transform=SMALL)
    csv.write_text("id,label\n")
    with pytest.raises(UserError, match=r"is not a LOC_val_solution\.csv"):
        build_dataset(tmp_path, transform=SMALL)
    csv.write_text(f"ImageId,PredictionString\n{val_name(1)[:-5]},n99999999 1 2 3 4\n")
    with pytest.raises(UserError, match="'n99999999' is not an ImageNet-1k WordNet id"):
        build_dataset(tmp_path, transform=SMALL)


def _devkit_order() -> list[str]:
    # Any order other than sorted: labels must be mapped through the WordNet ids.
    return WNIDS[::-1]


def test_devkit_with_text_mapping(tmp_path):
    val = tmp_path / "val"
    _flat_val(val, 3)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    devkit_ids = [1, 1000, 3, 500]  # for val images 1..4 (image 4 is absent here)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(map(str, devkit_ids)) + "\n"
    )
    (data / "devkit_wnids.txt").write_text("\n".join(_devkit_order()) + "\n")
    ds = build_dataset(val, transform=SMALL)
    assert ds.layout == "imagenet-devkit" and ds.labeled
    expected = [WNIDS.index(_devkit_order()[d - 1]) for d in devkit_ids[:3]]
    assert ds.labels == expected == [999, 0, 997]
    # "<id> <wnid>" lines work too.
    (data / "devkit_wnids.txt").write_text(
        "\n".join(f"{i} {w}" for i, w in enumerate(_devkit_order(), start=1))
    )
    assert build_dataset(val, transform=SMALL).labels == expected
    # Without any mapping: a clear error.
    (data / "devkit_wnids.txt").unlink()
    with pytest.raises(UserError, match=r"put the devkit's meta\.mat"):
        build_dataset(val, transform=SMALL)


def test_devkit_with_meta_mat(tmp_path):
    sio = pytest.importorskip("scipy.io")
    _flat_val(tmp_path, 2)
    (tmp_path / "ILSVRC2012_validation_ground_truth.txt").write_text("2\n1\n")
    order = _devkit_order()
    # meta.mat lists the 1000 leaves (ids 1..1000) and inner synsets (children > 0).
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")]
    entries = [(i, w, 0) for i, w in enumerate(order, start=1)] + [(1001, "n00001740", 5)]
    synsets = np.array(entries, dtype=dtype)
    sio.savemat(tmp_path / "meta.mat", {"synsets": synsets})
    ds = build_dataset(tmp_path, transform=SMALL)
    assert ds.layout == "imagenet-devkit"
    assert ds.labels == [WNIDS.index(order[1]), WNIDS.index(order[0])] == [998, 999]


def test_plain_nested_folder(tmp_path):
    write_image(tmp_path / "b.png")
    write_image(tmp_path / "x" / "y" / "a.jpeg")
    write_image(tmp_path / "x" / "C.PNG")
    (tmp_path / "readme.md").write_text("hello")
    write_image(tmp_path / ".cache" / "z.jpg")
    ds = build_dataset(tmp_path, transform=SMALL)
    assert ds.layout == "image-folder" and not ds.labeled
    assert ds.paths == ["b.png", "x/C.PNG", "x/y/a.jpeg"]
    assert ds.labels == [-1, -1, -1]
    assert ds[2]["path"] == "x/y/a.jpeg" and ds[2]["label"] == -1


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(UserError, match=r"data folder '.*nowhere' not found"):
        build_dataset(tmp_path / "nowhere", transform=SMALL)
    with pytest.raises(UserError, match=r"no images in '.*'"):
        build_dataset(tmp_path, transform=SMALL)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no images in"):
        build_dataset(tmp_path, transform=SMALL)
    with pytest.raises(UserError, match="is not a folder"):
        build_dataset(tmp_path / "notes.txt", transform=SMALL)


# --------------------------------------------------------------------------- order


@pytest.fixture
def folders(tmp_path) -> Path:
    for i in range(12):
        write_image(tmp_path / WNIDS[i % 3] / f"img{i:02d}.jpg", seed=i)
    return tmp_path


def test_subset_sort_shuffle_limit(folders, tmp_path):
    base = build_dataset(folders, transform=SMALL)
    assert base.paths == sorted(base.paths) and len(base) == 12
    a = build_dataset(folders, transform=SMALL, shuffle_seed=7)
    b = build_dataset(folders, transform=SMALL, shuffle_seed=7)
    c = build_dataset(folders, transform=SMALL, shuffle_seed=8)
    assert a.paths == b.paths and sorted(a.paths) == base.paths
    assert a.paths != base.paths and c.paths != a.paths
    assert build_dataset(folders, transform=SMALL, shuffle_seed=7, limit=4).paths == a.paths[:4]
    assert build_dataset(folders, transform=SMALL, limit=100).paths == base.paths

    chosen = [base.paths[9], base.paths[2], base.paths[5]]
    subset = tmp_path / "subset.txt"
    subset.write_text(f"# my subset\n{chosen[0]}\n\n./{chosen[1]}  # comment\n{chosen[2]}\n")
    ds = build_dataset(folders, transform=SMALL, subset=subset, limit=2)
    assert ds.paths == sorted(chosen)[:2]  # subset → sort → limit
    assert [ds[i]["index"] for i in range(2)] == [0, 1]
    shuffled = build_dataset(folders, transform=SMALL, subset=chosen, shuffle_seed=1)
    assert sorted(shuffled.paths) == sorted(chosen)


def test_subset_errors(folders, tmp_path):
    missing = [f"{WNIDS[0]}/nope{i}.jpg" for i in range(7)]
    with pytest.raises(UserError, match=r"7 of 8 subset entries .*nope0\.jpg.*nope4\.jpg, \.\.\."):
        build_dataset(folders, transform=SMALL, subset=[f"{WNIDS[0]}/img00.jpg", *missing])
    with pytest.raises(UserError, match=r"^1 of 1 subset entry is not in the data folder"):
        build_dataset(folders, transform=SMALL, subset=missing[:1])
    with pytest.raises(UserError, match=r"subset file .* not found"):
        build_dataset(folders, transform=SMALL, subset=tmp_path / "none.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(UserError, match="lists no image paths"):
        build_dataset(folders, transform=SMALL, subset=empty)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="limit must be a positive integer"):
            build_dataset(folders, transform=SMALL, limit=bad)


def test_robustbench_style_subset_matches_flat_layout_by_name(tmp_path):
    _flat_val(tmp_path, 4)
    rows = ["ImageId,PredictionString"] + [
        f"{val_name(i)[:-5]},{WNIDS[i]} 1 2 3 4" for i in range(1, 5)
    ]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(rows))
    subset = [f"{WNIDS[4]}/{val_name(4)}", f"{WNIDS[2]}/{val_name(2)}"]
    ds = build_dataset(tmp_path, transform=SMALL, subset=subset)
    assert ds.paths == [val_name(2), val_name(4)] and ds.labels == [2, 4]


# --------------------------------------------------------------------------- decoding


def _pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def test_every_mode_becomes_rgb(tmp_path):
    files = {}
    gray = Image.new("L", (4, 4), 100)
    files["L.png"] = gray
    la = Image.new("LA", (4, 4), (100, 255))
    la.putpixel((0, 0), (0, 0))  # fully transparent black → white
    files["LA.png"] = la
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black over white
    files["RGBA.png"] = rgba
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 50, 25] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.info["transparency"] = 0  # palette index 0 is transparent
    files["P.png"] = palette
    files["CMYK.jpg"] = Image.new("CMYK", (4, 4), (0, 0, 0, 0))  # no ink: white
    deep = Image.new("I;16", (4, 4), 0)
    deep.putpixel((0, 0), 65535)
    deep.putpixel((1, 0), 32896)  # 128 * 257
    files["I16.png"] = deep
    wide = Image.new("I", (4, 4), 0)
    wide.putpixel((0, 0), 65535)
    files["I.tif"] = wide
    real = Image.new("F", (4, 4), 0.25)
    real.putpixel((0, 0), 1.0)
    files["F.tif"] = real
    for name, img in files.items():
        img.save(tmp_path / name)

    assert (_pixels(decode_image(tmp_path / "L.png")) == 100).all()
    la_px = _pixels(decode_image(tmp_path / "LA.png"))
    assert (la_px[0, 0] == 255).all() and (la_px[1, 1] == 100).all()
    rgba_px = _pixels(decode_image(tmp_path / "RGBA.png"))
    assert (rgba_px[0, 0] == 255).all() and (rgba_px[2, 2] == [10, 20, 30]).all()
    assert abs(int(rgba_px[0, 1, 0]) - 127) <= 1
    p_px = _pixels(decode_image(tmp_path / "P.png"))
    assert (p_px[0, 0] == 255).all() and (p_px[1, 1] == [200, 50, 25]).all()
    assert (_pixels(decode_image(tmp_path / "CMYK.jpg")) >= 250).all()
    deep_px = _pixels(decode_image(tmp_path / "I16.png"))
    assert deep_px[0, 0, 0] == 255 and deep_px[0, 1, 0] == 128 and deep_px[1, 1, 0] == 0
    wide_px = _pixels(decode_image(tmp_path / "I.tif"))
    assert wide_px[0, 0, 0] == 255 and wide_px[1, 1, 0] == 0
    real_px = _pixels(decode_image(tmp_path / "F.tif"))
    assert real_px[0, 0, 0] == 255 and real_px[1, 1, 0] == 64

    ds = build_dataset(tmp_path, transform=SMALL)
    assert len(ds) == len(files)
    batch = next(iter(make_loader(ds, batch_size=len(files), num_workers=0)))
    assert batch["image"].shape == (len(files), 3, 16, 16) and batch["skipped"] == []


def test_exif_orientation_applied(tmp_path):
    # Stored 40x20: left half red, right half blue; orientation 6 = rotate 90° clockwise
    # to display, so the displayed 20x40 image has red on top.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    img = Image.fromarray(pixels, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20)  # the file itself is not rotated
    upright = _pixels(decode_image(path))
    assert upright.shape == (40, 20, 3)
    assert upright[5, 10, 0] > 200 and upright[5, 10, 2] < 50  # top: red
    assert upright[35, 10, 2] > 200 and upright[35, 10, 0] < 50  # bottom: blue


def test_images_are_quantised_to_8_bits(tmp_path):
    write_image(tmp_path / "a.png")
    ds = build_dataset(tmp_path, transform=off_grid)
    image = ds[0]["image"]
    scaled = image * 255
    assert torch.equal(scaled, scaled.round()) and image.dtype == torch.float32
    torch.testing.assert_close(
        image, off_grid(decode_image(tmp_path / "a.png")), atol=0.5 / 255, rtol=0
    )


# --------------------------------------------------------------------------- skipped files


def _with_broken_files(root: Path) -> None:
    for i in range(5):
        write_image(root / f"good{i}.png", seed=i)
    (root / "garbage.jpg").write_bytes(b"this is not a jpeg")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, "JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[:200])


def test_undecodable_file_skipped_in_getitem(tmp_path):
    _with_broken_files(tmp_path)
    ds = build_dataset(tmp_path, transform=SMALL)
    assert len(ds) == 7  # listed lazily: decodability is checked when read
    index = ds.paths.index("garbage.jpg")
    with pytest.warns(UserWarning, match="skipping garbage.jpg: cannot decode"):
        assert ds[index] is None
    assert ds.skipped == [("garbage.jpg", ds.skipped[0][1])]
    assert "UnidentifiedImageError" in ds.skipped[0][1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[index] is None  # already recorded: no second warning, no duplicate
    assert len(ds.skipped) == 1


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_skips_and_records_undecodable(tmp_path, workers):
    _with_broken_files(tmp_path)
    ds = build_dataset(tmp_path, transform=SMALL)
    loader = make_loader(ds, batch_size=3, num_workers=workers)
    assert loader.pin_memory is False and loader.persistent_workers is False
    with pytest.warns(UserWarning, match="skipping") as record:
        batches = list(loader)
    assert sum("skipping" in str(w.message) for w in record) == 2
    assert sorted(p for p, _ in ds.skipped) == ["garbage.jpg", "truncated.jpg"]
    paths = [p for b in batches for p in b["path"]]
    assert paths == [f"good{i}.png" for i in range(5)]
    for b in batches:
        assert b["image"].shape == (len(b["path"]), 3, 16, 16)
        assert b["label"].dtype == torch.int64 and (b["label"] == -1).all()
        assert [ds.paths[i] for i in b["index"].tolist()] == b["path"]
    assert sum(len(b["path"]) for b in batches) + len(ds.skipped) == len(ds)


def test_batch_of_only_broken_files_is_not_yielded(tmp_path):
    _with_broken_files(tmp_path)
    ds = build_dataset(tmp_path, transform=SMALL)
    broken = [ds.paths.index("garbage.jpg"), ds.paths.index("truncated.jpg")]
    with pytest.warns(UserWarning, match="skipping"):
        assert list(make_loader(ds, batch_size=2, num_workers=0, sampler=broken)) == []
    assert len(ds.skipped) == 2
    empty = collate_samples([None])
    assert empty["image"].shape[0] == 0 and empty["path"] == []


def test_loader_options(folders):
    ds = build_dataset(folders, transform=SMALL)
    assert make_loader(ds, batch_size=4, device="cuda").pin_memory is True
    assert make_loader(ds, batch_size=4, device=torch.device("cpu")).pin_memory is False
    sampler = torch.utils.data.SequentialSampler(range(6))
    batches = list(make_loader(ds, batch_size=4, num_workers=0, sampler=sampler))
    assert [b["index"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(UserError, match="batch size must be a positive integer, got 0"):
        make_loader(ds, batch_size=0)
    with pytest.raises(UserError, match="num_workers must be an integer >= 0, got -1"):
        make_loader(ds, batch_size=2, num_workers=-1)


# --------------------------------------------------------------------------- hostile folders


def _with_special_files(root: Path) -> dict[str, str]:
    """Good images plus files named like images that must never be opened."""
    import socket

    for i in range(3):
        write_image(root / f"good{i}.png", seed=i)
    expected = {}
    os.mkfifo(root / "fifo.png")  # opening it for reading would block forever
    expected["fifo.png"] = "a FIFO, not a regular file"
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    expected["dangling.jpg"] = "broken symbolic link"
    if Path("/dev/zero").exists():
        (root / "zero.png").symlink_to("/dev/zero")  # reading never ends
        expected["zero.png"] = "a character device, not a regular file"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock.png"))
        expected["sock.png"] = "a socket, not a regular file"
    except OSError:  # path too long for a socket address
        pass
    finally:
        sock.close()
    return expected


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("workers", [0, 1])
def test_non_regular_files_are_skipped_unopened(tmp_path, workers):
    expected = _with_special_files(tmp_path)
    ds = build_dataset(tmp_path, transform=SMALL)
    loader = make_loader(ds, batch_size=4, num_workers=workers, timeout=60)
    with pytest.warns(UserWarning, match="skipping"):
        paths = [p for b in loader for p in b["path"]]
    assert paths == ["good0.png", "good1.png", "good2.png"]
    reasons = dict(ds.skipped)
    assert reasons.keys() == expected.keys()
    for name, reason in expected.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    with pytest.raises(SkipImage, match="FIFO"):
        decode_image(tmp_path / "fifo.png")


def test_image_dimensions_checked_before_decoding(tmp_path, monkeypatch):
    write_image(tmp_path / "small.png", size=(8, 8))
    write_image(tmp_path / "large.png", size=(40, 30))
    monkeypatch.setattr(data.decode, "MAX_IMAGE_PIXELS", 1000)
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    with pytest.raises(SkipImage, match=r"40x30 = 1,200 pixels, over the limit of 1,000"):
        decode_image(tmp_path / "large.png")
    assert decoded == [], "the pixels must not be decoded"
    monkeypatch.undo()
    monkeypatch.setattr(data.decode, "MAX_IMAGE_PIXELS", 1000)
    ds = build_dataset(tmp_path, transform=SMALL)
    with pytest.warns(UserWarning, match="skipping large.png"):
        batches = list(make_loader(ds, batch_size=2, num_workers=0))
    assert [p for b in batches for p in b["path"]] == ["small.png"]
    assert ds.skipped == [("large.png", ds.skipped[0][1])]
    assert "over the limit of 1,000 (advtune.data.MAX_IMAGE_PIXELS)" in ds.skipped[0][1]


def test_folder_of_only_undecodable_files_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "c.png")
    with pytest.raises(UserError) as info:
        build_dataset(tmp_path, transform=SMALL)
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message
    assert "no decodable image" in message and "the first, a.jpg: UnidentifiedImageError" in message
    write_image(tmp_path / "z.png")  # one good image, sorted last: fine
    assert len(build_dataset(tmp_path, transform=SMALL)) == 4


class _Stuck(torch.utils.data.Dataset):
    """A dataset whose worker never answers (sleeps) or dies (SIGKILL)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        if self.how == "sleep":
            time.sleep(120)
        os.kill(os.getpid(), signal.SIGKILL)


def test_stuck_worker_times_out_with_a_user_error():
    loader = make_loader(_Stuck("sleep"), batch_size=1, num_workers=1, timeout=2)
    start = time.monotonic()
    with pytest.raises(UserError, match=r"produced no batch in 2 s.*--workers 0") as info:
        next(iter(loader))
    assert time.monotonic() - start < 60 and "\n" not in str(info.value)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")
def test_dead_worker_is_a_user_error():
    loader = make_loader(_Stuck("kill"), batch_size=1, num_workers=1, timeout=60)
    with pytest.raises(
        UserError, match=r"DataLoader worker .*(killed by signal|exited unexpectedly).*--workers"
    ):
        next(iter(loader))


def test_loader_timeout_option(folders):
    ds = build_dataset(folders, transform=SMALL)
    assert make_loader(ds, batch_size=2).timeout == data.LOADER_TIMEOUT
    assert make_loader(ds, batch_size=2, num_workers=0, timeout=5).timeout == 0
    with pytest.raises(UserError, match=r"loader timeout must be .* got -1"):
        make_loader(ds, batch_size=2, timeout=-1)


def test_file_size_limit_loads_in_process(folders):
    resource = pytest.importorskip("resource")
    ds = build_dataset(folders, transform=SMALL)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50 * 1024, hard))
    try:
        with pytest.warns(UserWarning, match=r"file size limit \(ulimit -f\) is 51200 bytes"):
            loader = make_loader(ds, batch_size=2, num_workers=2)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert loader.num_workers == 0
    assert make_loader(ds, batch_size=2, num_workers=2).num_workers == 2


def test_packaged_subset_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "datasets/imagenet_val_5000_robustbench.txt"
    assert resolve_subset_path(name) == robustbench_subset()
    local = tmp_path / "datasets" / "imagenet_val_5000_robustbench.txt"
    local.parent.mkdir()
    local.write_text("n01440764/x.JPEG\n")
    assert resolve_subset_path(name) == Path(name)  # a file that exists wins
    with pytest.raises(UserError) as info:
        resolve_subset_path("datasets/nope.txt")
    assert "datasets/nope.txt" in str(info.value)
    assert str(robustbench_subset().parent / "nope.txt") in str(info.value)
    with pytest.raises(UserError, match=r"subset file 'other\.txt' not found \(tried other\.txt\)"):
        resolve_subset_path("other.txt")


def test_excluded_output_folder_is_not_read(tmp_path, monkeypatch):
    write_image(tmp_path / "photo.png")
    write_image(tmp_path / "runs" / "out" / "adv" / "photo.png")  # an earlier run's output
    write_image(tmp_path / "runs" / "keep.png")
    monkeypatch.chdir(tmp_path)
    assert len(build_dataset(".", transform=SMALL)) == 3
    ds = build_dataset(".", transform=SMALL, exclude=["runs/out", tmp_path.parent / "x"])
    assert ds.paths == ["photo.png", "runs/keep.png"]
    for inside in (".", "runs", tmp_path):
        with pytest.raises(UserError, match=r"is inside .* excluded from the data"):
            build_dataset("runs/out/adv", transform=SMALL, exclude=[inside])
