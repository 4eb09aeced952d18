"""Lean layers (advtune.lean): bit packing, and each layer against its torch.nn original
in float64 (outputs and input gradients), plus what each one saves for backward."""

from __future__ import annotations

import copy
import dataclasses
import re
import threading

import pytest
import torch
from torch import nn

from advtune import lean, masks
from advtune.lean import (
    LEAN_TYPES,
    FrozenParameterError,
    KernelPolicy,
    kernel_policy,
    kernels,
    pack_bits,
    unpack_bits,
)


def _lean_copy(module: nn.Module) -> nn.Module:
    m = copy.deepcopy(module)
    m.__class__ = LEAN_TYPES[type(module)]
    m.requires_grad_(False)
    return m


def _saved(fn):
    """(result, list of saved tensors) while fn() builds its graph."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def _compare(module: nn.Module, x: torch.Tensor, *, tol: float = 1e-12):
    """Forward + input gradient of module vs its lean copy; returns the lean saved tensors."""
    module = module.double().requires_grad_(False)
    lean_module = _lean_copy(module)
    gen = torch.Generator().manual_seed(1)
    x = x.double()
    xr = x.clone().requires_grad_(True)
    # Inplace layers modify their input: feed a non-leaf.
    ref = module(xr * 1.0)
    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    (ref_grad,) = torch.autograd.grad(ref, xr, g)
    xl = x.clone().requires_grad_(True)
    out, saved = _saved(lambda: lean_module(xl * 1.0))
    (grad,) = torch.autograd.grad(out, xl, g)
    torch.testing.assert_close(out, ref, rtol=tol, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=tol, atol=tol * ref_grad.abs().max().item())
    # No tensor may hide on the ctx (bench counts saved tensors through the hooks).
    node = out.grad_fn
    while node is not None and not hasattr(node, "__dict__"):  # skip C++ nodes (squeeze)
        node = node.next_functions[0][0] if node.next_functions else None
    if node is not None:
        assert not [k for k, v in vars(node).items() if isinstance(v, torch.Tensor)]
    return saved


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [0, 1, 3, 7, 8, 9, 15, 17, 63, 64, 65, 1001])
def test_pack_unpack_round_trip(mask_kernels, n):
    gen = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=gen) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.shape == ((n + 7) // 8,)
    assert torch.equal(unpack_bits(packed, n), mask)
    assert torch.equal(masks.pack_between(mask.double(), 0.5), packed)


def test_pack_bit_order_and_shapes():
    mask = torch.zeros(3, 5, 7, dtype=torch.bool)
    mask.view(-1)[0] = True
    mask.view(-1)[9] = True
    packed = pack_bits(mask)
    assert packed[0].item() == 1 and packed[1].item() == 2
    assert torch.equal(unpack_bits(packed, mask.numel()).view(3, 5, 7), mask)
    all_ones = pack_bits(torch.ones(13, dtype=torch.bool))
    assert all_ones.tolist() == [255, 31]  # padding bits are zero


def test_pack_unpack_reject_bad_input():
    with pytest.raises(ValueError, match="bool"):
        pack_bits(torch.zeros(4))
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(torch.zeros(1, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="numel=17"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)


def test_mask_round_trip_channels_last(mask_kernels):
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    order = masks.dense_order(x)
    assert order == (0, 2, 3, 1)
    flat = masks.flat_in(x, order)
    assert flat.data_ptr() == x.data_ptr()  # packed in memory order: no copy
    packed = masks.pack_between(flat, 0.0)
    mask = masks.unflat(unpack_bits(packed, x.numel()), x.shape, order)
    assert torch.equal(mask, x > 0)


@pytest.fixture(autouse=True)
def _always_lean():
    """This file checks what each lean layer saves, on small tensors: lean at any size
    (by default tensors under KernelPolicy.native_below elements run natively)."""
    with kernels(native_below=0):
        yield


def test_small_inputs_run_natively_below_the_policy_threshold():
    relu, conv = _lean_copy(nn.ReLU()), _lean_copy(nn.Conv2d(3, 4, 3).requires_grad_(False))
    for module, x in ((relu, torch.randn(2, 3, 4, 4)), (conv, torch.randn(2, 3, 6, 6))):
        for threshold, lean_fn in ((x.numel(), True), (x.numel() + 1, False)):
            x = x.detach().requires_grad_(True)
            with kernels(native_below=threshold):
                out = module(x)
            name = type(out.grad_fn).__name__
            assert name.endswith("FnBackward") is lean_fn, (module, threshold, name)
            assert kernel_policy().native_below == 0  # restored


def test_kernel_policy_is_per_context_and_restored():
    default = kernel_policy()
    assert default == KernelPolicy(native_below=0)  # this file's fixture
    with kernels(fold_channels=0) as outer:
        assert kernel_policy() is outer and outer.fold_channels == 0
        with kernels(numpy_max_threads=0):  # nested: starts from the one in force
            assert kernel_policy() == dataclasses.replace(
                default, fold_channels=0, numpy_max_threads=0
            )
        with kernels(KernelPolicy()):  # or from an explicit policy
            assert kernel_policy() == KernelPolicy()
        assert kernel_policy() is outer
        seen = []
        thread = threading.Thread(target=lambda: seen.append(kernel_policy()))
        thread.start()
        thread.join()
        assert seen == [KernelPolicy()]  # another thread keeps its own (the default)
    assert kernel_policy() is default
    with pytest.raises(RuntimeError), kernels(onednn_1x1=True):
        raise RuntimeError("restored on errors too")
    assert kernel_policy() is default


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fold_chanels", 0, "unknown kernel policy field 'fold_chanels'"),
        ("mask_chunk", 12, "mask_chunk must be a positive multiple of 8, got 12"),
        ("numpy_max_threads", -1, "numpy_max_threads must be an int >= 0, got -1"),
        ("onednn_1x1", 1, "onednn_1x1 must be a bool, got 1"),
    ],
)
def test_kernel_policy_refuses_bad_fields(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)), kernels(**{field: value}):
        pass
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelPolicy().fold_channels = 0  # type: ignore[misc]


@pytest.fixture(params=["numpy", "torch"])
def mask_kernels(request):
    """Both CPU implementations of the mask kernels (numpy up to 2 threads, torch above)."""
    with kernels(numpy_max_threads=0 if request.param == "torch" else 1 << 30):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_masked_gradient_on_the_bits_is_torch_where_with_inf_and_nan(mask_kernels, dtype):
    with kernels(mask_chunk=16):  # several chunks, one of them partial
        _check_masked_gradient(dtype)


def _check_masked_gradient(dtype):
    grad = torch.randn(61, dtype=torch.float64).to(dtype)
    grad[:4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0])
    grad[30:34] = grad[:4]
    mask = torch.rand(61) > 0.5
    mask[:4], mask[30:34] = False, True
    packed = pack_bits(mask)
    out = torch.empty_like(grad)
    masks.keep_where(grad, packed, out)
    expected = torch.where(mask, grad, 0)
    # Bitwise equal: +0.0 where masked (even for inf/nan), the gradient's bits elsewhere.
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))


# --------------------------------------------------------------------------- conv / linear


_CONVS = [
    (nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 11)),
    (nn.Conv2d(4, 6, 3, padding=1, bias=False), (2, 4, 9, 7)),
    (nn.Conv2d(4, 8, 3, stride=2, dilation=2, padding=2, groups=2), (2, 4, 11, 10)),
    (nn.Conv2d(6, 6, 3, padding=1, groups=6), (2, 6, 8, 8)),  # depthwise
    (nn.Conv2d(4, 6, 4, padding="same"), (2, 4, 9, 8)),  # asymmetric "same"
    (nn.Conv2d(4, 6, 3, padding="valid"), (2, 4, 9, 8)),
    (nn.Conv2d(4, 6, 3, padding=2, padding_mode="reflect"), (2, 4, 9, 8)),
    (nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 9, 8)),
    (nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode="replicate"), (2, 4, 9, 8)),
    (nn.Conv2d(4, 6, 3, padding=1), (4, 9, 8)),  # unbatched
    (nn.Conv2d(4, 6, 1), (2, 4, 5, 6)),  # 1x1: a matmul
    (nn.Conv2d(4, 6, 1, stride=2), (2, 4, 7, 6)),  # strided 1x1: matmul into a zero grid
    (nn.Conv2d(4, 6, 1, groups=2), (2, 4, 5, 6)),  # grouped 1x1: a transposed conv
    (nn.Conv2d(4, 6, 7, stride=2, padding=3), (2, 4, 12, 11)),  # stem-like: crop a view
    (nn.Conv2d(4, 6, 3, stride=3), (2, 4, 11, 10)),  # needs output padding, no room: fallback
    (nn.Conv2d(3, 5, 5, stride=2, dilation=2, padding=3), (2, 3, 13, 12)),  # fold: dilated
    (nn.Conv3d(3, 4, 3, padding=1, stride=(1, 2, 2)), (2, 3, 5, 6, 6)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), (2, 4, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (2, 4, 5, 6)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, dilation=2), (2, 4, 5, 6)),
    (nn.ConvTranspose3d(2, 4, 3, stride=2), (1, 2, 3, 4, 4)),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "no-fold"])
@pytest.mark.parametrize(("conv", "shape"), _CONVS, ids=lambda v: repr(v)[:60])
def test_conv_matches_native_and_saves_only_weight(conv, shape, fold):
    # Few input channels take the col2im (fold) input gradient on CPU; without it the
    # same convs exercise every other path (matmul, zero grid, crop, fallback).
    torch.manual_seed(0)
    x = torch.randn(shape)
    with kernels(fold_channels=4 if fold else 0):
        saved = _compare(conv, x)
    lean_weight = [t for t in saved if t.shape == conv.weight.shape]
    assert len(saved) == 1 and lean_weight, [t.shape for t in saved]


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_onednn_1x1_float32_forward_matches_native(monkeypatch, grad_mode, channels_last):
    """With the policy's onednn_1x1 (off by default), stride-1 1x1 float32 CPU convs run
    through oneDNN: native to float32 rounding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 1).requires_grad_(False)
    x = torch.randn(2, 16, 6, 5)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = conv.double()(x.double()).float()
    lean_copy = _lean_copy(conv.float())
    calls = []
    real = torch.ops.aten.mkldnn_convolution
    monkeypatch.setattr(
        torch.ops.aten, "mkldnn_convolution", lambda *a: calls.append(1) or real(*a)
    )
    with torch.set_grad_enabled(grad_mode), kernels(onednn_1x1=True):
        out = lean_copy(x.requires_grad_(grad_mode))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == ([1] if torch.backends.mkldnn.is_available() else [])
    with torch.set_grad_enabled(grad_mode):
        lean_copy(x)
    assert len(calls) <= 1  # switched off: the native kernel choice


def test_onednn_1x1_leaves_other_convs_native():
    """An unbatched 1x1x1 Conv3d input is 4-D like a batched 2-D one: still native."""
    conv = nn.Conv3d(4, 3, 1).requires_grad_(False)
    x = torch.randn(4, 2, 5, 5)
    lean_copy = _lean_copy(conv)
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode), kernels(onednn_1x1=True):
            out = lean_copy(x.clone().requires_grad_(grad_mode))
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-6)


def test_conv_transpose_output_size():
    torch.manual_seed(0)
    conv = nn.ConvTranspose2d(3, 4, 3, stride=2).double().requires_grad_(False)
    lean_conv = _lean_copy(conv)
    x = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    ref = conv(x, output_size=[12, 12])
    out = lean_conv(x, output_size=[12, 12])
    assert out.shape == ref.shape == (1, 4, 12, 12)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=0)


def test_linear_matches_native_and_saves_only_weight():
    torch.manual_seed(0)
    saved = _compare(nn.Linear(5, 3), torch.randn(2, 4, 5))
    assert len(saved) == 1 and saved[0].shape == (3, 5)


# --------------------------------------------------------------------------- activations


@pytest.mark.parametrize(
    "act",
    [
        nn.ReLU(),
        nn.ReLU(inplace=True),
        nn.ReLU6(inplace=True),
        nn.ReLU6(),
        nn.LeakyReLU(0.1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Hardtanh(-0.5, 1.5),
        nn.Hardsigmoid(),
        nn.Hardsigmoid(inplace=True),
    ],
    ids=repr,
)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunk", [None, 8], ids=["one-chunk", "chunked"])
def test_masked_activations_match_native_with_one_bit(act, channels_last, chunk):
    # One chunk and contiguous: the short numpy path; several chunks: advtune.masks'.
    torch.manual_seed(0)
    x = torch.randn(3, 5, 7, 9) * 4
    x[0, 0, 0, :3] = torch.tensor([0.0, -3.0, 3.0])  # boundaries of every mask
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with kernels(**({} if chunk is None else {"mask_chunk": chunk})):
        saved = _compare(act, x, tol=0)
    assert len(saved) == 1
    assert saved[0].dtype == torch.uint8 and saved[0].numel() == (x.numel() + 7) // 8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_chunk_mask_path_equals_the_masks_kernels_bit_for_bit(dtype):
    from advtune.lean.activations import _keep_one_chunk, _pack_one_chunk

    torch.manual_seed(0)
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 3.0, -3.0])
    x = torch.cat([torch.randn(50) * 4, specials]).to(dtype)
    grad = torch.cat([specials, torch.randn(50)]).to(dtype)
    for low, high in ((0.0, None), (-3.0, 3.0), (-0.5, 1.5)):
        packed = _pack_one_chunk(x.numpy(), low, high)
        assert torch.equal(packed, masks.pack_between(x, low, high))
        out = torch.empty_like(grad)
        masks.keep_where(grad, packed, out)
        for in_place in (False, True):
            g = grad.clone()
            result = _keep_one_chunk(g, packed, in_place=in_place)
            assert (result.data_ptr() == g.data_ptr()) is in_place
            assert torch.equal(result.view(torch.uint8), out.view(torch.uint8))


def test_inplace_relu_modifies_input_like_native():
    relu = _lean_copy(nn.ReLU(inplace=True))
    x = torch.randn(4, 6, requires_grad=True)
    h = x * 2
    out = relu(h)
    assert out.data_ptr() == h.data_ptr()
    assert (h >= 0).all()
    out.sum().backward()
    torch.testing.assert_close(x.grad, 2.0 * (x > 0))


def test_inplace_relu_on_leaf_raises_like_native():
    relu = _lean_copy(nn.ReLU(inplace=True))
    with pytest.raises(RuntimeError, match="leaf"):
        relu(torch.randn(3, requires_grad=True))


# --------------------------------------------------------------------------- pooling / BN


@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        (nn.MaxPool2d(3, 2, 1), (2, 3, 11, 12)),
        (nn.MaxPool2d(2), (2, 3, 8, 8)),
        (nn.MaxPool2d(3, 2, ceil_mode=True), (2, 3, 10, 9)),
        (nn.MaxPool2d((3, 2), (2, 1), (1, 0), dilation=(1, 2)), (2, 3, 9, 9)),
        (nn.MaxPool2d(3, 1, 1), (3, 6, 6)),  # unbatched
        (nn.MaxPool2d(3, 2, 1), (1, 2, 7, 130)),  # a window spans > 255 flat positions
    ],
    ids=repr,
)
def test_maxpool_matches_native_with_uint8_offsets(pool, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    x[..., 2, 2:5] = 5.0  # ties: the same argmax as native must be picked
    saved = _compare(pool, x, tol=0)
    assert len(saved) == 1 and saved[0].dtype == torch.uint8


def test_maxpool_channels_last():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last)
    _compare(nn.MaxPool2d(3, 2, 1), x, tol=0)


@pytest.mark.parametrize(
    "pool",
    [
        nn.AvgPool2d(2),
        nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
        nn.AvgPool2d(3, 1, divisor_override=4),
        nn.AdaptiveAvgPool2d(1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.AdaptiveAvgPool2d((2, 3)),  # not global: runs natively
    ],
    ids=repr,
)
def test_average_pools_match_native(pool):
    torch.manual_seed(0)
    saved = _compare(pool, torch.randn(2, 3, 8, 9))
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size in (1, (1, 1)):
        assert saved == []


@pytest.mark.parametrize(
    ("bn", "shape"),
    [
        (nn.BatchNorm1d(4), (3, 4)),
        (nn.BatchNorm1d(4, affine=False), (3, 4, 5)),
        (nn.BatchNorm2d(4), (3, 4, 5, 6)),
        (nn.BatchNorm3d(4), (2, 4, 3, 3, 3)),
    ],
    ids=repr,
)
def test_eval_batchnorm_matches_native_and_saves_only_scale(bn, shape):
    torch.manual_seed(0)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    if bn.affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_()
    saved = _compare(bn.eval(), torch.randn(shape))
    assert len(saved) == 1 and saved[0].numel() == 4


def test_batchnorm_in_training_mode_is_native():
    bn = _lean_copy(nn.BatchNorm2d(3)).train()
    x = torch.randn(4, 3, 2, 2, requires_grad=True)
    out = bn(x * 1.0)
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(3), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- frozen params


def test_weight_requiring_grad_raises_naming_parameter():
    conv = _lean_copy(nn.Conv2d(3, 4, 3))
    conv.__dict__["_advtune_name"] = "features.0"
    conv.weight.requires_grad_(True)
    with pytest.raises(FrozenParameterError, match=r"features\.0\.weight.*input gradients only"):
        conv(torch.randn(1, 3, 5, 5, requires_grad=True))
    with torch.no_grad():  # inference does not record anything: fine
        conv(torch.randn(1, 3, 5, 5))
    lin = _lean_copy(nn.Linear(3, 2))
    lin.bias.requires_grad_(True)
    with pytest.raises(FrozenParameterError, match=r"Linear\.bias"):
        lin(torch.randn(2, 3))


def test_lean_layers_under_bf16_autocast():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 4, 3).requires_grad_(False), nn.Linear(4, 2).requires_grad_(False)
    lean_conv, lean_lin = _lean_copy(conv), _lean_copy(lin)
    x = torch.randn(2, 3, 6, 6)
    results = []
    for c, li in ((conv, lin), (lean_conv, lean_lin)):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = c(xi)
            out = li(h.mean((2, 3)))
        assert h.dtype == out.dtype == torch.bfloat16
        (g,) = torch.autograd.grad(out.float().sum(), xi)
        assert g.dtype == torch.float32
        results.append((out, g))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=2e-2, atol=2e-2)


def _modules_in_parametrizations() -> set[type]:
    """The torch.nn classes this file's parametrized tests compare against their lean copy."""
    found: set[type] = set()

    def walk(value: object) -> None:
        if isinstance(value, nn.Module):
            found.add(type(value))
        elif isinstance(value, (tuple, list)):
            for v in value:
                walk(v)
        elif hasattr(value, "values"):  # pytest.param
            walk(list(value.values))

    for fn in list(globals().values()):
        for mark in getattr(fn, "pytestmark", []):
            if mark.name == "parametrize":
                walk(list(mark.args[1]))
    return found | {nn.Linear}  # Linear: test_linear_matches_native_and_saves_only_weight


def test_every_lean_layer_is_compared_with_its_original():
    # A lean class added to LEAN_TYPES without a float64 comparison here fails this test.
    untested = set(LEAN_TYPES) - _modules_in_parametrizations()
    assert not untested, f"lean layers without a float64 comparison: {untested}"


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("layer", "channels"),
    [(lean.LeanReLU(), 3), (lean.LeanHardsigmoid(), 3), (lean.LeanLeakyReLU(0.1), 3),
     (lean.LeanConv2d(8, 6, 1, bias=False), 8), (lean.LeanConv2d(3, 6, 3, padding=1), 3)],
    ids=repr,
)  # fmt: skip
def test_input_gradients_own_their_storage(layer, channels, channels_last):
    """A view would stop autograd from summing gradients in place at branch points."""
    layer = copy.deepcopy(layer).double().requires_grad_(False)
    x = torch.randn(2, channels, 5, 5, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inp = x.clone().requires_grad_(True) * 1.0  # a non-leaf: its gradient is the layer's
    out = layer(inp)
    (g,) = torch.autograd.grad(out, inp, torch.randn_like(out))
    assert g._base is None
    assert g.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
