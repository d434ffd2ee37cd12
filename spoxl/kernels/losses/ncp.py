"""NCP's objectives in U-Net-feature space (methods.md 4): reference, head, fused Triton path.

d = mse_w - mse_l of the policy's features against the targets' (d_ref likewise for the frozen
reference). kind 'dpo': -logsigmoid(beta (d_ref - d_theta)); 'cpo': -logsigmoid(-beta d_theta);
'sft': mean(mse_w). For cpo and sft the metrics report the reference-free logit -beta d_theta.
"""

from __future__ import annotations

import functools

import torch.nn.functional as F

from spoxl.errors import SpoxlError
from spoxl.kernels import _checks
from spoxl.kernels.losses import _common as C

NCP_KINDS = ("dpo", "cpo", "sft")
_BASE_METRICS = ("implicit_acc", "margin", "mse_w", "mse_l", "d_theta")
METRICS = {"dpo": (*_BASE_METRICS, "d_ref"), "cpo": _BASE_METRICS, "sft": _BASE_METRICS}
REDUCTION = "sqerr"


def ncp_loss(feat_w, feat_l, ref_feat_w, ref_feat_l, target_feat_w, target_feat_l, *, beta, kind,
             return_metrics=False):  # fmt: skip
    """NCP in U-Net-feature space, d = mse_w - mse_l: kind 'dpo' -logsigmoid(beta (d_ref - d_theta)),
    'cpo' -logsigmoid(-beta d_theta), 'sft' mean(mse_w). ref_feat_* may be None unless kind='dpo'.
    Gradients into feat_w and feat_l. Metrics: implicit_acc, margin, mse_w/l, d_theta (and d_ref)."""
    if kind not in NCP_KINDS:
        raise SpoxlError(f"ncp kind must be one of {', '.join(NCP_KINDS)}, got {kind!r}")
    tensors = {"feat_w": feat_w, "feat_l": feat_l, "target_feat_w": target_feat_w, "target_feat_l": target_feat_l}
    if kind == "dpo":
        if ref_feat_w is None or ref_feat_l is None:
            raise SpoxlError("ncp kind 'dpo' needs ref_feat_w and ref_feat_l")
        tensors.update(ref_feat_w=ref_feat_w, ref_feat_l=ref_feat_l)
    _checks.same_shape(tensors)
    impl = fused if C.uses_triton(feat_w.device) else reference
    return impl(feat_w, feat_l, ref_feat_w, ref_feat_l, target_feat_w, target_feat_l, beta=beta, kind=kind,
                return_metrics=return_metrics)  # fmt: skip


def head(mse_w, mse_l, ref_mse_w, ref_mse_l, beta: float, kind: str, with_metrics=True):
    """(loss, metrics) from the per-sample feature MSEs (ref_* None unless kind='dpo'), in fp64."""
    dtype = mse_w.dtype
    mse_w, mse_l, ref_mse_w, ref_mse_l = C.fp64(mse_w, mse_l, ref_mse_w, ref_mse_l)
    d_theta = mse_w - mse_l
    d_ref = ref_mse_w - ref_mse_l if kind == "dpo" else None
    logit = beta * (d_ref - d_theta) if kind == "dpo" else -beta * d_theta
    loss = mse_w.mean() if kind == "sft" else -F.logsigmoid(logit).mean()

    def metrics():
        values = {
            "implicit_acc": C.implicit_accuracy(logit),
            "margin": logit.mean(),
            "mse_w": mse_w.mean(),
            "mse_l": mse_l.mean(),
            "d_theta": d_theta.mean(),
        }
        if d_ref is not None:
            values["d_ref"] = d_ref.mean()
        return values

    return C.finish(loss, with_metrics and metrics, dtype)


def reference(feat_w, feat_l, ref_feat_w, ref_feat_l, target_feat_w, target_feat_l, *, beta, kind,
              return_metrics=False):  # fmt: skip
    """Plain torch autograd: per-sample feature MSEs, then `head`."""
    ref_w = ref_l = None
    if kind == "dpo":
        ref_w = C.per_sample_mse(ref_feat_w.detach(), target_feat_w)
        ref_l = C.per_sample_mse(ref_feat_l.detach(), target_feat_l)
    out = head(C.per_sample_mse(feat_w, target_feat_w), C.per_sample_mse(feat_l, target_feat_l), ref_w, ref_l,
               beta, kind, return_metrics)  # fmt: skip
    return C.maybe_metrics(out, return_metrics)


def fused(feat_w, feat_l, ref_feat_w, ref_feat_l, target_feat_w, target_feat_l, *, beta, kind,
          return_metrics=False):  # fmt: skip
    """Triton: the shared squared-error reduction (reference features only for 'dpo'), the kind's
    head from `triton_heads`, one elementwise backward."""
    T = C.triton_ops()
    refs = (ref_feat_w, ref_feat_l) if kind == "dpo" else (None, None)
    loss, metrics = T.FusedPairLoss.apply(triton_heads()[kind], (float(beta), 0.0, 0.0), feat_w, feat_l,
                                          target_feat_w, target_feat_l, *refs)  # fmt: skip
    return T.with_metrics(METRICS[kind], loss, metrics, return_metrics)


# Bound by triton_heads() on first use (_common.bind_triton; helpers too: module globals, not closures).
tl = K = ncp_head = None


@functools.cache
def triton_heads() -> dict:
    """{kind: `head` of that kind as a Triton device function}, built on first use."""
    global ncp_head
    C.bind_triton(globals())
    import triton

    @triton.jit
    def ncp_head(s0, s1, s2, s3, beta, inv_b, inv_n, rmask, met_ptr, KIND: tl.constexpr):
        # KIND 0 dpo, 1 cpo, 2 sft: logit = beta (d_ref - d_theta), d_ref = 0 unless dpo
        mse_w, mse_l, ref_w, ref_l = K.mses(s0, s1, s2, s3, inv_n)
        d_ref = ref_w - ref_l
        if KIND != 0:
            d_ref = tl.zeros_like(d_ref)
        d_theta = mse_w - mse_l
        logit = beta * (d_ref - d_theta)
        if KIND == 2:  # sft: mean(mse_w); the logit is reported, reference-free, as for cpo
            per_sample = mse_w
            d_w = tl.zeros_like(d_ref) + inv_b
            d_l = tl.zeros_like(d_ref)
        else:
            per_sample = -K.log_sigmoid(logit)
            d_logit = -K.sigmoid_neg(logit) * inv_b
            d_w = -beta * d_logit
            d_l = beta * d_logit
        tl.store(met_ptr + 4, K.mean_b(d_theta, rmask, inv_b).to(tl.float32))
        tl.store(met_ptr + 5, K.mean_b(d_ref, rmask, inv_b).to(tl.float32))
        coef_w, coef_l = K.mse_outputs(met_ptr, logit, logit, mse_w, mse_l, d_w, d_l, rmask, inv_b, inv_n)
        return per_sample, coef_w, coef_l

    @triton.jit
    def ncp_dpo_head(s0, s1, s2, s3, std, beta, p1, p2, inv_b, inv_n, rmask, met_ptr):
        return ncp_head(s0, s1, s2, s3, beta, inv_b, inv_n, rmask, met_ptr, 0)

    @triton.jit
    def ncp_cpo_head(s0, s1, s2, s3, std, beta, p1, p2, inv_b, inv_n, rmask, met_ptr):
        return ncp_head(s0, s1, s2, s3, beta, inv_b, inv_n, rmask, met_ptr, 1)

    @triton.jit
    def ncp_sft_head(s0, s1, s2, s3, std, beta, p1, p2, inv_b, inv_n, rmask, met_ptr):
        return ncp_head(s0, s1, s2, s3, beta, inv_b, inv_n, rmask, met_ptr, 2)

    return {"dpo": ncp_dpo_head, "cpo": ncp_cpo_head, "sft": ncp_sft_head}
