"""Structured configs: one dataclass per Hydra config group, validated when the job starts.

Enum fields make OmegaConf reject a wrong value at composition time with a message that names the
key and the allowed values (``Invalid value 'foo', expected one of [deeplabv3plus, pspnet]
full_key: segnet.name``). Cross-field rules that a type cannot express live in :func:`validate`.
"""

from __future__ import annotations

import re

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional, TypeVar

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, OmegaConf
from omegaconf.errors import InterpolationResolutionError


class Choice(Enum):
    """An option of a config key; prints as its bare name (so ``${dataset.name}`` interpolates to ``digits``)."""

    def __str__(self) -> str:
        return self.name


class DatasetName(Choice):
    digits = "digits"
    voc = "voc"
    cityscapes = "cityscapes"
    folder = "folder"  # your own images and masks (dcc/data/folder.py)


class VocProtocol(Choice):
    aug = "aug"  # labeled images drawn from the 10,582 augmented set (SegmentationClassAug labels)
    classic = "classic"  # labeled images drawn from the 1,464 fine train set, the other 9,118 unlabeled


class ImageLabelSource(Choice):
    masks = "masks"  # the foreground classes present in each image's segmentation mask (VOC: SegmentationClassAug)
    xml = "xml"  # VOC only: the object classes of Annotations/<id>.xml


class EvalMode(Choice):
    whole = "whole"  # native resolution, reflect-padded bottom-right to a multiple of eval.pad_multiple
    slide = "slide"  # sliding window of eval.crop_size at eval.stride, logits averaged where windows overlap


class SegNetName(Choice):
    deeplabv3plus = "deeplabv3plus"
    pspnet = "pspnet"


class Method(Choice):
    suponly = "suponly"  # L = L_ce
    st = "st"  # offline self-training: teacher -> pseudo-labels -> retrain
    cac = "cac"  # L = L_ce + lambda * L_dc (or the L2 alignment of row I)


class OptimName(Choice):
    sgd = "sgd"
    adamw = "adamw"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class ViewBN(Choice):
    per_view = "per_view"  # each unlabeled view normalised with its own BN statistics, as the authors' separate calls
    shared = "shared"  # BN statistics over both views (2B crops): not the authors' step


class DistBackend(Choice):
    auto = "auto"  # nccl on GPUs, gloo on CPU
    nccl = "nccl"
    gloo = "gloo"


class Task(Choice):
    train = "train"
    summary = "summary"
    predict = "predict"


class LoggerName(Choice):
    mlflow = "mlflow"
    none = "none"


class CheckpointLog(Choice):
    """What of the final checkpoint goes to MLflow (the run directory always keeps the full one)."""

    off = "off"  # nothing
    weights = "weights"  # the model weights only (checkpoint/model.pt; what task=predict needs)
    full = "full"  # last.pt with the optimizer, scheduler, bank and RNG state (about 3x the weights with AdamW)


# trainer.resume: what a run does with what its run directory already holds (see dcc/engine/resume.py).
RESUME_CHOICES = ("auto", "true", "restart", "false")

# Config keys (and groups) that do not change what a run computes: left out of the run directory's hash
# and never a column of a report.
RESULT_NEUTRAL_KEYS = (
    "task", "predict", "preset", "preset_for", "logger", "dataset/root", "trainer/resume", "trainer/num_workers",
    "trainer/progress", "trainer/log_every", "trainer/checkpoint_every", "trainer/eval_every", "trainer/eval_batch_size",
    "trainer/num_vis", "trainer/device", "trainer/runs_root", "trainer/threads",
    # The number of processes does not change what is computed, by design: the total batch, the data stream
    # and its augmentation, the loss normalisation and the negative bank are those of one process (see
    # dcc/distributed.py), so a run may resume on another number of GPUs from the same directory.
    "trainer/devices", "trainer/nodes", "trainer/dist_backend",
)


def result_neutral(key: str) -> bool:
    """Whether a flattened config key (``trainer/log_every``) is, or lies under, one of :data:`RESULT_NEUTRAL_KEYS`."""
    return any(key == p or key.startswith(p + "/") for p in RESULT_NEUTRAL_KEYS)


E = TypeVar("E", bound=Enum)


def plain(node: Any) -> dict[str, Any]:
    """A config mapping as plain Python (lists stay lists): what timm's keyword arguments need."""
    return dict(OmegaConf.to_container(node, resolve=True)) if OmegaConf.is_config(node) else dict(node or {})


def choice(value: Any, enum: type[E]) -> E:
    """A config value as its enum member, whether OmegaConf gives the member or its name (``Method.cac``, ``"cac"``)."""
    return value if isinstance(value, enum) else enum[str(getattr(value, "name", value))]


@dataclass
class PretrainConfig:
    """The embedded dataset's stand-in for ImageNet (dcc/data/digits_pretrain.py): the backbone learns digit
    classification on the pretraining pool before the first run; cached, keyed by these values."""

    steps: int = 0  # 0: no pretraining (random init, or backbone.weights)
    batch_size: int = 64
    lr: float = 3.0e-3
    num_images: int = 8000  # single-digit images rendered from the pretraining pool
    image_size: int = 48
    digit_size: list[int] = field(default_factory=lambda: [24, 40])


@dataclass
class ScenesConfig:
    """Generator of the embedded digits dataset (ignored by real datasets): MNIST digits on textured scenes."""

    num_train: int = 2000
    num_val: int = 300
    # held-out test scenes, evaluated once at the end of a run (test/miou); digits from the held-out pool that no
    # validation scene uses (dcc/data/digits.py); 0: no test split
    num_test: int = 600
    image_size: int = 64
    digits_per_image: list[int] = field(default_factory=lambda: [1, 3])
    digit_size: list[int] = field(default_factory=lambda: [24, 40])
    stroke: int = 3  # grey dilation of each 28x28 digit (1: MNIST's own strokes)
    max_overlap: float = 0.25  # largest share of an earlier digit's box a new digit may cover
    seed: int = 0  # scenes and the disjoint digit pools
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


@dataclass
class DatasetConfig:
    name: DatasetName = DatasetName.digits
    root: Optional[str] = "${oc.env:DCC_CACHE,${oc.env:HOME,.}/.cache/dcc}"
    num_classes: int = 11
    ignore_index: int = 255
    class_names: list[str] = field(default_factory=list)  # per-class IoU names (default: the class index)
    protocol: VocProtocol = VocProtocol.aug  # voc only
    # Published labeled counts per split name (the fractions do not round consistently: VOC 1/4 = 2,645),
    # used when the pool that labeled images are drawn from has split_pool_size images (else split.fraction).
    split_sizes: dict[str, int] = field(default_factory=dict)
    split_pool_size: Optional[int] = None
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    base_size: int = 400  # long side before the random scale
    crop_size: int = 320
    labeled_scale: list[float] = field(default_factory=lambda: [0.5, 2.0])
    unlabeled_scale: list[float] = field(default_factory=lambda: [0.8, 2.0])
    iou_range: list[float] = field(default_factory=lambda: [0.1, 1.0])
    flip: bool = True
    color_jitter_p: float = 0.0  # labeled images (Cityscapes: 1.0)
    unlabeled_color_jitter_p: float = 0.8
    unlabeled_grayscale_p: float = 0.2
    unlabeled_blur_p: float = 0.5
    blur_kernel: int = 5
    # Image-level labels of the unlabeled images (the weakly-supervised setting, Table 5): the foreground
    # classes present in each image. On by default exactly when loss.weak=true; voc and digits only.
    image_labels: bool = II("loss.weak")
    image_label_source: ImageLabelSource = ImageLabelSource.masks
    scenes: ScenesConfig = field(default_factory=ScenesConfig)


@dataclass
class SplitConfig:
    name: str = MISSING  # 1_16, 1_8, 1_4, full
    fraction: float = MISSING  # share of the training images that keep their labels
    # which images keep their labels; follows trainer.seed, so that a replicate (trainer.seed=r) varies the labeled
    # subset with the training seed (ignored with split.labeled_list, a fixed subset)
    seed: int = II("trainer.seed")
    index: int = 0  # which of the random lists drawn with this seed (the authors published three per split)
    labeled_list: Optional[str] = None  # list file of the labeled images (authors' pairs or bare ids)
    unlabeled_list: Optional[str] = None  # list file of the unlabeled images (default: every other image)


@dataclass
class EvalConfig:
    mode: EvalMode = EvalMode.whole
    pad_multiple: int = 8  # whole: pad to a multiple of the output stride
    crop_size: int = 512  # slide: window side
    stride: int = 341  # slide: step between windows


@dataclass
class PredictConfig:
    checkpoint: Optional[str] = None  # a run's last.pt (or any file with a "model" state dict)
    input: Optional[str] = None  # folder of images; null: the validation set
    output: str = "predictions"  # folder for the palette PNGs (relative to the launch directory)


@dataclass
class SegNetConfig:
    name: SegNetName = SegNetName.deeplabv3plus
    output_stride: int = 16  # backbone output stride
    channels: int = 256  # width of the decoder / PPM output fed to classifier and projector
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    multi_grid: list[int] = field(default_factory=lambda: [1, 2, 4])
    low_level_channels: int = 48
    bins: list[int] = field(default_factory=lambda: [1, 2, 3, 6])
    dropout: float = 0.5  # inside ASPP / decoder
    classifier_dropout: float = 0.1
    consistency_stride: int = 8  # stride of the features that enter the consistency loss
    # align_corners of every bilinear resize in the network (ASPP pooling, decoder, PSP bins, logits; used by
    # training, evaluation and prediction alike). true: the authors' code; false: torch's default
    align_corners: bool = True


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # any timm model that supports features_only
    weights: Optional[str] = None  # local torchvision- or timm-format state dict
    pretrained: bool = False  # load timm's own weights from its local cache
    allow_download: bool = False  # let timm download them when they are not cached
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    # ViT only (dcc/method/models/vit.py): transformer blocks feeding the feature pyramid; [] = the last block for
    # every level, [b] = block b for every level, [b_low, b_high] = the stride-4 level from b_low, the rest from b_high
    vit_blocks: list[int] = field(default_factory=list)


@dataclass
class LossConfig:
    preset: str = "ablation_viii"
    method: Method = Method.cac
    proj: bool = True  # non-linear projector Phi
    context: bool = True  # two different overlapping crops (else the same crop twice)
    cl: bool = True  # contrastive loss (else L2 alignment of the positive pair, row I)
    dir: bool = True  # directional mask, Eq. 2
    ns: bool = True  # negative sampling, Eq. 5
    pf: bool = True  # positive filtering, Eq. 7
    weight: float = 0.1  # lambda
    temperature: float = 0.1  # tau
    pos_threshold: float = 0.75  # gamma
    start_step: int = 5785  # 5 epochs x 1157 iterations
    selected_num: int = 12800  # negatives sampled per view per step, in total over processes (VOC: every cell of 8 crops)
    bank_steps: int = 1  # FIFO bank keeps the current step and this many previous ones
    proj_dim: int = 128
    weak: bool = False  # Eq. 10-11: the image-level classifier C_w on both unlabeled views (needs image labels)
    weak_weight: float = 0.4  # lambda_w (the authors' unused flag defaulted to 0.4)
    teacher_checkpoint: Optional[str] = None  # st: skip the teacher phase
    st_threshold: float = 0.0  # st: pseudo-labels below this confidence are ignored (rule: conf/loss/st.yaml)
    # st: the pseudo-labeled images get the photometric augmentation of CAC's unlabeled views (dataset.unlabeled_*)
    st_unlabeled_aug: bool = False


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1
    poly_power: float = 0.9


@dataclass
class TrainerConfig:
    """The authors' schedule (80 epochs x 1157 iterations, batch 8 + 8); experiment presets (digits_cpu) and
    profiles shorten it. (No conf/trainer/ group: these defaults are the trainer's config.)"""

    max_steps: int = 92560
    batch_size: int = 8  # labeled images per step (total over devices: each of N processes takes 1/N)
    unlabeled_batch_size: int = 8  # unlabeled pairs per step (total over devices)
    num_workers: int = 2
    eval_every: int = 1157
    eval_batch_size: int = 1
    log_every: int = 20
    checkpoint_every: int = 1157
    # auto: continue a checkpoint found in the run directory, report a finished run without training again;
    # true: the same, and say so when there is no checkpoint; restart (or false): move the previous run
    # aside (run directory renamed, never deleted) and start from step 0.
    resume: str = "auto"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under several processes: cuda:LOCAL_RANK)
    devices: int = 1  # processes (GPUs) per machine; > 1: data-parallel training, see dcc/distributed.py
    nodes: int = 1  # machines (a launcher must start the processes on each: hydra/launcher=slurm, torchrun)
    dist_backend: DistBackend = DistBackend.auto  # torch.distributed backend: auto (nccl on GPUs, gloo on CPU)
    precision: Precision = Precision.fp32  # fp32 | bf16 (autocast) | fp16 (autocast + GradScaler)
    channels_last: bool = False  # NHWC memory format (faster convolutions on recent GPUs)
    compile: bool = False  # torch.compile the backbone and the head
    view_bn: ViewBN = ViewBN.per_view  # CAC: BN statistics of the two unlabeled views (see dcc/method/consistency.py)
    diagnostics: bool = True  # CAC: log diag/ figures of the consistency branch (dcc/method/diagnostics.py); off with logger=none
    threads: Optional[int] = None  # torch intra-op threads (None: torch's default)
    runs_root: str = "runs"  # run directories live under <launch dir>/<runs_root>/
    progress: bool = True
    num_vis: int = 8  # validation images in the prediction grid


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.mlflow
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<launch dir>/mlflow.db
    experiment: str = "${dataset.name}"
    log_checkpoint: CheckpointLog = CheckpointLog.weights  # off | weights (model only) | full (last.pt)


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    segnet: SegNetConfig = field(default_factory=SegNetConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    task: Task = Task.train
    preset: str = "none"  # the experiment preset's name (conf/experiment/<name>.yaml sets it); not hashed
    preset_for: list[str] = field(default_factory=list)  # the datasets the preset is made for ([]: any); not hashed


def register_configs() -> None:
    """Register the schema that types every group (conf/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="config_schema", node=Config)


def _folder_classes(root: Optional[str], what: str) -> Any:
    from dcc.data.folder import classes_resolver

    return classes_resolver(root, what)


# conf/dataset/folder.yaml: dataset.num_classes / class_names = ${dcc_folder_classes:${dataset.root},count|names}.
# Registered on import, so that any process that reads a config (spawned ranks, SLURM jobs) resolves it.
OmegaConf.register_new_resolver("dcc_folder_classes", _folder_classes, replace=True)


def _folder_experiment(root: Optional[str]) -> str:
    from dcc.data.folder import experiment_name

    return experiment_name(root)


# conf/dataset/folder.yaml: logger.experiment = ${dcc_folder_experiment:${dataset.root}} (folder-<root's name>).
OmegaConf.register_new_resolver("dcc_folder_experiment", _folder_experiment, replace=True)


class ConfigError(ValueError):
    """A combination of options that means nothing; raised before any data is loaded."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: Any) -> None:
    """Cross-field rules, group by group. ``cfg`` is the composed DictConfig (or a :class:`Config`)."""
    method = choice(cfg.loss.method, Method)
    dataset = choice(cfg.dataset.name, DatasetName)
    made_for = list(getattr(cfg, "preset_for", None) or [])
    _check(not made_for or dataset.name in made_for,
           f"dataset={dataset.name} with experiment={cfg.preset} (conf/experiment/{cfg.preset}.yaml, made for "
           f"dataset={','.join(made_for)}; without experiment=, the preset is the default of conf/config.yaml): add "
           "experiment=none (the dataset with the entry config's groups) or a paper setting "
           "(experiment=voc_deeplabv3plus_r50, cityscapes_deeplabv3plus_r50, ...)")
    _validate_loss(cfg.loss, method, cfg.dataset)
    _validate_split(cfg.split)
    _validate_trainer(cfg.trainer, method)
    _validate_dataset(cfg.dataset)
    _validate_eval(cfg.eval)
    if choice(cfg.task, Task) is Task.predict:
        _check(cfg.predict.checkpoint is not None, "task=predict needs predict.checkpoint=PATH (a run's last.pt)")
    _validate_network(cfg.segnet, cfg.backbone, cfg.dataset)


def _validate_loss(loss: Any, method: Method, ds: Any) -> None:
    switches = ("proj", "context", "cl", "dir", "ns", "pf")
    if method is not Method.cac:
        on = [s for s in switches if loss[s]]
        _check(
            not on,
            f"loss.method={method.name} has no consistency branch, so "
            + ", ".join(f"loss.{s}=true" for s in on)
            + " means nothing: set them to false or use loss.method=cac",
        )
    else:
        for s in ("dir", "ns", "pf"):
            _check(
                loss.cl or not loss[s],
                f"loss.{s}=true needs the contrastive loss (loss.cl=true): without it the positive pair is "
                f"aligned with an L2 loss (ablation row I), which has no directional mask, negatives or positive filter",
            )
    _check(loss.weight >= 0, f"loss.weight (lambda) must be >= 0, got {loss.weight}")
    _check(loss.temperature > 0, f"loss.temperature (tau) must be > 0, got {loss.temperature}")
    _check(0.0 <= loss.pos_threshold < 1.0, f"loss.pos_threshold (gamma) must be in [0, 1), got {loss.pos_threshold}")
    _check(loss.weak_weight >= 0, f"loss.weak_weight (lambda_w) must be >= 0, got {loss.weak_weight}")
    if loss.weak:
        _check(method is Method.cac,
               f"loss.weak=true adds C_w to CAC's unlabeled branch (Eq. 10): it needs loss.method=cac, got {method.name}")
        _check(bool(ds.image_labels),
               "loss.weak=true needs image-level labels of the unlabeled images: set dataset.image_labels=true")
    _check(loss.selected_num > 0, f"loss.selected_num must be > 0, got {loss.selected_num}")
    _check(loss.bank_steps >= 0, f"loss.bank_steps must be >= 0, got {loss.bank_steps}")
    _check(loss.start_step >= 0, f"loss.start_step must be >= 0, got {loss.start_step}")
    _check(0.0 <= loss.st_threshold < 1.0, f"loss.st_threshold must be in [0, 1), got {loss.st_threshold}")


def _validate_split(split: Any) -> None:
    _check(0.0 < split.fraction <= 1.0, f"split.fraction must be in (0, 1], got {split.fraction}")
    _check(split.index >= 0, f"split.index must be >= 0, got {split.index}")
    _check(
        split.unlabeled_list is None or split.labeled_list is not None,
        "split.unlabeled_list needs split.labeled_list (the unlabeled images are otherwise every image not labeled)",
    )


def _validate_trainer(tc: Any, method: Method) -> None:
    _check(
        str(tc.resume).lower() in RESUME_CHOICES,
        f"trainer.resume must be one of auto, true, restart (false = restart), got {tc.resume!r}",
    )
    _check(tc.max_steps > 0, f"trainer.max_steps must be > 0, got {tc.max_steps}")
    _check(tc.batch_size > 0, f"trainer.batch_size must be > 0, got {tc.batch_size}")
    for key in ("eval_every", "log_every", "checkpoint_every"):
        _check(tc[key] > 0, f"trainer.{key} must be > 0, got {tc[key]}")
    for key in ("devices", "nodes"):
        _check(tc[key] >= 1, f"trainer.{key} must be >= 1, got {tc[key]}")
    procs = tc.devices * tc.nodes
    batches = ("batch_size",) if method is Method.suponly else ("batch_size", "unlabeled_batch_size")
    for key in batches:
        _check(
            tc[key] % procs == 0,
            f"trainer.{key}={tc[key]} is the total over all processes and must be divisible by "
            f"trainer.devices x trainer.nodes = {procs} (each process takes an equal share)",
        )


def _validate_dataset(ds: Any) -> None:
    dataset = choice(ds.name, DatasetName)
    protocol = choice(ds.protocol, VocProtocol)
    _check(
        dataset is DatasetName.voc or protocol is VocProtocol.aug,
        f"dataset.protocol={protocol.name} only exists for dataset=voc (got dataset={dataset.name})",
    )
    try:  # dataset=folder: interpolated from <root>/classes.txt
        ds.class_names, ds.num_classes
    except InterpolationResolutionError as exc:
        raise ConfigError(str(exc.__cause__ or exc)) from exc
    _check(
        not ds.class_names or len(ds.class_names) == ds.num_classes,
        f"dataset.class_names has {len(ds.class_names)} names but dataset.num_classes={ds.num_classes}",
    )
    source = choice(ds.image_label_source, ImageLabelSource)
    if ds.image_labels:
        _check(
            dataset in (DatasetName.voc, DatasetName.digits, DatasetName.folder),
            f"dataset.image_labels=true: dataset={dataset.name} has no image-level labels "
            "(available for voc, from its masks or XML annotations, for folder, from its masks, and for digits, "
            "the digits in each scene)",
        )
        _check(
            source is ImageLabelSource.masks or dataset is DatasetName.voc,
            f"dataset.image_label_source=xml reads VOC's Annotations/*.xml: it only exists for dataset=voc "
            f"(got dataset={dataset.name}; use masks)",
        )
    for name, size in ds.split_sizes.items():
        _check(size > 0, f"dataset.split_sizes.{name} must be > 0, got {size}")


def _validate_eval(ev: Any) -> None:
    mode = choice(ev.mode, EvalMode)
    _check(ev.pad_multiple > 0, f"eval.pad_multiple must be > 0, got {ev.pad_multiple}")
    if mode is EvalMode.slide:
        _check(ev.crop_size > 0 and ev.crop_size % ev.pad_multiple == 0,
               f"eval.crop_size={ev.crop_size} must be a positive multiple of eval.pad_multiple={ev.pad_multiple}")
        _check(0 < ev.stride <= ev.crop_size,
               f"eval.stride={ev.stride} must be in (0, eval.crop_size={ev.crop_size}] (windows must cover the image)")


def _validate_network(segnet: Any, backbone: Any, ds: Any) -> None:
    stride = segnet.consistency_stride
    _check(
        ds.crop_size % stride == 0,
        f"dataset.crop_size={ds.crop_size} must be a multiple of segnet.consistency_stride={stride} "
        "(the two crops' feature cells must align)",
    )
    lo, hi = ds.iou_range
    _check(0.0 <= lo <= hi <= 1.0, f"dataset.iou_range must satisfy 0 <= low <= high <= 1, got {list(ds.iou_range)}")
    seg = choice(segnet.name, SegNetName)
    _check(segnet.output_stride in (8, 16, 32), f"segnet.output_stride must be 8, 16 or 32, got {segnet.output_stride}")
    from dcc.method.models.backbone import check_backbone

    problem = check_backbone(backbone.name, output_stride=segnet.output_stride, segnet=seg.name,
                             kwargs=plain(backbone.kwargs), vit_blocks=list(backbone.vit_blocks))
    _check(problem is None, str(problem))
    if seg is SegNetName.pspnet:
        _check(
            segnet.consistency_stride == segnet.output_stride,
            "segnet=pspnet outputs features at the backbone stride: segnet.consistency_stride must equal "
            f"segnet.output_stride ({segnet.output_stride}), got {segnet.consistency_stride}",
        )
    else:
        _check(
            segnet.consistency_stride % 4 == 0,
            f"segnet.consistency_stride must be a multiple of the decoder stride 4, got {segnet.consistency_stride}",
        )


# Hydra's override grammar reads 1_8 as the integer 18 (Python-style digit separators), and a config
# group option must be a string; quote split names so that ``split=1_8`` and ``split=1_8,1_4`` work.
_SPLIT_OVERRIDE = re.compile(r"^(?P<key>[+~]{0,2}split)=(?P<value>.*)$")
_BARE_SPLIT = re.compile(r"(?<![\w'\".])(\d+_\d+)(?![\w'\".])")


def quote_split_value(value: str) -> str:
    """Every bare ``1_8`` of an override's value quoted (``1_8,1_4`` -> ``'1_8','1_4'``)."""
    return _BARE_SPLIT.sub(r"'\1'", value)


def quote_split_overrides(argv: list[str]) -> list[str]:
    """The command line's ``split=...`` overrides with their split names quoted."""
    out = []
    for arg in argv:
        m = _SPLIT_OVERRIDE.match(arg)
        out.append(m["key"] + "=" + quote_split_value(m["value"]) if m else arg)
    return out
