"""``caml``: Correlation-Aware Mutual Learning (Gao et al., MICCAI 2023), in 2-D.

Two sub-models with separate weights learn from the masks and from each other on every image:

* the **vanilla** model, ``self.build_unet()`` (MONAI ``UnetUpBlock``: transposed-convolution
  upsampling). It makes the predictions (segmentation, CAMs, presence).
* the **auxiliary** model (`AuxUNet`): the same U-Net, but its decoder upsamples by bilinear
  interpolation (a 1×1 convolution at the coarse level, which commutes with the interpolation,
  then the same convolution block as the vanilla decoder), and its encoder has **Cross-sample
  Mutual Attention** (`CrossSampleAttention`) after the level at stride ``cma_stride`` (8: the
  paper's 1/8 level; 16×16 tokens at 128 px). CMA is a transformer layer over the spatial tokens
  of each image (intra-sample), then one over the batch at each spatial position (inter-sample:
  the tokens of all images of the batch, labelled and unlabelled together, attend to each
  other); ``cma_heads`` heads, feed-forward 4× the width, ``cma_dropout``. Active in training
  only (identity in eval mode, also with MC dropout).

Losses (P_v, P_a: the softmax outputs; r(t) = ``sigmoid_rampup(progress / rampup)``):

* L_s: ``Method.supervised_losses`` of each sub-model on the labelled images (segmentation,
  presence, image class: the heads of both are trained), weighted ``sup_weight`` (the paper's 0.5):
  ``sup_weight * (L_s,v + L_s,a)``.
* L_c, sharpened cross pseudo-supervision on all images (``batch.image`` and
  ``batch.unlabelled``): S(P) = P^{1/T} / (P^{1/T} + (1 - P)^{1/T}) per channel (T =
  ``temperature``, 0.1) and L_c = MSE(P_v, S(P_a)) + MSE(P_a, S(P_v)) (`cross_sharpened_mse`);
  weight ``consistency * r(t)``.
* L_o, omni-correlation consistency (`correlation_ce`), weight ``occ_weight * r(t)``: on the
  unlabelled pixels where the two argmaxes agree, the ``occ_topk`` most confident (vanilla
  probability) per agreed class, each model's embedding q = prediction_head(projection_head(f))
  of its last decoder feature f is correlated with a memory bank of labelled pixel embeddings:
  C[j] = softmax_j(q · m_j / tau) over every bank entry m_j (tau 0.1). L_o = -mean_rows
  Σ_j C_a[j] log C_v[j]: the vanilla model's correlations follow the auxiliary model's.
* total: ``sup_weight (L_s,v + L_s,a) + consistency r L_c + occ_weight r L_o``.

The **memory bank** (buffers ``bank`` (K+1, ``bank_size``, D), ``bank_filled``, ``bank_next``: in
the state dict, so a resumed run is identical; emptied by ``start_new_run``) holds, per class
including background, embeddings of labelled pixels (full masks, scribbles, negative images'
all-background targets) that both models classify correctly: each training step draws up to
``bank_update`` such pixels per class at random and writes the mean of the two projection
heads' embeddings (eval-mode batch norm, no gradient) into that class's ring buffer: the newest
overwrite the oldest (`ring_write`). Every filled entry is used.

What is the paper's (from its code, Herschel555/CAML): the two decoders (3-D V-Nets: transposed
convolution vs trilinear interpolation); CMA's intra- then inter-sample layers after the 1/8
level, in training only; the sharpening with T = 0.1 and L_c on all images; the projection
(Linear C→2C, BN, ReLU, Linear) and prediction heads (the same shape) on pixel rows of the last
decoder feature; the bank of correctly predicted labelled pixels from the mean of the two
projections in eval-mode BN; the agreeing unlabelled pixels' top-k by the vanilla confidence;
the correlation's raw dot products with tau = 0.1; the loss weights 0.5 / 1.0 / 0.05 and the
sigmoid ramp-up; predicting with the vanilla model.

What is ours:

* ``detach_targets`` (default on): S(P) in L_c and C_a in L_o are constants. The paper's code
  lets gradients flow through them; through S(P) at T = 0.1 (dS/dP = 10 at P = 0.5) that pulls
  each model's sharpened output towards the other's raw one, i.e. towards *less* confidence,
  against the intent of sharpening; through C_a it would move the auxiliary heads towards the
  vanilla model's correlations. With detached targets the auxiliary projection/prediction heads
  get no gradient (fixed random projections; their batch norms still track statistics).
  ``detach_targets=False`` is the paper's behaviour.
* raw dot products kept (``occ_normalise=True``: cosine similarities instead): on the sample
  project (K = 4, 60 steps) the raw L_o fell from 6.9 to 2.7 with no sign of instability, while
  with cosine / 0.1 it stayed at about log E = 6.4 (E bank entries: near-uniform correlations,
  nothing to learn).
* CMA layers are pre-norm (``norm_first``), so the features passed on keep their scale and the
  identity used in eval mode stays close to the trained path (the auxiliary model also gives the
  uncertainty); the paper's are post-norm with dropout 0.5, ours use ``cma_dropout`` 0.1 like
  the U-Net.
* the heads run on the selected pixel rows only (the code runs them on every agreeing pixel
  before the top-k, so its batch-norm statistics differ); the bank is a per-class ring buffer
  instead of one slot per labelled volume sampled down to 256 per class.
* the supervised terms are the shared ones (CE + soft Dice + presence + image class) instead of
  binary Dice; ``Prediction.uncertainty`` is the disagreement of the two sub-models, the
  total-variation distance 0.5 Σ_c |p_v - p_a| (in [0, 1]).

Scaled down for a 2-core CPU: 2-D U-Nets (the model config's width, 4 levels) instead of 3-D
V-Nets; top-k 512 per class instead of 12,800; 64 new bank entries per class per step; the
ramp-up over ``rampup`` = 40 % of the run (the paper's 40 × 150 of 15,000 iterations at 4
labelled scans).

Cost: a step runs two U-Nets on the labelled and the unlabelled images (B + B/2) with the
auxiliary encoder's attention, the heads and the bank on a few thousand pixel rows: 3.1× the
floating-point operations of a ``supervised`` step (forward + backward, 128 px, 8 + 4 images,
default model; torch's ``FlopCounterMode``), about 3× its wall-clock time on the sample project.
While r(t) < ``skip_below`` (the first 9 % of a run with the defaults) the unlabelled images
are not passed and L_c, L_o are not computed (both models train on the labelled images and
fill the bank: 2.1×); in a project without maskless images L_c still runs on the labelled ones.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training_backend.config import METHOD_CATALOG
from training_backend.errors import InputError
from training_backend.learning.losses import sigmoid_rampup
from training_backend.learning.methods.base import Batch, Method, Prediction, register
from training_backend.learning.models import Encoder, ModelConfig, NetOutput, UNet, pad_to_multiple


# ----------------------------------------------------------------------------- networks
class CrossSampleAttention(nn.Module):
    """Cross-sample Mutual Attention: intra-sample then inter-sample transformer layers.

    Identity in eval mode. In training, a (B, C, h, w) map is read as B sequences of h·w
    tokens (intra: each image's positions attend to each other), then as h·w sequences of B
    tokens (inter: at each position, every image of the batch attends to the others).

    Args:
        dim: channels C (the tokens' width).
        heads: attention heads (reduced to the largest divisor of ``dim`` not above it).
        dropout: dropout of the attention and feed-forward outputs.
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        heads = max(h for h in range(1, max(1, heads) + 1) if dim % h == 0)

        def layer() -> nn.TransformerEncoderLayer:
            return nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)

        self.intra, self.inter = layer(), layer()

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, hw, C)
        tokens = self.intra(tokens)  # attention over the positions of each image
        tokens = self.inter(tokens.transpose(0, 1)).transpose(0, 1)  # (hw, B, C): over the batch
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, h, w)


class CMAEncoder(Encoder):
    """The U-Net `Encoder` with `CrossSampleAttention` after level ``cma_level``.

    Args:
        in_channels: image channels.
        cfg: architecture.
        cma_level: encoder level (stride ``2**cma_level``) whose output is attended.
        heads, dropout: see `CrossSampleAttention`.
    """

    def __init__(self, in_channels: int, cfg: ModelConfig, cma_level: int, heads: int, dropout: float):
        super().__init__(in_channels, cfg)
        self.cma_level = cma_level
        self.cma = CrossSampleAttention(cfg.channels[cma_level], heads, dropout)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for i, level in enumerate(self.levels):
            x = level(x)  # (B, ch[i], H/2^i, W/2^i)
            if i == self.cma_level:
                x = self.cma(x)  # feeds the skip connection and the next level
            feats.append(x)
        feats[-1] = self.bottleneck_dropout(feats[-1])
        return feats


class BilinearUpBlock(nn.Module):
    """Decoder step of the auxiliary model: 1×1 convolution, bilinear ×2, concatenation with the
    skip, then ``conv_block`` (``UnetUpBlock`` with interpolation instead of a transposed conv).

    Args:
        in_channels: channels of the coarse input.
        out_channels: channels of the skip and of the output.
        conv_block: the block on the concatenation (2·out → out channels).
    """

    def __init__(self, in_channels: int, out_channels: int, conv_block: nn.Module):
        super().__init__()
        # a 1x1 convolution commutes with bilinear interpolation: done at the coarse level
        self.reduce = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.conv_block = conv_block

    def forward(self, inp: Tensor, skip: Tensor) -> Tensor:
        up = F.interpolate(self.reduce(inp), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv_block(torch.cat([up, skip], 1))  # (B, out, h, w)


class AuxUNet(UNet):
    """The auxiliary sub-model: a `UNet` whose encoder has CMA (`CMAEncoder`) and whose decoder
    upsamples bilinearly (`BilinearUpBlock`, with the convolution blocks a `UNet` has). Heads,
    dropout and output layer as in `UNet`.

    Args:
        in_channels, n_classes, n_image_classes, cfg: as for `UNet`.
        cma_level: encoder level of the attention.
        cma_heads, cma_dropout: see `CrossSampleAttention`.
    """

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, cfg: ModelConfig,
                 cma_level: int, cma_heads: int = 4, cma_dropout: float = 0.1):
        super().__init__(in_channels, n_classes, n_image_classes, cfg)
        ch = cfg.channels
        self.encoder = CMAEncoder(in_channels, cfg, cma_level, cma_heads, cma_dropout)
        # decoder[j] takes level depth-j up to level depth-j-1 (as in UNet)
        self.decoder = nn.ModuleList(
            [BilinearUpBlock(ch[i + 1], ch[i], up.conv_block)
             for i, up in zip(reversed(range(cfg.depth)), self.decoder)]
        )


def forward_with_features(net: UNet, x: Tensor) -> tuple[NetOutput, Tensor]:
    """``net(x)`` and its last decoder feature map (what the projection heads read).

    The same computation as ``UNet.forward``, run module by module (works for `AuxUNet`).

    Args:
        net: a `UNet` (or subclass).
        x: (B, C, H, W) images.

    Returns:
        the outputs and the (B, ch[0], H, W) feature map before the output layer.
    """
    size = tuple(x.shape[-2:])
    feats = net.encoder(pad_to_multiple(x, net.cfg.multiple))
    presence, cam, image_logits, pooled = net.heads(feats, size)
    y = feats[-1]
    for j, (up, drop) in enumerate(zip(net.decoder, net.decoder_dropout)):
        y = drop(up(y, feats[-2 - j]))  # (B, ch[i], Hp/2^i, Wp/2^i)
    seg = net.out(y)[..., : size[0], : size[1]]  # (B, K+1, H, W)
    return NetOutput(seg, presence, cam, image_logits, pooled), y[..., : size[0], : size[1]]


def leading(out: NetOutput, n: int) -> NetOutput:
    """The outputs of the first ``n`` images (the labelled part of a joint pass).

    Args:
        out: outputs of a pass over labelled + unlabelled images.
        n: labelled images.
    """
    return NetOutput(*(None if t is None else t[:n] for t in out))


def embedding_head(channels: int, dim: int) -> nn.Sequential:
    """Projection / prediction head on pixel rows: Linear, BN, ReLU, Linear.

    Args:
        channels: input width.
        dim: hidden and output width.
    """
    return nn.Sequential(nn.Linear(channels, dim), nn.BatchNorm1d(dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


class PairOutput(NamedTuple):
    """The vanilla model's `NetOutput` fields plus the auxiliary model's segmentation logits."""

    seg_logits: Tensor  # (B, K+1, H, W) vanilla
    presence_logits: Tensor  # (B, K)
    cam_logits: Tensor  # (B, K, h, w)
    image_logits: Tensor | None  # (B, n_image_classes)
    features: Tensor  # (B, F)
    aux_seg_logits: Tensor  # (B, K+1, H, W) auxiliary


# ----------------------------------------------------------------------------- losses
def sharpen(probs: Tensor, temperature: float) -> Tensor:
    """S(P) = P^{1/T} / (P^{1/T} + (1 - P)^{1/T}), per channel (no renormalisation).

    Args:
        probs: probabilities in [0, 1], any shape.
        temperature: T (0.1 in the paper; smaller = sharper).
    """
    t = 1.0 / temperature
    hi, lo = probs.pow(t), (1.0 - probs).pow(t)
    return hi / (hi + lo)  # the denominator is >= 2 * 0.5^t > 0


def cross_sharpened_mse(probs_v: Tensor, probs_a: Tensor, temperature: float, detach: bool = True) -> Tensor:
    """L_c = MSE(P_v, S(P_a)) + MSE(P_a, S(P_v)) (means over every element).

    Args:
        probs_v: (N, K+1, H, W) vanilla softmax.
        probs_a: (N, K+1, H, W) auxiliary softmax.
        temperature: sharpening temperature T.
        detach: the sharpened targets are constants (the paper's code lets gradients through).
    """
    s_v, s_a = sharpen(probs_v, temperature), sharpen(probs_a, temperature)
    if detach:
        s_v, s_a = s_v.detach(), s_a.detach()
    return F.mse_loss(probs_v, s_a) + F.mse_loss(probs_a, s_v)


def correlation_ce(query_v: Tensor, query_a: Tensor, bank: Tensor, tau: float, normalise: bool = False,
                   detach: bool = True) -> Tensor:
    """Cross-entropy between the two models' correlations with the bank entries.

    C_m[i, j] = softmax_j(q_m[i] · bank[j] / tau); L_o = -mean_i Σ_j C_a[i, j] log C_v[i, j].

    Args:
        query_v: (N, D) vanilla embeddings (gradient flows here).
        query_a: (N, D) auxiliary embeddings of the same pixels (the target side).
        bank: (E, D) memory entries (constants).
        tau: softmax temperature.
        normalise: L2-normalise queries and entries first (cosine similarity).
        detach: the auxiliary correlations are constants.
    """
    bank = bank.detach()
    if normalise:
        query_v, query_a, bank = (F.normalize(t, dim=1) for t in (query_v, query_a, bank))
    log_c_v = torch.log_softmax(query_v @ bank.T / tau, 1)  # (N, E)
    c_a = torch.softmax(query_a @ bank.T / tau, 1)  # (N, E)
    if detach:
        c_a = c_a.detach()
    return -(c_a * log_c_v).sum(1).mean()


def select_agreeing(probs_v: Tensor, probs_a: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Pixels where the two models' argmax agree: per agreed class the ``k`` with the highest
    vanilla probability.

    Args:
        probs_v: (U, K+1, H, W) vanilla softmax.
        probs_a: (U, K+1, H, W) auxiliary softmax.
        k: at most this many pixels per class.

    Returns:
        flat pixel indices into (U·H·W) (class by class) and their classes, both (M,) int64.
    """
    conf, label = probs_v.max(1)  # (U, H, W)
    conf, label = conf.flatten(), label.flatten()
    agree = label == probs_a.argmax(1).flatten()
    picks = []
    for c in range(probs_v.shape[1]):
        rows = torch.nonzero(agree & (label == c))[:, 0]  # (n_c,)
        if rows.numel() > k:
            rows = rows[conf[rows].topk(k).indices]
        picks.append(rows)
    idx = torch.cat(picks)
    return idx, label[idx]


def ring_write(bank: Tensor, filled: int, pointer: int, rows: Tensor) -> tuple[int, int]:
    """Write ``rows`` into a ring buffer in place: from ``pointer`` on, wrapping around, so the
    newest entries overwrite the oldest (of more rows than slots only the last ones stay).

    Args:
        bank: (M, D) buffer.
        filled: slots holding an entry before the write (0..M).
        pointer: next slot to write.
        rows: (n, D) new entries.

    Returns:
        the new ``(filled, pointer)``.
    """
    m = bank.shape[0]
    rows = rows[-m:]
    n = rows.shape[0]
    slots = (pointer + torch.arange(n, device=bank.device)) % m
    bank[slots] = rows.to(bank.dtype)
    return min(filled + n, m), (pointer + n) % m


def pixel_rows(feat: Tensor) -> Tensor:
    """(B, C, H, W) → (B·H·W, C), pixels in (b, y, x) order (free for channels-last maps)."""
    return feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])


@torch.no_grad()
def project_frozen(head: nn.Module, rows: Tensor) -> Tensor:
    """``head(rows)`` with its batch norm in eval mode (running statistics), no gradient.

    Args:
        head: an `embedding_head`.
        rows: (N, C) pixel features.
    """
    was = head.training
    head.eval()
    try:
        return head(rows)
    finally:
        head.train(was)


# ----------------------------------------------------------------------------- the method
@register
class CAML(Method):
    """Two heterogeneous U-Nets in mutual learning (sharpened cross pseudo-labels, cross-sample
    attention, correlation consistency against a labelled-pixel memory bank); predicts with the
    vanilla one, with their disagreement as uncertainty."""

    spec = METHOD_CATALOG["caml"]

    def __init__(self, in_channels: int, n_classes: int, n_image_classes: int, model=None, **options):
        super().__init__(in_channels, n_classes, n_image_classes, model, **options)
        o, cfg = self.options, self.model_config
        stride = int(o["cma_stride"])
        if stride < 2 or stride & (stride - 1):
            raise InputError("method_options", f"option 'cma_stride' must be a power of two >= 2, got {stride}")
        for name in ("bank_size", "bank_update", "occ_topk"):
            if int(o[name]) < 1:
                raise InputError("method_options", f"option {name!r} must be at least 1, got {o[name]}")
        # 0.5 ** (1 / T) underflows in float32 below T of about 0.008: sharpening gives NaN
        if not float(o["temperature"]) >= 0.01:
            raise InputError("method_options", f"option 'temperature' must be at least 0.01, got {o['temperature']}")
        if not float(o["tau"]) > 0:
            raise InputError("method_options", f"option 'tau' must be > 0, got {o['tau']}")
        self.vanilla = self.build_unet()
        self.aux = AuxUNet(in_channels, n_classes, n_image_classes, cfg,
                           cma_level=min(int(math.log2(stride)), cfg.depth),
                           cma_heads=int(o["cma_heads"]), cma_dropout=float(o["cma_dropout"]))
        c = cfg.channels[0]
        dim = 2 * c
        self.proj_v, self.pred_v = embedding_head(c, dim), embedding_head(dim, dim)
        self.proj_a, self.pred_a = embedding_head(c, dim), embedding_head(dim, dim)
        # memory bank: per class (background first) a ring buffer of labelled pixel embeddings
        self.register_buffer("bank", torch.zeros(n_classes + 1, int(o["bank_size"]), dim))
        self.register_buffer("bank_filled", torch.zeros(n_classes + 1, dtype=torch.long))
        self.register_buffer("bank_next", torch.zeros(n_classes + 1, dtype=torch.long))

    # ------------------------------------------------------------------ predict
    def predict_forward(self, image: Tensor) -> PairOutput:
        return PairOutput(*self.vanilla(image), self.aux(image).seg_logits)

    def prediction_from_output(self, out: NetOutput | PairOutput, size: tuple[int, int]) -> Prediction:
        pred = super().prediction_from_output(out, size)  # the vanilla model's
        aux = getattr(out, "aux_seg_logits", None)
        if aux is None:
            return pred
        probs_a = torch.softmax(aux.contiguous(), 1)  # (B, K+1, H, W)
        disagreement = 0.5 * (pred.probs - probs_a).abs().sum(1)  # (B, H, W) total variation
        return replace(pred, uncertainty=disagreement.clamp(0.0, 1.0))

    # ------------------------------------------------------------------ training
    def ramp(self, progress: float) -> float:
        """r(t): the sigmoid ramp-up of the unsupervised weights, 0..1.

        Args:
            progress: fraction of training done.
        """
        rampup = float(self.options["rampup"])
        return sigmoid_rampup(progress / rampup if rampup > 0 else 1.0)

    def start_new_run(self) -> None:
        self.bank.zero_()
        self.bank_filled.zero_()
        self.bank_next.zero_()

    def bank_entries(self) -> Tensor:
        """Every filled bank entry, class by class: (E, D)."""
        return torch.cat([self.bank[c, : int(n)] for c, n in enumerate(self.bank_filled)])

    @torch.no_grad()
    def update_bank(self, feat_v: Tensor, feat_a: Tensor, probs_v: Tensor, probs_a: Tensor,
                    target: Tensor) -> None:
        """Write embeddings of labelled pixels both models get right into the bank.

        Per class, up to ``bank_update`` such pixels drawn at random; each entry is the mean of
        the two projection heads' embeddings (eval-mode batch norm).

        Args:
            feat_v, feat_a: (B, C, S, S) last decoder features of the labelled images.
            probs_v, probs_a: (B, K+1, S, S) softmax outputs.
            target: (B, S, S) segmentation target (-1 ignore).
        """
        correct = (probs_v.argmax(1) == target) & (probs_a.argmax(1) == target)  # (B, S, S)
        correct, labels = correct.flatten(), target.flatten()
        rows_v, rows_a = pixel_rows(feat_v), pixel_rows(feat_a)  # (B·S·S, C)
        n_new = int(self.options["bank_update"])
        for c in range(self.bank.shape[0]):
            idx = torch.nonzero(correct & (labels == c))[:, 0]
            if idx.numel() == 0:
                continue
            idx = idx[torch.randperm(idx.numel(), device=idx.device)[:n_new]]
            emb = 0.5 * (project_frozen(self.proj_v, rows_v[idx]) + project_frozen(self.proj_a, rows_a[idx]))
            filled, pointer = ring_write(self.bank[c], int(self.bank_filled[c]), int(self.bank_next[c]), emb)
            self.bank_filled[c], self.bank_next[c] = filled, pointer

    def occ_loss(self, feat_v: Tensor, feat_a: Tensor, probs_v: Tensor, probs_a: Tensor) -> Tensor | None:
        """L_o on the unlabelled images (``None`` when the bank or the selection is too small).

        Args:
            feat_v, feat_a: (U, C, S, S) last decoder features.
            probs_v, probs_a: (U, K+1, S, S) softmax outputs.
        """
        o = self.options
        bank = self.bank_entries()  # (E, D)
        idx, _ = select_agreeing(probs_v.detach(), probs_a.detach(), int(o["occ_topk"]))
        if bank.shape[0] < 2 or idx.numel() < 2:  # batch norm needs two rows
            return None
        detach = bool(o["detach_targets"])
        query_v = self.pred_v(self.proj_v(pixel_rows(feat_v)[idx]))  # (M, D)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
            query_a = self.pred_a(self.proj_a(pixel_rows(feat_a)[idx]))  # (M, D)
        return correlation_ce(query_v, query_a, bank, float(o["tau"]), bool(o["occ_normalise"]), detach)

    def training_step(self, batch: Batch, step: int, progress: float) -> dict[str, Tensor]:
        o = self.options
        n = len(batch)
        r = self.ramp(progress)
        mutual = r >= float(o["skip_below"])  # below: the unsupervised terms are not worth a pass
        u = batch.unlabelled
        with_u = mutual and u is not None and len(u) > 0
        x = torch.cat([batch.image, u], 0) if with_u else batch.image  # (N, C, S, S)
        out_v, feat_v = forward_with_features(self.vanilla, x)
        out_a, feat_a = forward_with_features(self.aux, x)

        target = self.supervised_target(batch)
        losses = self.supervised_losses(leading(out_v, n), batch, target)
        sup_a = self.supervised_losses(leading(out_a, n), batch, target)
        total = float(o["sup_weight"]) * (losses["loss"] + sup_a["loss"])
        losses["supervised"], losses["aux_supervised"] = losses["loss"].detach(), sup_a["loss"].detach()

        probs_v = torch.softmax(out_v.seg_logits, 1)  # (N, K+1, S, S)
        probs_a = torch.softmax(out_a.seg_logits, 1)
        if self.training and torch.is_grad_enabled():  # not in a no-grad probe
            self.update_bank(feat_v[:n], feat_a[:n], probs_v[:n], probs_a[:n], target)
        if mutual:
            cross = cross_sharpened_mse(probs_v, probs_a, float(o["temperature"]), bool(o["detach_targets"]))
            total = total + float(o["consistency"]) * r * cross
            losses["cross"] = cross.detach()
        if with_u:
            occ = self.occ_loss(feat_v[n:], feat_a[n:], probs_v[n:], probs_a[n:])
            if occ is not None:
                total = total + float(o["occ_weight"]) * r * occ
                losses["occ"] = occ.detach()
        losses["loss"] = total
        return losses
