"""Losses on tiny hand-made tensors."""
import math

import torch
import torch.nn.functional as F

from kd.losses import DistillHeads, cluster_loss, info_nce, margin_logits, partial_fc_sample


def test_margin_logit_is_s_cos_theta_plus_m():
    cos = torch.tensor([[0.5, 0.2, -0.1], [0.1, 0.9, 0.3]])
    target = torch.tensor([0, 1])
    out = margin_logits(cos, target, s=32.0, m=0.3)
    for r, t in enumerate(target.tolist()):
        theta = math.acos(cos[r, t].item())
        assert math.isclose(out[r, t].item(), 32 * math.cos(theta + 0.3), rel_tol=1e-5)
        others = [c for c in range(3) if c != t]
        assert torch.allclose(out[r, others], 32 * cos[r, others])


def test_partial_fc_full_when_r_is_one_and_keeps_positives():
    torch.manual_seed(0)
    k, d = 50, 8
    centres = torch.randn(k, d)
    x = torch.randn(6, d)
    labels = torch.tensor([3, 3, 17, 42, 0, 49])
    full = F.cross_entropy(margin_logits(F.normalize(x) @ F.normalize(centres).t(), labels, 32, 0.3), labels)
    assert torch.allclose(cluster_loss(x, labels, centres, 32, 0.3, r=1.0), full)
    frozen = DistillHeads(d, d, centroids=centres).centres  # stored unit-norm, not normalised per step
    assert torch.allclose(cluster_loss(x, labels, frozen, 32, 0.3, r=1.0, centres_unit=True), full)
    for seed in range(20):
        ids, col = partial_fc_sample(labels, k, 0.1, torch.Generator().manual_seed(seed))
        assert set(labels.tolist()) <= set(ids.tolist())
        assert torch.equal(ids[col], labels)
        assert len(ids) == 5 + math.ceil(0.1 * (k - 5))


def test_info_nce_symmetric_and_minimal_on_matching_pairs():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(8, 16))
    b = F.normalize(torch.randn(8, 16))
    assert torch.allclose(info_nce(a, b, 10.0), info_nce(b, a, 10.0))
    matched = info_nce(a, a, 10.0)
    assert matched < info_nce(a, b, 10.0)
    assert matched < info_nce(a, a[torch.randperm(8)], 10.0)


def test_gradients_reach_student_and_heads_never_teacher():
    from cidistill.core.config import LossConfig
    from kd.losses import compute_losses

    torch.manual_seed(0)
    student_img = torch.randn(4, 8, requires_grad=True)
    student_txt = torch.randn(4, 8, requires_grad=True)
    teacher_img, teacher_txt = torch.randn(4, 16), torch.randn(4, 16)  # precomputed: plain tensors
    heads = DistillHeads(8, 16, centroids=torch.randn(5, 16), learn_centres=True)
    scale = torch.tensor(math.log(10.0), requires_grad=True)
    terms = compute_losses({"instance": 1, "feature_distill": 1, "cluster": 1, "align": 1},
                           {"img": student_img, "txt": student_txt},
                           {"t_img": teacher_img, "t_txt": teacher_txt, "cluster_id": torch.tensor([0, 1, 2, 0])},
                           heads, scale, LossConfig(partial_fc_r=1.0))
    sum(terms.values()).backward()
    assert student_img.grad.abs().sum() > 0 and student_txt.grad.abs().sum() > 0
    assert heads.img_adapter.weight.grad is not None and heads.centres.grad is not None
    assert teacher_img.grad is None and not teacher_img.requires_grad
