"""The training objectives. Each takes student outputs, the teacher's precomputed embeddings and the
heads' parameters; none ever runs the teacher.

clip / align     symmetric InfoNCE between student image and student text (CLIP; DC-CLIP stage 2)
instance         CLIP-CID instance discrimination: feature distillation + interactive contrastive (CLIP-KD)
feature_distill  DC-CLIP stage 1: SmoothL1(adapter(student), teacher); EN and ZH captions -> teacher EN text
cluster          CLIP-CID cluster discrimination: additive angular margin softmax over k-means centres, PartialFC
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F



def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE on L2-normalised rows: matching rows of a and b are the positives."""
    logits = logit_scale * a @ b.t()
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def margin_logits(cos: torch.Tensor, target_col: torch.Tensor, s: float, m: float) -> torch.Tensor:
    """ArcFace/UNICOM logits: s·cos(θ+m) in each row's target column, s·cos θ elsewhere. Only the target
    column is clamped and re-angled: the other columns (up to 10^5 per row under PartialFC) pass once."""
    cos = cos.float()
    rows = torch.arange(cos.shape[0], device=cos.device)
    cos_t = cos[rows, target_col].clamp(-1 + 1e-7, 1 - 1e-7)
    theta_t = torch.acos(cos_t)
    # past θ+m > π cos(θ+m) stops decreasing; fall back to a linear penalty (as ArcFace's "easy margin" off)
    target_logit = torch.where(theta_t + m < math.pi, torch.cos(theta_t + m), cos_t - m * math.sin(m))
    out = cos * s
    out[rows, target_col] = s * target_logit
    return out


def partial_fc_sample(labels: torch.Tensor, num_classes: int, r: float, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """PartialFC (UNICOM): the batch's positive centres plus a random fraction r of the others.
    Returns (class ids to score, each label's column among them). r=1 keeps every class, in order."""
    if r >= 1.0:
        return torch.arange(num_classes, device=labels.device), labels
    positives = torch.unique(labels)
    n_neg = int(math.ceil(r * (num_classes - positives.numel())))
    score = torch.rand(num_classes, device=labels.device, generator=generator)
    score[positives] = 2.0  # positives always win the top-k
    chosen = torch.topk(score, positives.numel() + n_neg, sorted=False).indices
    chosen, _ = torch.sort(chosen)
    col = torch.searchsorted(chosen, labels)
    return chosen, col


def cluster_loss(student_img: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor, s: float, m: float,
                 r: float, generator=None, centres_unit: bool = False) -> torch.Tensor:
    """centres_unit: the rows are already unit-norm (frozen centres, DistillHeads), so the sampled
    10^5 x d block is not normalised again every step."""
    ids, col = partial_fc_sample(labels, centres.shape[0], r, generator)
    w = centres[ids].float()
    if not centres_unit:
        w = F.normalize(w, dim=-1)
    cos = F.normalize(student_img.float(), dim=-1) @ w.t()
    return F.cross_entropy(margin_logits(cos, col, s, m), col)


def feature_distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """SmoothL1 on unit vectors scaled by sqrt(D), so elements are O(1) and the loss is not vanishingly small."""
    d = teacher.shape[-1]
    return F.smooth_l1_loss(F.normalize(student.float(), dim=-1) * math.sqrt(d),
                            F.normalize(teacher.float(), dim=-1) * math.sqrt(d))


def fd_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """CLIP-KD feature distillation: MSE between normalised embeddings (summed over dims)."""
    return (F.normalize(student.float(), dim=-1) - F.normalize(teacher.float(), dim=-1)).pow(2).sum(-1).mean()


class DistillHeads(nn.Module):
    """Everything trained beside the student: adapters to the teacher's width, the cluster centres,
    the temperatures. Saved with the checkpoint, not exported with the student."""

    def __init__(self, student_dim: int, teacher_dim: int, centroids: torch.Tensor | None = None,
                 learn_centres: bool = False, instance_temperature: float = 0.05):
        super().__init__()
        self.img_adapter = nn.Linear(student_dim, teacher_dim)
        self.txt_adapter = nn.Linear(student_dim, teacher_dim)
        for a in (self.img_adapter, self.txt_adapter):  # start as (near) identity when widths agree
            if student_dim == teacher_dim:
                nn.init.eye_(a.weight)
                nn.init.zeros_(a.bias)
        self.to_teacher = student_dim != teacher_dim   # instance/cluster project only when widths differ
        if centroids is not None:
            self.centres = nn.Parameter(F.normalize(centroids.float(), dim=-1), requires_grad=learn_centres)
        else:
            self.centres = None
        self.instance_logit_scale = nn.Parameter(torch.tensor(math.log(1 / instance_temperature)))

    def img_in_teacher_space(self, x):
        return self.img_adapter(x) if self.to_teacher else x

    def txt_in_teacher_space(self, x):
        return self.txt_adapter(x) if self.to_teacher else x


def compute_losses(weights: dict[str, float], out: dict, batch: dict, heads: DistillHeads, logit_scale,
                   loss_cfg) -> dict[str, torch.Tensor]:
    """out: student `img`, `txt` (EN) and `txt_zh` embeddings (unnormalised); batch: teacher `t_img`,
    `t_txt` embeddings, `has_zh` mask, `cluster_id`. Returns each active term (already weighted)."""
    terms: dict[str, torch.Tensor] = {}
    img = F.normalize(out["img"].float(), dim=-1)
    txt = F.normalize(out["txt"].float(), dim=-1)
    zh = out.get("txt_zh")
    has_zh = batch.get("has_zh")
    zh_ok = zh is not None and has_zh is not None and bool(has_zh.any())

    def both_languages(fn):
        """Average a text-side term over the English and (present) Chinese captions."""
        v = fn(txt, slice(None))
        if zh_ok:
            idx = has_zh.nonzero().squeeze(1)
            v = 0.5 * (v + fn(F.normalize(zh.float()[idx], dim=-1), idx))
        return v

    for name in ("clip", "align"):
        if weights.get(name, 0):
            scale = logit_scale.exp().clamp(max=100)
            terms[name] = weights[name] * both_languages(lambda t, idx: info_nce(img[idx], t, scale))

    if weights.get("instance", 0):
        t_img, t_txt = F.normalize(batch["t_img"].float(), dim=-1), F.normalize(batch["t_txt"].float(), dim=-1)
        s_img = heads.img_in_teacher_space(out["img"].float())
        scale = heads.instance_logit_scale.exp().clamp(max=100)
        fd_img = fd_mse(s_img, t_img)
        fd_txt = both_languages(lambda t, idx: fd_mse(heads.txt_in_teacher_space(t), t_txt[idx]))
        s_img_n = F.normalize(s_img, dim=-1)
        icl = both_languages(lambda t, idx: 0.5 * (
            info_nce(s_img_n[idx], t_txt[idx], scale)
            + info_nce(F.normalize(heads.txt_in_teacher_space(t), dim=-1), t_img[idx], scale)))
        terms["instance"] = weights["instance"] * (loss_cfg.fd_weight * (fd_img + fd_txt) + loss_cfg.icl_weight * icl)

    if weights.get("feature_distill", 0):
        t_img, t_txt = batch["t_img"], batch["t_txt"]
        fd = feature_distill_loss(heads.img_adapter(out["img"].float()), t_img)
        fd = fd + both_languages(lambda t, idx: feature_distill_loss(heads.txt_adapter(out_raw_text(out, t, idx)), t_txt[idx]))
        terms["feature_distill"] = weights["feature_distill"] * fd

    if weights.get("cluster", 0):
        if heads.centres is None:
            raise ValueError("the cluster loss needs the cluster stage's centroids")
        s_img = heads.img_in_teacher_space(out["img"].float())
        terms["cluster"] = weights["cluster"] * cluster_loss(
            s_img, batch["cluster_id"], heads.centres, loss_cfg.margin_s, loss_cfg.margin_m, loss_cfg.partial_fc_r,
            centres_unit=not heads.centres.requires_grad)
    return terms


def out_raw_text(out: dict, normalised: torch.Tensor, idx) -> torch.Tensor:
    """feature_distill adapts the raw (unnormalised) text embedding of whichever language `idx` selects."""
    if isinstance(idx, slice):
        return out["txt"].float()
    return out["txt_zh"].float()[idx]
