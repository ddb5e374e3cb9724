"""The model zoo: tiny, random-initialised models of many architectures, and the attacks run on them.

Every model takes images ``(B, 3, H, W)`` in [0, 1] and returns logits over :data:`CLASSES` classes; sequence models
read the image as a sequence (through a Conv1d or a patch embedding, or as ``H`` steps of ``3 * W`` values). Sizes are
chosen so the zoo runs in about a minute of CPU time, and so that a wrong kernel choice shows: on this stack a
``nn.Linear`` fed a non-foldable 3-D input (after ``transpose``) with ``out_features`` <= 11 and a batch >= 2 rounds
differently when its weight is frozen (``bmm`` on an expanded weight instead of ``mm`` on a folded copy), and
``nn.TransformerEncoderLayer``'s fused fast path is taken when nothing requires grad. :attr:`Entry.trap` names the
kernel choice that depends on ``requires_grad`` in the models where the paper's freeze-everything one-liner changes
the logits or the input gradient.

Left out: torchvision's Inception v3 (needs >= 75 px and has 24M parameters) and VGG (its classifier is fixed at
25088 -> 4096 -> 4096: 120M parameters at any input size). AlexNet (57M, 63 px) is in, the slowest entry.

``tests/test_zoo.py`` checks sbpatch's contract on every model; ``benchmarks/zoo.py`` times them. Nothing is
downloaded; timm and transformers are needed only for their entries (:func:`available`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn

CLASSES = 10


@dataclass(frozen=True)
class Entry:
    """One zoo model: ``make()`` builds it (random init, the caller seeds), inputs are ``(B, *shape)``."""

    name: str
    family: str  # torchvision / timm / torch.nn / transformers
    make: Callable[[], nn.Module]
    shape: tuple[int, int, int] = (3, 16, 16)
    trap: str = ""  # the kernel choice that depends on requires_grad here; empty when the one-liner changes nothing
    requires: str = ""  # the optional package it needs

    @property
    def sensitive(self) -> bool:
        """The one-liner changes this model's logits or input gradient (so the zoo can catch a wrong freeze)."""
        return bool(self.trap)


# --- models written here ------------------------------------------------------------------------------------------


class Conv1dFrames(nn.Module):
    """A per-frame classifier: Conv1d over time, then ``nn.Linear`` on ``h.transpose(1, 2)`` (non-foldable input)."""

    def __init__(self, channels: int = 48, hidden: int = 64) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, hidden, 3, padding=1)
        self.frames = nn.Linear(hidden, CLASSES)  # fed (B, T, hidden) with strides of a transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.flatten(1, 2)))  # (B, 3*H, W): rows x channels as features, columns as time
        return self.frames(h.transpose(1, 2)).mean(1)


def _weight_norm_frames() -> nn.Module:
    """:class:`Conv1dFrames` whose frame classifier is weight-normalised (its weight computed from two originals)."""
    model = Conv1dFrames()
    model.frames = nn.utils.parametrizations.weight_norm(model.frames)
    return model


class Encoder(nn.Module):
    """Patch embedding, ``nn.TransformerEncoder`` (``batch_first`` either way, dropout on), mean pool, head."""

    def __init__(self, batch_first: bool, dim: int = 16, patch: int = 4) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Conv2d(3, dim, patch, patch)
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, dim), not contiguous
        if not self.batch_first:
            h = h.transpose(0, 1)
        h = self.encoder(h)
        return self.head(h.mean(1 if self.batch_first else 0))


class Recurrent(nn.Module):
    """A 2-layer LSTM, or a bidirectional 2-layer GRU, both ``batch_first``; head on the last time step.

    The image is read in memory order, ``3 * W`` values per time step (a reshape, so input gradients stay
    contiguous: torchattacks' L2 attacks ``view`` them).
    """

    def __init__(self, kind: str, width: int = 16, hidden: int = 16) -> None:
        super().__init__()
        bidirectional = kind == "gru"
        rnn = nn.GRU if bidirectional else nn.LSTM
        self.rnn = rnn(3 * width, hidden, num_layers=2, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x.flatten(1).unflatten(1, (x.shape[2], -1)))  # (B, H, 3*W)
        return self.head(out[:, -1])


class Bert(nn.Module):
    """HF ``BertForSequenceClassification`` from a tiny config, fed the image as ``inputs_embeds`` (read as in
    :class:`Recurrent`: ``H`` tokens of ``3 * W`` values)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            hidden_size=3 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            vocab_size=8,
            num_labels=CLASSES,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bert(inputs_embeds=x.flatten(1).unflatten(1, (x.shape[2], -1))).logits


# --- torchvision ----------------------------------------------------------------------------------------------------


def _tv() -> Any:
    import torchvision

    return torchvision.models


def _resnet(block: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        m = _tv()
        return m.ResNet(getattr(m.resnet, block), [1, 1, 1, 1], num_classes=CLASSES, **kw)

    return make


def _densenet() -> nn.Module:
    return _tv().DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, bn_size=2,
                          num_classes=CLASSES)


def _mobilenet_v2() -> nn.Module:
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 1, 2], [6, 64, 1, 2]]
    return _tv().MobileNetV2(CLASSES, width_mult=0.5, inverted_residual_setting=setting)


def _mobilenet_v3(arch: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torchvision.models import mobilenetv3

        setting, last = mobilenetv3._mobilenet_v3_conf(arch, width_mult=0.25)
        return mobilenetv3.MobileNetV3(setting[:5], last // 4, num_classes=CLASSES)

    return make


def _efficientnet_v1() -> nn.Module:
    from torchvision.models import efficientnet

    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.25)
    return efficientnet.EfficientNet(setting, 0.2, num_classes=CLASSES, last_channel=last)


def _efficientnet_v2() -> nn.Module:
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

    setting = [
        FusedMBConvConfig(1, 3, 1, 8, 8, 1),
        FusedMBConvConfig(4, 3, 2, 8, 16, 1),
        MBConvConfig(4, 3, 2, 16, 24, 1),
        MBConvConfig(6, 3, 2, 24, 32, 1),
    ]
    return EfficientNet(setting, 0.2, num_classes=CLASSES, last_channel=64)


def _regnet() -> nn.Module:
    from torchvision.models.regnet import BlockParams, RegNet

    params = BlockParams.from_init_params(depth=3, w_0=8, w_a=8.0, w_m=2.0, group_width=8, se_ratio=0.25)
    return RegNet(params, num_classes=CLASSES)


def _convnext() -> nn.Module:
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], layer_scale=0.5, num_classes=CLASSES)


def _swin(v2: bool) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torchvision.models import swin_transformer as sw

        extra = {"block": sw.SwinTransformerBlockV2, "downsample_layer": sw.PatchMergingV2} if v2 else {}
        return sw.SwinTransformer([2, 2], 16, [1, 1], [2, 2], [4, 4], num_classes=CLASSES, **extra)

    return make


def _maxvit() -> nn.Module:
    return _tv().MaxVit(input_size=(16, 16), stem_channels=8, partition_size=2, block_channels=[16, 32],
                        block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=CLASSES)


def _vit() -> nn.Module:
    return _tv().VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                   mlp_dim=32, num_classes=CLASSES)


def _simple(name: str, *args: Any, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(_tv(), name)(*args, num_classes=CLASSES, **kw)


# --- timm -----------------------------------------------------------------------------------------------------------


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kw)

    return make


def _mixer(kind: str, img: int, patch: int, **kw: Any) -> Callable[[], nn.Module]:
    """timm's ``MlpMixer`` configured as MLP-Mixer, ResMLP or gMLP (the layers timm's registered variants use)."""

    def make() -> nn.Module:
        from timm.layers import GatedMlp
        from timm.models import mlp_mixer as mm

        layers = {
            "mixer": {},
            "resmlp": {"block_layer": partial(mm.ResBlock, init_values=0.5), "norm_layer": mm.Affine, "mlp_ratio": 0.5},
            "gmlp": {"block_layer": mm.SpatialGatingBlock, "mlp_layer": GatedMlp, "mlp_ratio": 6},
        }[kind]
        return mm.MlpMixer(CLASSES, img_size=img, patch_size=patch, num_blocks=2, **layers, **kw)

    return make


_MHA = "attention in-projection on a transposed query; fused fast path when nothing requires grad"
ENTRIES: tuple[Entry, ...] = (
    # torchvision classification families, tiny widths/depths where the constructor allows
    Entry("resnet", "torchvision", _resnet("BasicBlock")),
    Entry("wide_resnet", "torchvision", _resnet("Bottleneck", width_per_group=128)),
    Entry("resnext", "torchvision", _resnet("Bottleneck", groups=4, width_per_group=4)),
    Entry("densenet", "torchvision", _densenet, shape=(3, 32, 32)),
    Entry("mobilenet_v2", "torchvision", _mobilenet_v2),
    Entry("mobilenet_v3_small", "torchvision", _mobilenet_v3("mobilenet_v3_small")),
    Entry("mobilenet_v3_large", "torchvision", _mobilenet_v3("mobilenet_v3_large")),
    Entry("efficientnet", "torchvision", _efficientnet_v1),
    Entry("efficientnet_v2", "torchvision", _efficientnet_v2),
    Entry("regnet", "torchvision", _regnet),
    Entry("convnext", "torchvision", _convnext),
    Entry("swin", "torchvision", _swin(False)),
    Entry("swin_v2", "torchvision", _swin(True)),
    Entry("maxvit", "torchvision", _maxvit),
    Entry("vit", "torchvision", _vit, trap=_MHA),
    Entry("squeezenet", "torchvision", _simple("SqueezeNet", "1_1"), shape=(3, 32, 32)),
    Entry("shufflenet_v2", "torchvision", _simple("ShuffleNetV2", [1, 1, 1], [8, 16, 32, 64, 128])),
    Entry("mnasnet", "torchvision", _simple("MNASNet", 0.25)),
    Entry("googlenet", "torchvision", _simple("GoogLeNet", aux_logits=False, init_weights=False), shape=(3, 32, 32)),
    Entry("alexnet", "torchvision", _simple("AlexNet"), shape=(3, 63, 63)),
    # timm, tiny configurations
    Entry("timm_mixer", "timm", _mixer("mixer", 16, 2, embed_dim=16), trap="token-mixing Linear on a transposed input",
          requires="timm"),
    Entry("timm_resmlp", "timm", _mixer("resmlp", 12, 4, embed_dim=16), (3, 12, 12),
          "channel MLP on the transposed patch embedding (Affine keeps its strides)", "timm"),
    Entry("timm_gmlp", "timm", _mixer("gmlp", 12, 4, embed_dim=16), (3, 12, 12),
          "spatial-gating Linear on a transposed input", "timm"),
    Entry("timm_vit", "timm", _timm("test_vit", img_size=16, patch_size=4), requires="timm"),
    Entry("timm_swin", "timm", _timm("swin_tiny_patch4_window7_224", img_size=16, window_size=4, embed_dim=16,
                                      depths=(1, 1), num_heads=(2, 2)), requires="timm"),
    Entry("timm_convnext", "timm", _timm("test_convnext", ls_init_value=0.5), shape=(3, 32, 32), requires="timm"),
    Entry("timm_efficientnet", "timm", _timm("test_efficientnet"), requires="timm"),
    # BEiT's learned relative-position bias is SDPA's attention mask (flash vs math kernel): the one-liner changes its
    # logits by ~1e-7 but no zoo attack's output at these sizes, so it is not marked sensitive (test_freeze.py's
    # RelPosAttention proves the rule).
    Entry("timm_beit", "timm", _timm("beit_base_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1,
                                      num_heads=2), requires="timm"),
    Entry("timm_vit_relpos", "timm", _timm("vit_relpos_small_patch16_224", img_size=16, patch_size=4, embed_dim=16,
                                            depth=1, num_heads=2), requires="timm"),
    # torch.nn sequence models and HF BERT, reading the image as a sequence
    Entry("conv1d_linear", "torch.nn", Conv1dFrames, trap="Linear on h.transpose(1, 2)"),
    Entry("conv1d_weight_norm", "torch.nn", _weight_norm_frames,
          trap="weight-normalised Linear on h.transpose(1, 2): its weight's originals decide the fold"),
    Entry("encoder_batch_first", "torch.nn", lambda: Encoder(True), trap=_MHA),
    Entry("encoder_seq_first", "torch.nn", lambda: Encoder(False),
          trap="attention in-projection fed a non-contiguous (N, B, d) input"),
    Entry("lstm", "torch.nn", lambda: Recurrent("lstm")),
    Entry("gru", "torch.nn", lambda: Recurrent("gru"),
          trap="nn.GRU's CPU path applies weight_ih_l0 with at::linear to the transposed batch_first sequence"),
    Entry("bert", "transformers", Bert, requires="transformers"),
)
ZOO: dict[str, Entry] = {e.name: e for e in ENTRIES}


def available(name: str) -> bool:
    """Whether the package the entry needs is installed."""
    req = ZOO[name].requires
    return not req or importlib.util.find_spec(req) is not None


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo model ``name``, random-initialised from ``seed``, in eval mode.

    The constructors' own initialisation, except ``nn.Linear`` weights they set to zero or near zero (classification
    heads of torchvision's ViT and timm's MLP-Mixer, gMLP's gate projection): those are drawn again from
    N(0, 1/in_features), else logits or input gradients are constant and no kernel difference can show.
    """
    torch.manual_seed(seed)
    model = ZOO[name].make().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.abs().max() < 1e-3:
                m.weight.normal_(0, m.in_features**-0.5)
    return model


def inputs(name: str, batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] of the entry's shape and random labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, *ZOO[name].shape, generator=g), torch.randint(0, CLASSES, (batch,), generator=g)


# --- attacks ----------------------------------------------------------------------------------------------------------

AttackBuilder = Callable[..., Callable[[], Any]]


@dataclass(frozen=True)
class Attack:
    """One attack run on the zoo: ``build(model, x, y, train=False, steps=2)`` returns a zero-argument call of it.

    ``gradient``: how the library asks for the input gradient (``"backward()"``, ``"autograd.grad"``) or
    ``"query-only"``. ``train=True`` runs the model in train mode (dropout and batch norm active; torchattacks is told
    so, the other libraries leave the model's mode alone).
    """

    name: str
    library: str
    gradient: str
    build: AttackBuilder
    train: bool = True  # also run in train mode (DeepFool attacks one image at a time: batch norm cannot train)


def _args(kw: dict[str, Any], steps: int) -> dict[str, Any]:
    return {k: steps if v == "steps" else v for k, v in kw.items()}


def _torchattacks(cls_name: str, **kw: Any) -> AttackBuilder:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool = False, steps: int = 2) -> Any:
        import torchattacks

        attack = getattr(torchattacks, cls_name)(model, **_args(kw, steps))
        if train:  # torchattacks puts the model in eval mode for the attack unless told otherwise
            attack.set_model_training_mode(model_training=True, batchnorm_training=True, dropout_training=True)
        return lambda: attack(x, y)

    return build


def _foolbox(cls_name: str, epsilon: float, **kw: Any) -> AttackBuilder:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool = False, steps: int = 2) -> Any:
        import warnings

        import foolbox

        with warnings.catch_warnings():  # "the PyTorch model is in training mode": on purpose in train mode
            warnings.simplefilter("ignore", UserWarning)
            fmodel = foolbox.PyTorchModel(model, bounds=(0, 1), device=x.device)
        attack = getattr(foolbox.attacks, cls_name)(**_args(kw, steps))
        return lambda: attack(fmodel, x, y, epsilons=epsilon)

    return build


def _advertorch(cls_name: str, **kw: Any) -> AttackBuilder:
    def build(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool = False, steps: int = 2) -> Any:
        import advertorch.attacks

        attack = getattr(advertorch.attacks, cls_name)(model, **_args(kw, steps))
        return lambda: attack.perturb(x, y)

    return build


ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        Attack("torchattacks PGD", "torchattacks", "autograd.grad",
               _torchattacks("PGD", eps=8 / 255, alpha=2 / 255, steps="steps")),
        Attack("torchattacks PGDL2", "torchattacks", "autograd.grad",
               _torchattacks("PGDL2", eps=0.5, alpha=0.1, steps="steps")),
        Attack("torchattacks CW", "torchattacks", "backward()", _torchattacks("CW", c=1.0, steps="steps", lr=0.01)),
        Attack("torchattacks DeepFool", "torchattacks", "backward()", _torchattacks("DeepFool", steps="steps"),
               train=False),
        Attack("torchattacks SPSA", "torchattacks", "query-only",
               _torchattacks("SPSA", eps=8 / 255, delta=0.01, lr=0.01, nb_iter="steps", nb_sample=8,
                             max_batch_size=16)),
        Attack("foolbox L2PGD", "foolbox", "backward()",
               _foolbox("L2ProjectedGradientDescentAttack", 0.5, steps="steps")),
        Attack("advertorch SPSA", "advertorch", "query-only",
               _advertorch("LinfSPSAAttack", eps=8 / 255, nb_iter="steps", nb_sample=8, max_batch_size=16)),
    )
}
