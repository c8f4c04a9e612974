"""ViT / DINOv2 backbones (dcc/method/models/vit.py): strides, parameters, exact stride-8 geometry, weights, the start check."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn

import pytest

from dcc.engine.job import run, summary
from dcc.config import ConfigError, validate
from dcc.method.models import build_model
from dcc.method.models.backbone import check_backbone
from dcc.method.models.vit import ViTBackbone, is_vit
from dcc.method.overlap import overlap_pairs
from tests.conftest import compose_cfg

P16, P14 = "vit_small_patch16_224", "vit_small_patch14_dinov2"
TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}
KWARGS = "++backbone.kwargs={depth:2,embed_dim:64,num_heads:2}"


def _vit_cfg(name: str, segnet: str, *extra: str):
    return compose_cfg([f"backbone.name={name}", KWARGS, f"segnet={segnet}", "segnet.channels=32",
                        "segnet.low_level_channels=16", *extra])


def _pyramid(dim: int, output_stride: int) -> int:
    """Hand count: stride 4 = deconv(D, D/2) + BN(D/2) + deconv(D/2, D/4); stride 8 = deconv(D, D/2); 16: none."""
    deconv = lambda cin, cout: cin * cout * 4 + cout  # noqa: E731
    low = deconv(dim, dim // 2) + 2 * (dim // 2) + deconv(dim // 2, dim // 4)
    return low + (deconv(dim, dim // 2) if output_stride == 8 else 0)


@pytest.mark.parametrize("name", [P16, P14])
@pytest.mark.parametrize("segnet, feat_stride, output_stride", [("deeplabv3plus", 4, 16), ("pspnet", 8, 8)])
def test_both_heads_parameters_and_two_input_sizes(name, segnet, feat_stride, output_stride):
    cfg = _vit_cfg(name, segnet, "task=summary", f"segnet.output_stride={output_stride}")
    validate(cfg)
    model = build_model(cfg).eval()
    vit = timm.create_model(name, num_classes=0, **TINY_VIT)
    counts = model.param_counts()
    assert counts["backbone"] == sum(p.numel() for p in vit.parameters()) + _pyramid(64, output_stride)
    assert summary(cfg).startswith(f"params: total={counts['total']} backbone={counts['backbone']} ")
    backbone_group, rest = model.param_groups()  # the pretrained ViT at backbone_lr_mult, the new pyramid with the head
    assert sum(p.numel() for p in backbone_group) == sum(p.numel() for p in vit.parameters())
    assert len(backbone_group) + len(rest) == len(list(model.parameters()))
    assert (model.backbone.low_channels, model.backbone.output_stride) == (16, output_stride)
    for h, w in [(64, 64), (40, 56)]:  # 40 x 56 is no multiple of the patch (14 or 16)
        x = torch.randn(2, 3, h, w)
        low, high = model.backbone(x)
        assert low.shape == (2, 16, h // 4, w // 4)
        assert high.shape[-2:] == (-(-h // output_stride), -(-w // output_stride))
        assert model.features(x).shape == (2, 32, h // feat_stride, w // feat_stride)
        assert model(x).shape == (2, 11, h, w)
        phi, logits = model.consistency_outputs(model.features(x))
        assert phi.shape[-2:] == logits.shape[-2:] == (h // 8, w // 8)


def _local_backbone(name: str, output_stride: int) -> ViTBackbone:
    """A ViT whose tokens do not mix (blocks replaced by identities, no position embedding): each token then
    depends on its own input patch only, which exposes the geometry of the patch grid and the pyramid."""
    backbone = ViTBackbone(name, output_stride=output_stride, kwargs=dict(TINY_VIT)).eval()
    backbone.body.blocks = nn.Sequential(*[nn.Identity() for _ in backbone.body.blocks])
    with torch.no_grad():
        backbone.body.pos_embed.zero_()
    return backbone


def _stride8(backbone: ViTBackbone, x: torch.Tensor, segnet: str) -> torch.Tensor:
    """The stride-8 cells the consistency branch sees: DeepLabv3+ pools its stride-4 decoder map 2x2, PSPNet
    uses the stride-8 map (here straight from the backbone: the heads' convolutions mix neighbouring cells,
    as they do on a ResNet)."""
    low, high = backbone(x)
    return F.avg_pool2d(low, 2) if segnet == "deeplabv3plus" else high


@pytest.mark.parametrize("name, patch", [(P16, 16), (P14, 14)])
@pytest.mark.parametrize("segnet, output_stride", [("deeplabv3plus", 16), ("pspnet", 8)])
def test_each_stride8_cell_comes_from_the_token_of_its_16px_block(name, patch, segnet, output_stride):
    backbone = _local_backbone(name, output_stride)
    assert backbone.patch == patch and backbone.token_stride == 16
    x = torch.randn(1, 3, 48, 64, requires_grad=True)
    cells = _stride8(backbone, x, segnet)
    assert cells.shape[-2:] == (6, 8)
    for i, j in [(0, 0), (1, 1), (2, 5), (5, 7), (3, 6)]:
        (grad,) = torch.autograd.grad(cells[0, :, i, j].sum(), x, retain_graph=True)
        support = grad.abs().sum((0, 1)) > 0
        block = torch.zeros_like(support)
        block[16 * (i // 2): 16 * (i // 2) + 16, 16 * (j // 2): 16 * (j // 2) + 16] = True
        assert not (support & ~block).any(), "the cell sees pixels outside its token's 16x16 block"
        assert support[8 * i: 8 * i + 8, 8 * j: 8 * j + 8].all(), "the cell does not see its own 8x8 pixels"


@pytest.mark.parametrize("name", [P16, P14])
def test_paired_cells_of_two_crops_see_the_same_pixels(name):
    """Crops at offsets that differ by multiples of 8, flipped or not: both cells of every pair that
    overlap_pairs forms see the 8x8 image block the pair stands for, and nothing outside one 16x16 token block
    around it (receptive fields in image coordinates); offsets 16 apart with the same flip give equal cells."""
    backbone = _local_backbone(name, 16)
    image = torch.randn(1, 3, 96, 112, requires_grad=True)
    crop = 48
    offsets1 = torch.tensor([[16, 32], [8, 24], [40, 8]])
    offsets2 = torch.tensor([[0, 0], [24, 48], [16, 32]])
    flips1, flips2 = torch.tensor([True, True, False]), torch.tensor([True, False, False])

    def view(offsets, flips):
        out = [image[0, :, y: y + crop, x: x + crop] for y, x in offsets.tolist()]
        return torch.stack([c.flip(-1) if f else c for c, f in zip(out, flips.tolist())])

    f1, f2, b = overlap_pairs(_stride8(backbone, view(offsets1, flips1), "deeplabv3plus"),
                              _stride8(backbone, view(offsets2, flips2), "deeplabv3plus"),
                              offsets1, offsets2, flips1, flips2, 8)
    assert ((offsets1 - offsets2) % 16 == 0).all(1).tolist() == [True, False, False]
    torch.testing.assert_close(f1[b == 0], f2[b == 0], rtol=1e-4, atol=1e-4)  # the same tokens of the same pixels
    assert not torch.allclose(f1[b == 1], f2[b == 1], atol=1e-3)  # half a token apart: other 16x16 blocks
    cells = crop // 8
    for k in range(3):
        dy, dx = ((offsets1[k] - offsets2[k]) // 8).tolist()
        pairs = [(i, j) for i in range(cells) for j in range(cells) if 0 <= i + dy < cells and 0 <= j + dx < cells]
        rows = torch.nonzero(b == k).flatten()
        assert len(rows) == len(pairs) > 0
        for r in (0, len(rows) // 2, len(rows) - 1):
            i, j = pairs[r]
            y, x = offsets1[k, 0].item() + 8 * i, offsets1[k, 1].item() + 8 * j  # the pair's 8x8 block in the image
            for feats in (f1, f2):
                (grad,) = torch.autograd.grad(feats[rows[r]].sum(), image, retain_graph=True)
                support = torch.nonzero(grad.abs().sum((0, 1)) > 0)
                assert support[:, 0].min() <= y and support[:, 0].max() >= y + 7  # sees the whole block ...
                assert support[:, 1].min() <= x and support[:, 1].max() >= x + 7
                assert support[:, 0].max() - support[:, 0].min() < 16  # ... within one token's 16 x 16 pixels
                assert support[:, 1].max() - support[:, 1].min() < 16


def test_vit_weights_load_in_timm_and_dinov2_formats(tmp_path):
    timm_vit = timm.create_model(P16, num_classes=10, **TINY_VIT)
    path = tmp_path / "vit_timm.pth"
    torch.save({"model": timm_vit.state_dict()}, path)
    cfg = _vit_cfg(P16, "deeplabv3plus", f"backbone.weights={path}")
    model = build_model(cfg)
    assert torch.equal(model.backbone.body.blocks[1].attn.qkv.weight, timm_vit.blocks[1].attn.qkv.weight)
    report = model.backbone.weights_report
    assert report["missing"] == [] and sorted(report["unexpected"]) == ["head.bias", "head.weight"]
    # the original DINOv2 release: mask_token, position embeddings of another grid (resampled to the model's)
    dino = timm.create_model(P14, num_classes=0, img_size=56, **TINY_VIT)
    state = dict(dino.state_dict(), mask_token=torch.zeros(1, 64))
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    model = build_model(_vit_cfg(P14, "pspnet", f"backbone.weights={tmp_path / 'dinov2_vits14_pretrain.pth'}"))
    assert model.backbone.weights_report == {"missing": [], "unexpected": []}
    assert torch.equal(model.backbone.body.blocks[0].mlp.fc1.weight, dino.blocks[0].mlp.fc1.weight)
    assert model.backbone.body.pos_embed.shape != dino.pos_embed.shape  # 37 x 37 grid vs 4 x 4, resampled


@pytest.mark.parametrize("name", [
    "resnet50", "resnext50_32x4d", "resnest50d", "res2net50_26w_4s", "regnety_016", "convnext_tiny", "convnextv2_tiny",
    "efficientnet_b0", "tf_efficientnetv2_s", "mixnet_s", "mobilenetv3_large_100", "xception65", "nfnet_f0",
    "cspresnet50", "repvgg_a2", "mobilevit_s", "vgg16", P16, "deit_small_patch16_224", P14,
    "vit_small_patch14_reg4_dinov2.lvd142m",
])
def test_backbone_families_that_work(name):
    for segnet, stride in [("deeplabv3plus", 16), ("deeplabv3plus", 8), ("pspnet", 8)]:
        assert check_backbone(name, output_stride=stride, segnet=segnet) is None, (name, segnet, stride)


@pytest.mark.parametrize("name, why", [
    ("swin_tiny_patch4_window7_224", "unexpected keyword argument 'output_stride'"),
    ("hrnet_w18", "AssertionError"), ("densenet121", "output_stride"), ("vit_base_r50_s16_224", "output_stride"),
    ("no_such_model", "is not a timm model"),
])
def test_unusable_backbones_are_named_with_the_families_that_work(name, why):
    problem = check_backbone(name, output_stride=16, segnet="deeplabv3plus")
    assert problem is not None and name in problem and why in problem
    assert "Backbones that work: ResNet" in problem and "DINOv2" in problem and "ConvNeXt" in problem


@pytest.mark.new_store
def test_unusable_backbone_fails_before_any_run_exists(tiny_overrides, tmp_path):
    cfg = compose_cfg(tiny_overrides + ["backbone.name=swin_tiny_patch4_window7_224"])
    with pytest.raises(ConfigError, match="swin_tiny_patch4_window7_224.*Backbones that work"):
        run(cfg, launch_dir=tmp_path)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
    with pytest.raises(ConfigError, match="vit_blocks=.*only applies to ViT"):
        validate(compose_cfg(["backbone.vit_blocks=[3]"]))
    with pytest.raises(ConfigError, match=r"vit_blocks=\[5\].*has 2 blocks"):
        validate(_vit_cfg(P16, "deeplabv3plus", "backbone.vit_blocks=[5]"))


def test_intermediate_blocks_feed_the_pyramid():
    assert is_vit(P14) and is_vit("deit_small_patch16_224") and not is_vit("resnet50") and not is_vit("vit_base_r50_s16_224")
    backbone = ViTBackbone(P16, output_stride=16, kwargs=dict(TINY_VIT), vit_blocks=[0, -1]).eval()
    assert (backbone.low_block, backbone.high_block) == (0, 1)
    x = torch.randn(1, 3, 32, 32)
    low, high = backbone(x)
    first, last = backbone.body.forward_intermediates(x, indices=[0, 1], norm=True, intermediates_only=True)
    torch.testing.assert_close(low, backbone.pyramid_low(first))
    torch.testing.assert_close(high, last)


@pytest.mark.slow
@pytest.mark.parametrize("name", [P16, P14])
def test_two_cac_steps_on_the_digits(name, tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("trainer.max_steps") and not o.startswith("trainer.eval")]
    cfg = compose_cfg(overrides + [f"backbone.name={name}", "++backbone.kwargs={depth:1,embed_dim:32,num_heads:2}",
                                   "trainer.max_steps=2", "trainer.eval_every=2", "loss.start_step=0", "logger=none"])
    miou = run(cfg, launch_dir=tmp_path)
    assert 0.0 <= miou <= 100.0  # in %


def test_backbone_without_meta_kernels_is_checked_on_the_cpu(monkeypatch):
    """torch 2.11 has no meta kernel for an operator that building RegNetX calls (aten::_unique2, seen on a GPU
    machine): the check then builds the backbone for real instead of rejecting it."""
    import dcc.method.models.backbone as bb

    real = bb.build_backbone

    def no_meta_kernel(*args, **kwargs):
        if torch.empty(0).device.type == "meta":
            raise NotImplementedError("aten::_unique2: attempted to run this operator with Meta tensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(bb, "build_backbone", no_meta_kernel)
    bb._check_cached.cache_clear()
    try:
        assert check_backbone("regnetx_002", output_stride=8, segnet="deeplabv3plus") is None
    finally:
        bb._check_cached.cache_clear()
