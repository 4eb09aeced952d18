"""RobustBench models: cards with RobustBench's preprocessing and published figures,
local checkpoints in RobustBench's format, and the package path through a fake
``robustbench`` module (the real one pins an old timm and downloads from the web)."""

from __future__ import annotations

import enum
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision import transforms

from advtune.data import sample_dir
from advtune.errors import UserError
from advtune.models import get_card, list_cards, load_model, model_card, model_rows, random_net

pytestmark = pytest.mark.filterwarnings("ignore:weights='random'")

# RobustBench's named preprocessings as robustbench.data.PREPROCESSINGS writes them
# (the oracle: the package itself is not installed in the test environment).
ROBUSTBENCH_TRANSFORMS = {
    "Res256Crop224": transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
    ),
    "Crop288": transforms.Compose([transforms.CenterCrop(288), transforms.ToTensor()]),
    "Res224": transforms.Compose([transforms.Resize([224, 224]), transforms.ToTensor()]),
    "BicubicRes256Crop224": transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode("bicubic")),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
        ]
    ),
}
# Which preprocessing RobustBench's ImageNet Linf model zoo gives each entry.
EXPECTED_PREPROCESSING = {
    "Standard_R50": "Res256Crop224",
    "Salman2020Do_R50": "Res256Crop224",
    "Salman2020Do_R18": "Res256Crop224",
    "Engstrom2019Robustness": "Res256Crop224",
    "Wong2020Fast": "Crop288",
    "Liu2023Comprehensive_ConvNeXt-B": "BicubicRes256Crop224",
    "Mo2022When_ViT-B": "Res224",
}


def test_registry_is_strict_and_lists_the_leaderboard_entries():
    names = list_cards("robustbench")
    assert len(names) == len(set(names))
    assert {f"robustbench:{n}" for n in EXPECTED_PREPROCESSING} <= set(names)
    from advtune.models import register_card

    with pytest.raises(ValueError, match="already registered"):
        register_card(get_card("robustbench:Salman2020Do_R50"))
    with pytest.raises(UserError, match="did you mean: robustbench:Salman2020Do_R50"):
        get_card("robustbench:Salman2020Do_R5")


@pytest.mark.parametrize("name", list(EXPECTED_PREPROCESSING))
def test_card_preprocessing_equals_robustbench(name):
    card = model_card(f"robustbench:{name}")
    assert card.source == "robustbench" and card.dataset == "imagenet"
    assert card.threat_model == "Linf" and card.num_classes == 1000
    image = Image.open(sample_dir() / "chelsea.png")
    theirs = ROBUSTBENCH_TRANSFORMS[EXPECTED_PREPROCESSING[name]](image)
    ours = card.preprocess(image)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    p = card.published
    assert p is not None and p.attack == "autoattack" and p.norm == "Linf"
    assert p.eps == 4 / 255 and 0 <= p.robust <= p.clean <= 1


def test_standard_r50_is_torchvision_v1_not_default():
    card = model_card("robustbench:Standard_R50")
    assert card.weights == "ResNet50_Weights.IMAGENET1K_V1"
    assert model_card("resnet50").weights == "ResNet50_Weights.IMAGENET1K_V2"


def _robustbench_state(net: nn.Module) -> dict:
    """A checkpoint as RobustBench stores it: Sequential(normalize, model) under DataParallel."""
    state = OrderedDict(("module.model." + k, v) for k, v in net.state_dict().items())
    state["module.normalize.mean"] = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    state["module.normalize.std"] = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return {"state_dict": state, "epoch": torch.tensor(90)}


def test_local_checkpoint_in_robustbench_format(tmp_path):
    source = random_net("robustbench:Salman2020Do_R18", seed=7, size=32)
    path = tmp_path / "Salman2020Do_R18.pt"
    torch.save(_robustbench_state(source), path)
    model = load_model("robustbench:Salman2020Do_R18", weights=str(path), convbn="eval")
    assert model.card.published == get_card("robustbench:Salman2020Do_R18").published
    assert model.card.checkpoint == path.resolve()
    for key, value in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_wrong_architecture_names_first_mismatch(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save(_robustbench_state(torchvision.models.resnet50()), path)
    with pytest.raises(UserError) as info:
        load_model("robustbench:Salman2020Do_R18", weights=str(path))
    message = str(info.value)
    assert "\n" not in message
    assert (
        "shape mismatches (checkpoint vs model): layer1.0.conv1.weight (64, 64, 1, 1) vs (64, 64, 3, 3)"
        in message
    )


# --------------------------------------------------------------------------- package path


class _Dataset(enum.Enum):
    cifar_10 = "cifar10"
    cifar_100 = "cifar100"
    imagenet = "imagenet"


class _Threat(enum.Enum):
    Linf = "Linf"
    L2 = "L2"
    corruptions = "corruptions"


@pytest.fixture
def fake_robustbench(monkeypatch):
    """A ``robustbench`` package whose load_model returns what the real one builds
    (``Sequential(normalize, net)``) from in-memory weights, and records its calls."""
    calls = []
    weights = {
        "Salman2020Do_R18": random_net("robustbench:Salman2020Do_R18", seed=11, size=32),
        "Tiny2099Cifar": nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)),
    }

    def load_model(model_name, model_dir, dataset, threat_model):
        calls.append((model_name, str(model_dir), dataset, threat_model))
        if model_name not in weights:
            raise ConnectionError("Failed to reach the download host")
        net = weights[model_name]
        normalize = nn.Module()
        normalize.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        normalize.register_buffer("std", torch.ones(1, 3, 1, 1))
        if model_name == "Tiny2099Cifar":
            return net
        return nn.Sequential(OrderedDict(normalize=normalize, model=net))

    root = types.ModuleType("robustbench")
    utils = types.ModuleType("robustbench.utils")
    utils.load_model = load_model
    zoo = types.ModuleType("robustbench.model_zoo")
    enums = types.ModuleType("robustbench.model_zoo.enums")
    enums.BenchmarkDataset, enums.ThreatModel = _Dataset, _Threat
    zoo.model_dicts = {
        _Dataset.cifar_10: {_Threat.Linf: {"Tiny2099Cifar": {"preprocessing": None}}},
        _Dataset.imagenet: {_Threat.Linf: {"Odd2099Net": {"preprocessing": "Res256Crop224"}}},
    }
    root.utils, root.model_zoo = utils, zoo
    for name, module in (
        ("robustbench", root),
        ("robustbench.utils", utils),
        ("robustbench.model_zoo", zoo),
        ("robustbench.model_zoo.enums", enums),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return calls, weights


def test_download_through_package_loads_into_own_architecture(
    fake_robustbench, tmp_path, monkeypatch
):
    calls, weights = fake_robustbench
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    model = load_model("robustbench:Salman2020Do_R18", convbn="eval")
    assert calls == [
        ("Salman2020Do_R18", str(tmp_path / "hub" / "robustbench"), "imagenet", "Linf")
    ]
    assert type(model.net) is torchvision.models.ResNet  # advtune's build, not the wrapper
    for key, value in weights["Salman2020Do_R18"].state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    assert model.card.weights == "robustbench Salman2020Do_R18"


def test_uncarded_entry_uses_the_package_module(fake_robustbench):
    _, weights = fake_robustbench
    card = model_card("robustbench:Tiny2099Cifar", dataset="cifar10", threat_model="Linf")
    assert card.num_classes == 10 and card.preprocess.crop_size == 32
    assert card.preprocess.resize_size is None and card.published is None
    model = load_model("robustbench:Tiny2099Cifar", dataset="cifar10", convbn="eval")
    assert model.net is weights["Tiny2099Cifar"]
    assert torch.equal(model.mean.flatten(), torch.zeros(3))  # the module normalises itself
    with pytest.raises(UserError, match="did you mean: Tiny2099Cifar"):
        model_card("robustbench:Tiny2099Cifr", dataset="cifar10")
    with pytest.raises(UserError, match="needs its architecture"):
        model_card("robustbench:Odd2099Net", weights=__file__)


def test_failed_download_says_where_to_put_the_file(fake_robustbench):
    with pytest.raises(UserError, match=r"could not load Odd2099Net .*Odd2099Net\.pt"):
        load_model("robustbench:Odd2099Net")


def test_without_package_carded_models_still_load_offline(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "robustbench", None)  # import fails
    with pytest.raises(UserError, match=r"advtune\[robustbench\].*--weights"):
        load_model("robustbench:Salman2020Do_R50")
    model = load_model("robustbench:Salman2020Do_R18", weights="random", seed=2, convbn="eval")
    assert model.card.published is not None and model.card.seed == 2
    with pytest.raises(UserError, match="RobustBench dataset 'imagenet21k'"):
        model_card("robustbench:Salman2020Do_R18", dataset="imagenet21k")
    with pytest.raises(UserError, match="select RobustBench entries"):
        model_card("resnet50", threat_model="Linf")


def test_list_rows_show_sources_weights_and_published_figures():
    rows = model_rows(("torchvision", "robustbench"))
    by_name = {r.name: r for r in rows}
    assert by_name["resnet50"].source == "torchvision"
    assert by_name["resnet50"].weights == "ResNet50_Weights.IMAGENET1K_V2"
    assert by_name["resnet50"].preprocessing == "resize 232 bilinear, crop 224"
    rb = by_name["robustbench:Salman2020Do_R50"]
    assert rb.source == "robustbench" and "autoattack" in rb.published
    assert rb.published in rb.format()
