"""advtune.models: building, weights, checkpoints, factories, normalisation inside."""

from __future__ import annotations

import importlib.util
import os
import urllib.error

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

import advtune
from advtune.data import sample_dir
from advtune.errors import UserError
from advtune.models import (
    DEFAULT_CONVBN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassifier,
    Preprocess,
    checkpoint_sha256,
    list_models,
    load_checkpoint,
    load_model,
    model_card,
    random_net,
)

pytestmark = pytest.mark.filterwarnings("ignore:weights='random'")


# A user's own model, loaded as "test_models:factory" (pytest puts tests/ on sys.path).
class TinyNet(nn.Module):
    advtune_input_size = 32

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(x.mean(dim=(2, 3)))


def factory() -> nn.Module:
    torch.manual_seed(0)
    net = TinyNet()
    with torch.no_grad():  # non-trivial BN statistics so folding is not the identity
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


def raw_factory() -> nn.Module:
    net = factory()
    net.advtune_normalized_input = False
    return net


def not_a_module() -> str:
    return "nope"


class Opaque:  # torch.load(weights_only=True) must refuse to unpickle this
    pass


def _normalize(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    "name",
    ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "googlenet"],  # squeezenet: no BN
)
def test_random_weights_frozen_eval_normalised(name):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="mean nothing"):
        model = load_model(name, weights="random")
    assert isinstance(model, ImageClassifier)
    assert model.weights == "random" and model.name == name and model.convbn == DEFAULT_CONVBN
    assert not model.training and not any(m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert model.num_classes == 1000 and model.categories[0] == "tench"
    assert model.preprocess.crop_size == 224

    model = model.double()  # the constants are rebuilt exactly in float64
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
        ref = model.net(_normalize(x))
    assert out.shape == (2, 1000)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert "mean" not in model.state_dict()  # non-persistent: the net's keys only


def test_convbn_modes_agree_and_report_on_wrapper():
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = {}
    for mode in ("eval", "tune", "deploy"):
        torch.manual_seed(0)  # same random init for every mode
        model = load_model("resnet18", weights="random", convbn=mode).double()
        # BN statistics are at their init (0/1) after construction: make them non-trivial.
        for name, m in model.net.named_modules():
            if mode != "deploy" and isinstance(m, nn.BatchNorm2d):
                g = torch.Generator().manual_seed(hash(name) % 2**31)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        with torch.no_grad():
            outs[mode] = model(x)
        if mode != "eval":
            assert advtune.convbn_report(model).mode == mode
            assert advtune.convbn_report(model) is model.convbn_report
            with pytest.raises(ValueError, match="already converted"):
                advtune.tune(model)
    torch.testing.assert_close(outs["tune"], outs["eval"], rtol=1e-10, atol=1e-10)
    # deploy folded the *initial* statistics, so it matches only the unmodified eval model
    assert outs["deploy"].shape == outs["eval"].shape


def test_preprocess_matches_weights_transforms_without_normalisation():
    torch.manual_seed(0)
    model = load_model("efficientnet_b0", weights="random", convbn="eval")
    weights = torchvision.models.EfficientNet_B0_Weights.DEFAULT
    assert model.preprocess.interpolation == weights.transforms().interpolation  # bicubic
    image = Image.open(sample_dir() / "chelsea.png")
    ours = model.preprocess(image)
    theirs = weights.transforms()(image)
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert ours.min() >= 0 and ours.max() <= 1
    torch.testing.assert_close(_normalize(ours[None])[0], theirs, rtol=0, atol=1e-5)


def test_input_size_from_weights():
    # resnet50's DEFAULT (V2) weights resize to 232; inception_v3 needs 299.
    assert load_model("resnet50", weights="random").preprocess.resize_size == 232
    inception = load_model("inception_v3", weights="random", convbn="eval")
    assert (inception.preprocess.crop_size, inception.preprocess.resize_size) == (299, 342)
    assert inception.net.transform_input is False  # random: our normalisation only


def test_list_models():
    names = list_models()
    assert names == sorted(names)
    assert {"resnet50", "vit_b_16", "inception_v3"} <= set(names)
    assert not any(n.startswith(("fasterrcnn", "raft", "quantized")) for n in names)


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match=r"unknown model 'resnt50'; did you mean: resnet50"):
        load_model("resnt50", weights="random")


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ("IMAGENET1K_V9", "did you mean: IMAGENET1K_V1"),
        ("ResNet18_Weights.IMAGENET1K_V9", "did you mean: IMAGENET1K_V1"),
        ("VGG16_Weights.DEFAULT", "belong to another model; resnet18 takes"),
        ("missing.pth", "checkpoint 'missing.pth' not found"),
        ("some/dir/file", "not found"),
    ],
)
def test_bad_weights(weights, match):
    with pytest.raises(UserError, match=match):
        load_model("resnet18", weights=weights)


def test_bad_convbn_and_device():
    with pytest.raises(UserError, match="unknown ConvBN mode 'tuen'; did you mean: tune"):
        load_model("resnet18", weights="random", convbn="tuen")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            load_model("resnet18", weights="random", device="cuda")


def test_frozen_mode_available_or_clear_error():
    if importlib.util.find_spec("advtune.frozen") is None:
        with pytest.raises(UserError, match="'frozen' is not available"):
            load_model("resnet18", weights="random", convbn="frozen")
    else:
        torch.manual_seed(0)
        model = load_model("resnet18", weights="random", convbn="frozen")
        torch.manual_seed(0)
        reference = load_model("resnet18", weights="random", convbn="eval")
        assert all(not p.requires_grad for p in model.parameters())
        x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torchvision cache, and a network that fails like an offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # set_dir() would override TORCH_HOME
    calls = []

    def offline(url, dst, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path, calls


def test_offline_download_gives_user_error(torch_home):
    _, calls = torch_home
    with pytest.raises(UserError) as info:
        load_model("resnet18")  # DEFAULT
    message = str(info.value)
    assert calls == [torchvision.models.ResNet18_Weights.DEFAULT.url]
    assert "could not download ResNet18_Weights.IMAGENET1K_V1" in message
    assert "--weights /path/to/file.pth" in message and "'random'" in message
    assert "\n" not in message


def test_named_weights_from_torchvision_cache(torch_home):
    home, calls = torch_home
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(3)
    source = torchvision.models.resnet18()
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / os.path.basename(weights.url))
    for name in ("IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1", "DEFAULT", "default"):
        model = load_model("resnet18", weights=name, convbn="eval")
        assert model.weights == "ResNet18_Weights.IMAGENET1K_V1"
        assert model.categories == weights.meta["categories"]
        for key, value in source.state_dict().items():
            assert torch.equal(model.net.state_dict()[key], value), key
    assert calls == []  # served from the cache


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "module_prefix"])
def test_checkpoint_round_trip(tmp_path, wrap):
    source = factory()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # differ from what the factory builds
    state = source.state_dict()
    if wrap == "state_dict":
        obj = {"state_dict": state, "epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}}
    elif wrap == "model":
        obj = {"model": state, "args": ["--lr", "0.1"]}
    elif wrap == "module_prefix":
        obj = {f"module.{k}": v for k, v in state.items()}
    else:
        obj = state
    path = tmp_path / "net.pth"
    torch.save(obj, path)
    model = load_model("test_models:factory", weights=str(path), convbn="eval")
    assert model.weights == f"checkpoint {path.resolve()}"
    for key, value in state.items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_torchvision_checkpoint_round_trip(tmp_path):
    torch.manual_seed(4)
    source = torchvision.models.squeezenet1_0()
    path = tmp_path / "squeeze.pt"
    torch.save({"model": source.state_dict()}, path)
    model = load_model("squeezenet1_0", weights=path, convbn="eval")
    assert model.categories is not None and model.num_classes == 1000
    for key, value in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_googlenet_checkpoint_uses_pretrained_input_transform(tmp_path):
    # An offline copy of torchvision's googlenet weights: built like the pretrained model
    # (transform_input=True, aux heads in the file), so outputs match that pipeline.
    torch.manual_seed(5)
    reference = torchvision.models.googlenet(
        weights=None, transform_input=True, aux_logits=True, init_weights=False
    ).eval()
    path = tmp_path / "googlenet.pth"
    torch.save(reference.state_dict(), path)
    model = load_model("googlenet", weights=path, convbn="eval").double()
    reference = reference.double()
    assert model.net.transform_input is True and model.net.aux1 is None
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(_normalize(x)), rtol=1e-12, atol=1e-12)


def test_mismatched_checkpoint_lists_keys(tmp_path):
    state = factory().state_dict()
    del state["bn.running_var"]
    state["head.weight"] = torch.zeros(2)
    state["fc.weight"] = torch.zeros(3, 4)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as info:
        load_model("test_models:factory", weights=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "1 missing keys: bn.running_var" in message
    assert "1 unexpected keys: head.weight" in message
    assert "fc.weight (3, 4) vs (10, 4)" in message


def test_mismatch_message_is_capped(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UserError, match=r"\d+ missing keys: .*, \.\.\.; \d+ unexpected keys"):
        load_model("squeezenet1_0", weights=str(path))


def test_not_a_checkpoint(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    with pytest.raises(UserError, match=r"notes\.pth' is not a valid PyTorch checkpoint"):
        load_model("test_models:factory", weights=str(text))
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.pt"):
        load_checkpoint(empty)
    pickled = tmp_path / "object.pth"
    torch.save({"thing": Opaque()}, pickled)
    with pytest.raises(UserError, match=r"object\.pth' cannot be loaded safely"):
        load_checkpoint(pickled)
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "lr": 0.1}, nested)
    with pytest.raises(UserError, match=r"entry 'epoch' is a int, not a tensor"):
        load_checkpoint(nested)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


# --------------------------------------------------------------------------- factories


def test_factory_model():
    # Tune mode folds on the fly, so model.double() gives an exact float64 reference
    # (deploy/frozen fold once, in the float32 the model was loaded in).
    model = load_model("test_models:factory", convbn="tune")
    assert model.weights == "factory test_models:factory"
    assert model.num_classes == 10 and model.categories is None
    assert model.preprocess.crop_size == 32
    assert all(not p.requires_grad for p in model.parameters()) and not model.training
    assert advtune.convbn_report(model).folded  # conv → bn was found in the user's net
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.double()(x.double())
        ref = factory().double().eval()(_normalize(x.double()))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_factory_with_raw_input_is_not_normalised():
    model = load_model("test_models:raw_factory", convbn="eval")
    assert torch.equal(model.mean.flatten(), torch.zeros(3))
    assert torch.equal(model.std.flatten(), torch.ones(3))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), raw_factory().eval()(x), rtol=0, atol=0)


def test_factory_random_reinitialises():
    with pytest.warns(UserWarning, match="mean nothing"):
        model = load_model("test_models:factory", weights="random", convbn="eval", seed=1)
    assert model.weights == "random" and model.card.seed == 1
    # factory() seeds the global RNG with 0 itself, so seed 1 must draw other weights.
    assert not torch.equal(model.net.conv.weight, factory().conv.weight)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("test_models:factroy", "unknown function in test_models 'factroy'; did you mean: factory"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("test_models:not_a_module", "must return an nn.Module, got str"),
        ("test_models:", "'package.module:function'"),
    ],
)
def test_bad_factory(spec, match):
    with pytest.raises(UserError, match=match):
        load_model(spec)


# --------------------------------------------------------------------------- cards


def test_card_before_any_module_is_built(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("model_card must not build a module")

    monkeypatch.setattr(torchvision.models, "get_model", no_build)
    card = model_card("resnet50")  # DEFAULT: torchvision's V2 weights
    assert card.source == "torchvision" and card.arch == "resnet50"
    assert card.weights == "ResNet50_Weights.IMAGENET1K_V2"
    assert card.preprocess == Preprocess(224, 232) and card.num_classes == 1000
    v1 = model_card("resnet50", weights="IMAGENET1K_V1")
    assert v1.weights == "ResNet50_Weights.IMAGENET1K_V1" and v1.preprocess == Preprocess()
    assert model_card("torchvision:resnet50") == card  # one canonical card per model
    random = model_card("resnet50", weights="random", seed=4)
    assert random.weights == "random" and random.seed == 4 and random.checkpoint is None


@pytest.mark.parametrize("weights", ["DEFAULT", "random"])
def test_loaded_model_carries_its_card(weights, torch_home):
    if weights == "DEFAULT":  # served from a cache file: no network
        home, _ = torch_home
        cache = home / "hub" / "checkpoints"
        cache.mkdir(parents=True)
        member = torchvision.models.SqueezeNet1_0_Weights.DEFAULT
        torch.save(
            torchvision.models.squeezenet1_0().state_dict(), cache / member.url.split("/")[-1]
        )
    model = load_model("squeezenet1_0", weights=weights, convbn="eval")
    card = model_card("squeezenet1_0", weights=weights)
    assert model.card == card
    assert (model.preprocess, model.weights, model.num_classes) == (
        card.preprocess,
        card.weights,
        card.num_classes,
    )
    assert model.card.to_dict()["preprocess"] == "resize 256 bilinear, crop 224"


@pytest.mark.parametrize(
    "name",
    [
        "resnet18",
        pytest.param(
            "timm:test_resnet",
            marks=pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="needs timm"),
        ),
    ],
)
def test_random_weights_seeded_identical_and_global_rng_untouched(name):
    state = torch.get_rng_state()
    a = load_model(name, weights="random", seed=5, convbn="eval")
    b = load_model(name, weights="random", seed=5, convbn="eval")
    c = load_model(name, weights="random", seed=6, convbn="eval")
    assert torch.equal(torch.get_rng_state(), state)
    assert a.card.seed == 5 and a.weights == "random"
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    # BN statistics are calibrated, not left at their 0/1 initial values.
    bn = next(m for m in a.modules() if isinstance(m, nn.BatchNorm2d))
    assert not torch.equal(bn.running_var, torch.ones_like(bn.running_var))
    with pytest.raises(UserError, match="seed must be an int"):
        load_model(name, weights="random", seed="1")


def test_random_net_is_the_one_builder():
    state = torch.get_rng_state()
    a = random_net("resnet18", seed=1, size=32, dtype=torch.float64)
    b = random_net("resnet18", seed=1, size=32, dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    assert not a.training and a.conv1.weight.dtype == torch.float64
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    raw = random_net("resnet18", seed=1, calibrate=False)
    assert torch.equal(raw.conv1.weight.double(), a.conv1.weight)
    assert torch.equal(raw.bn1.running_var, torch.ones(64))


def test_checkpoint_sha256_is_cached_and_sees_changes(tmp_path, monkeypatch):
    import hashlib

    path = tmp_path / "w.pth"
    state = factory().state_dict()
    torch.save(state, path)
    digest = checkpoint_sha256(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    reads = []
    real_open = type(path).open
    monkeypatch.setattr(
        type(path), "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k)
    )
    assert checkpoint_sha256(str(path)) == digest and reads == []  # cached: no read
    torch.save({**state, "fc.bias": state["fc.bias"] + 1}, path)
    assert checkpoint_sha256(path) != digest and len(reads) == 1
    card = model_card("test_models:factory", weights=str(path))
    assert card.weights_digest == checkpoint_sha256(path)
    assert model_card("resnet18", weights="random").weights_digest is None


def test_safetensors_checkpoint_next_to_pth(tmp_path):
    from safetensors.torch import save_file

    source = factory()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    path = tmp_path / "net.safetensors"
    save_file(source.state_dict(), path)
    model = load_model("test_models:factory", weights=str(path), convbn="eval")
    assert model.weights == f"checkpoint {path.resolve()}"
    for key, value in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(UserError, match=r"broken\.safetensors' is not a valid safetensors file"):
        load_checkpoint(broken)


def test_wrong_architecture_is_one_line_naming_first_mismatch(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(UserError) as info:
        load_model("resnet18", weights=str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    # resnet34 = resnet18 with more blocks: no missing key, the first extra one is named.
    assert "missing" not in message
    assert "unexpected keys: layer1.2.conv1.weight" in message
