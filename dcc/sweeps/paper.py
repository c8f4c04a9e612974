"""The paper's numbers (Lai et al., CVPR 2021) and the names of its tables: Table 3's rows and switches,
Tables 1, 2, 3 and 5 in percent mIoU, and :func:`paper_miou`, the number a report puts beside a cell."""

from __future__ import annotations

# Table 3's rows, in the paper's order; other presets follow alphabetically.
ROW_ORDER = ("suponly", "st", "ablation_i", "ablation_ii", "ablation_iii", "ablation_iv", "ablation_v",
             "ablation_vi", "ablation_vii", "ablation_viii", "weakly")

# The switches of Table 3 (config key, column name), and each preset's, for runs that did not log them.
SWITCHES = (("proj", "Proj"), ("context", "Context"), ("cl", "CL"), ("dir", "Dir"), ("ns", "NS"), ("pf", "PF"))
PRESET_SWITCHES = {
    "suponly": "", "st": "", "ablation_i": "Proj+Context", "ablation_ii": "Proj+Context+CL",
    "ablation_iii": "Proj+Context+CL+Dir", "ablation_iv": "Proj+Context+CL+Dir+NS", "ablation_v": "Proj+Context+CL+NS+PF",
    "ablation_vi": "Proj+CL+Dir+NS+PF", "ablation_vii": "Context+CL+Dir+NS+PF", "ablation_viii": "Proj+Context+CL+Dir+NS+PF",
    "weakly": "Proj+Context+CL+Dir+NS+PF",
}


def switches_label(preset: str, params: dict[str, str]) -> str | None:
    """``Proj+Context+CL+Dir+NS`` from a run's params (else the preset's known switches); no switch: the method."""
    if all(f"loss/{k}" in params for k, _ in SWITCHES):
        on = "+".join(name for k, name in SWITCHES if params[f"loss/{k}"].lower() == "true")
    elif preset in PRESET_SWITCHES:
        on = PRESET_SWITCHES[preset]
    else:
        return None
    if not on:
        method = params.get("loss/method", "st" if preset == "st" else "suponly")
        return "self-training" if method == "st" else "supervised only"
    return on + ("+weak" if params.get("loss/weak", "").lower() == "true" else "")


# The paper's numbers (Lai et al., CVPR 2021), mIoU in percent.

# Table 3 (ablation): Pascal VOC, DeepLabv3+ ResNet-50, 1/8 of the labels.
TABLE3_SETTING = ("voc", "deeplabv3plus", "resnet50", "1_8")
TABLE3 = {
    "suponly": 64.7, "st": 66.3, "ablation_i": 64.2, "ablation_ii": 56.4, "ablation_iii": 64.8,
    "ablation_iv": 71.6, "ablation_v": 71.2, "ablation_vi": 70.5, "ablation_vii": 61.5, "ablation_viii": 72.4,
}
# Table 1: Pascal VOC; "Ours" is the full method (ablation_viii).
TABLE1 = {
    ("pspnet", "resnet50"): {
        "suponly": {"1_16": 57.4, "1_8": 65.0, "1_4": 68.3, "full": 75.1},
        "ablation_viii": {"1_16": 67.1, "1_8": 71.3, "1_4": 72.5, "full": 76.4},
    },
    ("deeplabv3plus", "resnet50"): {
        "suponly": {"1_16": 63.9, "1_8": 68.3, "1_4": 71.2, "full": 76.3},
        "ablation_viii": {"1_16": 70.1, "1_8": 72.4, "1_4": 74.0, "full": 76.5},
    },
    ("deeplabv3plus", "resnet101"): {
        "suponly": {"1_16": 66.4, "1_8": 71.0, "1_4": 73.5, "full": 77.7},
        "ablation_viii": {"1_16": 72.4, "1_8": 74.6, "1_4": 76.3, "full": 78.2},
    },
}
# Table 2: Cityscapes (the paper's Cityscapes experiments use DeepLabv3+ ResNet-50).
TABLE2 = {
    ("deeplabv3plus", "resnet50"): {
        "suponly": {"1_8": 66.0, "1_4": 70.7, "full": 77.7},
        "ablation_viii": {"1_8": 69.7, "1_4": 72.7, "full": 77.5},
    },
}

# Table 5: Pascal VOC classic protocol (1,464 pixel-labeled, 9,118 unlabeled = split "full"), "Semi" = the full
# method (ablation_viii), "Weakly" = with image-level labels (the weakly preset). Head: DeepLabv3+ (see
# conf/experiment/voc_table5_*.yaml).
TABLE5 = {
    "resnet50": {"ablation_viii": 74.5, "weakly": 76.1},
    "vgg16": {"ablation_viii": 68.7, "weakly": 69.3},
}


def paper_dataset(name: str) -> str | None:
    """Map a dataset tag to the paper's dataset (``voc``, ``cityscapes``) or None."""
    n = name.lower()
    if "voc" in n or "pascal" in n:
        return "voc"
    if "cityscapes" in n:
        return "cityscapes"
    return None


def paper_miou(dataset: str, segnet: str, backbone: str, preset: str, split: str, *, ablation: bool,
               force: bool = False, protocol: str = "aug") -> float | None:
    """The paper's mIoU for this setting, or None when no table of the paper has it.

    ``ablation``: the report is an ablation table (presets beyond SupOnly and the full method), so at
    Table 3's setting its numbers are used (its SupOnly, 64.7, differs from Table 1's 68.3).
    ``force``: compare with Table 3 / Table 1 (VOC, DeepLabv3+ ResNet-50) whatever the run's setting.
    ``protocol``: VOC's ``dataset.protocol``; classic at split full with DeepLabv3+ is Table 5's setting.
    """
    if force:
        dataset, segnet, backbone = "voc", "deeplabv3plus", "resnet50"
    ds = paper_dataset(dataset)
    if ds is None:
        return None
    if ds == "voc" and protocol == "classic" and split == "full" and segnet == "deeplabv3plus" and \
            preset in ("ablation_viii", "weakly"):
        return TABLE5.get(backbone, {}).get(preset)
    if ds == "voc" and (ablation or preset not in ("suponly", "ablation_viii")) and \
            (ds, segnet, backbone, split) == TABLE3_SETTING:
        return TABLE3.get(preset)
    table = TABLE1 if ds == "voc" else TABLE2
    return table.get((segnet, backbone), {}).get(preset, {}).get(split)
