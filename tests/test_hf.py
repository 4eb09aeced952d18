"""Hugging Face ``transformers`` classifiers (``hf:``): tiny random models built from
configs and saved with ``save_pretrained`` (offline), through the API and every CLI
command; ConvBN modes and frozen recompute checked in float64 against Eval mode."""

from __future__ import annotations

import json

import pytest
import torch
from fakes import write_imagenet_folder
from modelzoo import output_and_grad, rel_error
from PIL import Image

transformers = pytest.importorskip("transformers")

from advtune import convbn_report, tune  # noqa: E402
from advtune.cli import main  # noqa: E402
from advtune.convbn import MODES  # noqa: E402
from advtune.data import imagenet_categories, imagenet_wnids, sample_dir  # noqa: E402
from advtune.errors import UserError  # noqa: E402
from advtune.frozen import freeze_report  # noqa: E402
from advtune.models import load_model, model_card, random_net  # noqa: E402
from advtune.models.hf_source import imagenet_mismatch, preprocess_from_processor  # noqa: E402

SIDE = 32


def _lemmas() -> list[str]:
    """ImageNet labels as HF ImageNet configs write them (WordNet lemma lists)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(1000)]


def _configs():
    t = transformers
    vit = dict(image_size=SIDE, patch_size=8, hidden_size=16, num_hidden_layers=2,
               num_attention_heads=2, intermediate_size=32)  # fmt: skip
    return {
        "vit": (t.ViTConfig(**vit), t.ViTImageProcessor(size={"height": SIDE, "width": SIDE})),
        "deit": (
            t.DeiTConfig(**vit),
            t.DeiTImageProcessor(
                size={"height": 40, "width": 40},
                crop_size={"height": SIDE, "width": SIDE},
                image_mean=[0.485, 0.456, 0.406],
                image_std=[0.229, 0.224, 0.225],
            ),
        ),
        "swin": (
            t.SwinConfig(
                image_size=SIDE,
                patch_size=4,
                embed_dim=8,
                depths=[2, 2],
                num_heads=[2, 2],
                window_size=4,
            ),
            t.ViTImageProcessor(size={"height": SIDE, "width": SIDE}),
        ),
        "resnet": (
            t.ResNetConfig(
                embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck"
            ),
            t.ConvNextImageProcessor(size={"shortest_edge": SIDE}, crop_pct=0.875),
        ),
        "convnext": (
            t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=SIDE),
            t.ConvNextImageProcessor(size={"shortest_edge": SIDE}, crop_pct=0.875),
        ),
    }


_CLASSES = {
    "vit": "ViTForImageClassification",
    "deit": "DeiTForImageClassification",
    "swin": "SwinForImageClassification",
    "resnet": "ResNetForImageClassification",
    "convnext": "ConvNextForImageClassification",
}


def _save(root, kind: str, labels: list[str] | None = None, seed: int = 0):
    config, processor = _configs()[kind]
    labels = labels if labels is not None else _lemmas()
    config.id2label = dict(enumerate(labels))
    config.label2id = {v: k for k, v in config.id2label.items()}
    folder = root / kind
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, _CLASSES[kind])(config)
    if kind == "resnet":  # non-trivial BN statistics, so folding has something to fold
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: _save(root, kind) for kind in _configs()}


def test_card_before_weights_from_the_processor(zoo):
    card = model_card(f"hf:{zoo['deit']}")
    assert card.source == "hf" and card.arch == "DeiTForImageClassification"
    assert card.preprocess.crop_size == SIDE and card.preprocess.resize_size == (40, 40)
    assert card.preprocess.interpolation.value == "bicubic"  # DeiT's default resample 3
    assert card.mean == (0.485, 0.456, 0.406) and card.std == (0.229, 0.224, 0.225)
    assert card.dataset == "imagenet" and card.num_classes == 1000
    assert card.categories == tuple(imagenet_categories())  # our names, HF's order checked
    conv = model_card(f"hf:{zoo['convnext']}").preprocess
    assert (conv.crop_size, conv.resize_size) == (SIDE, int(SIDE / 0.875))
    vit = model_card(f"hf:{zoo['vit']}")
    assert vit.preprocess.resize_size == (SIDE, SIDE) and vit.mean == (0.5, 0.5, 0.5)
    # The card needs only the JSON files: no weights file has been read.
    (zoo["vit"] / "model.safetensors").rename(zoo["vit"] / "moved")
    try:
        assert model_card(f"hf:{zoo['vit']}").name == f"hf:{zoo['vit']}"
    finally:
        (zoo["vit"] / "moved").rename(zoo["vit"] / "model.safetensors")


@pytest.mark.parametrize("kind", ["vit", "deit", "resnet", "convnext"])
def test_preprocess_matches_the_image_processor(zoo, kind):
    """Our Preprocess + in-model normalisation give the processor's pixel_values."""
    card = model_card(f"hf:{zoo[kind]}")
    processor = transformers.AutoImageProcessor.from_pretrained(zoo[kind])
    image = Image.open(sample_dir() / "chelsea.png").convert("RGB")
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0].double()
    mean = torch.tensor(card.mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(card.std, dtype=torch.float64).view(3, 1, 1)
    ours = (card.preprocess(image).double() - mean) / std
    assert ours.shape == theirs.shape
    # Same crop and filter: only the 8-bit rounding of the resized image may differ.
    assert (ours - theirs).abs().max().item() < 2.5 / 255 / min(card.std)


def test_processor_configs_we_cannot_express_are_refused():
    with pytest.raises(UserError, match="'LevitImageProcessor' is not supported"):
        preprocess_from_processor({"image_processor_type": "LevitImageProcessor"}, "hf:x")
    with pytest.raises(UserError, match=r"rescale_factor 0\.5"):
        preprocess_from_processor(
            {"image_processor_type": "ViTImageProcessor", "rescale_factor": 0.5}, "hf:x"
        )
    with pytest.raises(UserError, match="16x32"):
        preprocess_from_processor(
            {"image_processor_type": "ViTImageProcessor", "size": {"height": 16, "width": 32}},
            "hf:x",
        )


def test_imagenet_order_is_checked_and_names_the_first_mismatch(tmp_path, zoo, capsys):
    labels = _lemmas()
    assert imagenet_mismatch(labels) is None
    assert imagenet_mismatch(list(imagenet_wnids())) is None  # WordNet ids work too
    assert imagenet_mismatch(imagenet_categories()) is None
    swapped = [labels[1], labels[0], *labels[2:]]
    assert imagenet_mismatch(swapped) == (
        "its class 0 is 'goldfish, Carassius auratus', ours is 'tench' (n01440764)"
    )
    five = _save(tmp_path, "vit", labels=["cat", "dog", "fox", "owl", "yak"])
    card = model_card(f"hf:{five}")
    assert card.dataset == "unknown" and card.categories == ("cat", "dog", "fox", "owl", "yak")
    assert load_model(f"hf:{five}").num_classes == 5  # the API loads it...
    data = write_imagenet_folder(tmp_path / "val", per_class=1)
    argv = ["evaluate", "--model", f"hf:{five}", "--data", str(data), "--out",
            str(tmp_path / "o"), "--attack", "fgsm", "--eps", "1/255", "--workers", "0"]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2  # ...but an ImageNet run refuses it, in one line
    err = capsys.readouterr().err.strip()
    assert "cannot be evaluated on ImageNet: it has 5 classes, not ImageNet's 1000" in err
    assert len(err.splitlines()) == 1
    # Unlabeled images (labels: the model's clean predictions) need no ImageNet classes.
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.open(sample_dir() / "chelsea.png").save(flat / "cat.png")
    argv[argv.index("--data") + 1] = str(flat)
    assert main([*argv, "-q"]) == 0, capsys.readouterr().err


def test_missing_files_and_bad_weights_are_one_line_errors(tmp_path, zoo):
    with pytest.raises(UserError, match=r"no config\.json"):
        model_card(f"hf:{tmp_path}")
    with pytest.raises(UserError, match=r"file\.pt.*not found"):
        model_card(f"hf:{zoo['vit']}", weights="/no/such/file.pt")


def _eval_reference(name: str, x: torch.Tensor):
    return output_and_grad(load_model(name, convbn="eval").double(), x)


def _converted(name: str, mode: str, *, recompute: bool = False):
    """The model in float64 *before* its conversion (deploy/frozen fold in the net's dtype)."""
    model = load_model(name, convbn="eval").double()
    model.net = tune(model.net, mode, inplace=True, recompute=recompute)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the activations autograd saves in one forward (parameters left out)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.clone().requires_grad_(True))
    return sum(seen.values())


def test_every_convbn_mode_equals_eval_on_hf_resnet(zoo):
    name = f"hf:{zoo['resnet']}"
    x = torch.rand(
        2, 3, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    out0, g0 = _eval_reference(name, x)
    bns = sum(
        isinstance(m, torch.nn.BatchNorm2d) for m in load_model(name, convbn="eval").modules()
    )
    assert bns == 8  # stem, 3 + 3 bottleneck convs, 1 projection shortcut
    for mode in MODES:
        model = _converted(name, mode)
        if mode != "eval":
            assert len(convbn_report(model.net).folded) == bns  # every Conv→BN folded
        out, g = output_and_grad(model, x)
        assert rel_error(out, out0) < 1e-10 and rel_error(g, g0) < 1e-10, mode
        # And through load_model itself (folded in float32: float32 agreement).
        out32, g32 = output_and_grad(load_model(name, convbn=mode), x.float())
        assert rel_error(out32.double(), out0) < 1e-5 and rel_error(g32.double(), g0) < 1e-5


@pytest.mark.parametrize("kind,blocks", [("vit", 2), ("deit", 2), ("swin", 4), ("convnext", 2)])
def test_frozen_recompute_equals_eval_on_hf_transformers(zoo, kind, blocks):
    name = f"hf:{zoo[kind]}"
    x = torch.rand(
        2, 3, SIDE, SIDE, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    out0, g0 = _eval_reference(name, x)
    assert len(freeze_report(load_model(name, recompute=True).net).recomputed) == blocks
    model = _converted(name, "frozen", recompute=True)
    assert len(freeze_report(model.net).recomputed) == blocks
    out, g = output_and_grad(model, x)
    assert rel_error(out, out0) < 1e-10 and rel_error(g, g0) < 1e-10
    # The blocks really keep only their input: the forward saves fewer activation bytes.
    assert _saved_bytes(model, x) < _saved_bytes(_converted(name, "frozen"), x)


def test_random_weights_and_checkpoints(zoo, tmp_path):
    name = f"hf:{zoo['vit']}"
    a = random_net(name, seed=3)
    b = random_net(name, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    loaded = load_model(name, convbn="eval")
    path = tmp_path / "vit.pt"
    torch.save(loaded.net.model.state_dict(), path)
    again = load_model(name, weights=str(path), convbn="eval")
    assert again.card.checkpoint == path and again.card.weights == f"checkpoint {path}"
    mine, theirs = again.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    x = torch.rand(1, 3, SIDE, SIDE)
    # Same tensors; the float32 sums may still differ in the last bits (memory layouts).
    torch.testing.assert_close(again(x), loaded(x), rtol=1e-5, atol=1e-6)


def test_generate_evaluate_list_and_bench_take_hf(zoo, tmp_path, capsys):
    data = write_imagenet_folder(tmp_path / "val", per_class=1)
    name = f"hf:{zoo['resnet']}"
    common = ["--model", name, "--data", str(data), "--limit", "2", "--batch-size", "2",
              "--workers", "0", "--attack", "fgsm", "-q"]  # fmt: skip
    assert main(["generate", *common, "--eps", "4/255", "--out", str(tmp_path / "g")]) == 0
    assert len(list((tmp_path / "g" / "adv").rglob("*.png"))) == 2
    assert main(["evaluate", *common, "--eps", "1/255,4/255", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["model"]["source"] == "hf" and report["model"]["name"] == name
    capsys.readouterr()
    assert main(["list", "models", "--source", "hf"]) == 0
    assert main(["bench", "--model", f"hf:{zoo['vit']}", "--size", str(SIDE), "--modes",
                 "eval,frozen", "--steps", "0", "--no-peak", "--batch-size", "2",
                 "--saved-batches", "1,2"]) == 0  # fmt: skip
    assert "frozen" in capsys.readouterr().out


def test_a_repo_id_offline_is_one_line_naming_the_folder_way(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"config\.json of hf:google/vit-base") as info:
        model_card("hf:google/vit-base-patch16-224")
    assert "hf:/path" in str(info.value) and "\n" not in str(info.value)
