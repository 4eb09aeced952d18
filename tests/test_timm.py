"""timm models: cards from timm's configs, seeded random weights, checkpoints, ConvBN modes."""

from __future__ import annotations

import io

import pytest
import torch
from modelzoo import output_and_grad, rel_error
from PIL import Image

import advtune
from advtune.convbn import DeployedBatchNormAct
from advtune.data import sample_dir
from advtune.errors import UserError
from advtune.models import load_model, model_card, random_net

timm = pytest.importorskip("timm")
from timm.data import create_transform, resolve_data_config  # noqa: E402
from timm.layers import BatchNormAct2d  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:weights='random'")
F64 = torch.float64

# One model per family, with the input side that keeps float64 on 2 cores fast
# (timm's test_* models are the families' smallest configurations).
FAMILIES = {
    "resnet": ("timm:test_resnet", 160),
    "convnext": ("timm:test_convnext", 160),
    "vit": ("timm:test_vit", 160),
    "efficientnet": ("timm:test_efficientnet", 160),
    "regnet": ("timm:regnetx_002", 32),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_convbn_modes_equal_eval_in_float64(family):
    name, size = FAMILIES[family]
    net = random_net(name, size=size, dtype=F64)
    x = torch.rand(2, 3, size, size, dtype=F64, generator=torch.Generator().manual_seed(1))
    ref_out, ref_grad = output_and_grad(net, x)
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())
    for mode in ("tune", "deploy", "frozen"):
        converted = advtune.tune(net, mode)
        out, grad = output_and_grad(converted, x)
        assert rel_error(out, ref_out) <= 1e-10, (family, mode, "logits")
        assert rel_error(grad, ref_grad) <= 1e-10, (family, mode, "input grad")
        report = advtune.convbn_report(converted)
        assert report.skipped == [], (family, mode, report.skipped)
        assert bool(report.folded) == has_bn, (family, mode)


def test_batchnorm_act_folds_bn_and_keeps_activation():
    net = random_net("timm:test_efficientnet", size=64, dtype=F64)
    norm_acts = [n for n, m in net.named_modules() if isinstance(m, BatchNormAct2d)]
    assert norm_acts  # the family this test is about
    folded = {p.bn for p in advtune.convbn_report(net).folded}
    assert set(norm_acts) <= folded
    deployed = advtune.tune(net, "deploy")
    replaced = deployed.get_submodule(norm_acts[0])
    assert isinstance(replaced, DeployedBatchNormAct)
    assert type(replaced.act) is type(net.get_submodule(norm_acts[0]).act)
    tuned = advtune.tune(net, "tune")
    assert type(tuned.get_submodule(norm_acts[0])).__name__ == "FoldedBatchNormAct2d"
    # The class made on demand pickles like those registered at import.
    buffer = io.BytesIO()
    torch.save(tuned, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    y = torch.rand(2, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(loaded(y), net(y)) <= 1e-10
    # Training mode falls back to the module's own BN + act forward.
    x = torch.rand(4, 3, 64, 64, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = tuned.train()(x), net.train()(x)
    assert rel_error(a, b) <= 1e-10


@pytest.mark.parametrize(
    "name",
    [
        "resnet18.a1_in1k",  # bicubic, crop_pct 0.95
        "vit_base_patch16_224.augreg2_in21k_ft_in1k",  # mean/std 0.5
        "inception_v3.tv_in1k",  # 299 px, crop_pct 0.875
        "efficientnet_b0.ra_in1k",
        "regnetx_002.pycls_in1k",  # bilinear
        "convnext_tiny.in12k_ft_in1k",
    ],
)
def test_card_preprocessing_equals_timm_transform(name):
    card = model_card(f"timm:{name}")  # built from the pretrained config: no module
    model = timm.create_model(name, pretrained=False)
    timm_transform = create_transform(**resolve_data_config({}, model=model))
    image = Image.open(sample_dir() / "chelsea.png")
    ours = card.preprocess(image)
    mean = torch.tensor(card.mean).view(3, 1, 1)
    std = torch.tensor(card.std).view(3, 1, 1)
    theirs = timm_transform(image)
    assert ours.shape == theirs.shape
    assert ours.min() >= 0 and ours.max() <= 1
    torch.testing.assert_close((ours - mean) / std, theirs, rtol=0, atol=1e-5)
    assert card.num_classes == model.num_classes and card.source == "timm"


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip(tmp_path, suffix):
    from safetensors.torch import save_file

    source = random_net("timm:test_resnet", seed=5, size=32)
    path = tmp_path / f"net{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    model = load_model("timm:test_resnet", weights=str(path), convbn="eval")
    assert (
        model.card.checkpoint == path.resolve() and model.weights == f"checkpoint {path.resolve()}"
    )
    for key, value in state.items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_wrong_architecture_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(random_net("timm:test_vit", size=160, calibrate=False).state_dict(), path)
    with pytest.raises(UserError) as info:
        load_model("timm:test_resnet", weights=str(path))
    message = str(info.value)
    assert "\n" not in message and "other.pth" in message
    assert "missing keys: " in message and "unexpected keys: " in message


def test_weights_tags_and_errors(monkeypatch):
    assert model_card("timm:resnet18", weights="a1_in1k").weights == "timm/resnet18.a1_in1k"
    assert model_card("timm:resnet18").weights == timm_default("resnet18")
    with pytest.raises(UserError, match="did you mean: resnet18"):
        model_card("timm:resnet18x")
    with pytest.raises(UserError, match=r"unknown timm weights 'resnet18\.a9_in1k'"):
        model_card("timm:resnet18", weights="a9_in1k")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(UserError, match=r"could not download timm weights 'resnet18\.a1_in1k'"):
        load_model("timm:resnet18")


def timm_default(arch: str) -> str:
    cfg = timm.models.get_pretrained_cfg(arch)
    return f"timm/{arch}.{cfg.tag}"


class _ScaledBatchNormAct(BatchNormAct2d):
    """A user's BatchNormAct2d whose forward differs: folding it would be wrong."""

    def forward(self, x):
        return super().forward(x) * 2


def test_norm_act_subclass_with_own_forward_is_not_folded():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False), _ScaledBatchNormAct(4), torch.nn.Conv2d(4, 2, 1)
    ).to(F64)
    x = torch.rand(2, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.eval()(x)
    for mode in ("tune", "deploy"):
        converted = advtune.tune(model, mode)
        report = advtune.convbn_report(converted)
        assert report.folded == [] and [s.module for s in report.skipped] == ["1"]
        with torch.no_grad():
            assert rel_error(converted(x), ref) <= 1e-12
