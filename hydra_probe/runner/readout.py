"""Last-position readout: every component's projection on the metric direction.

For a linear metric with direction u (B, d), the final norm
``N(x) = gamma * P(x) / sigma(x) + beta`` makes the metric

    m = sum_c <gamma * P(out_c), u> / sigma  +  <gamma * P(const), u> / sigma
        + <beta, u> + b_U

``proj[c] = <gamma * P(out_c), u>`` is free of the final norm's scale:
dividing by the clean sigma gives frozen-scale direct effects, by the run's
own sigma recomputed ones. Computations are in float64.

Post-attention norms (Gemma-2/3 sandwich norms, OLMo-2; DESIGN.md section
2, "Block norms"): head h of layer l writes ``gamma_l * (W_O^h z_h) /
sigma_l`` with sigma_l the RMS of layer l's whole attention output in that
run. :meth:`Readout.projections` reads each head's actual write (its run's
own sigma_l); :meth:`Readout.post_sigma` gives the sigma_l so that callers
can rescale a head's projection to another run's sigma_l
(``proj * own / other``: :meth:`Readout.column_scale`). An MLP with a post
norm is one unit: its ``mlp_out`` site is the norm's output already.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..components import Component, finest
from ..errors import ArchitectureError
from ..models.plumbing import norm_scale


class Float64Weights(Sequence):
    """Each layer's per-head output matrices (H, dh, d) in float64, converted from the model's weights when
    read: a float64 copy of every layer would cost 8 bytes per weight (about 1 GB for Gemma-2-2B)."""

    def __init__(self, adapter: Any, device: torch.device) -> None:
        self.ad, self.device = adapter, device

    def __len__(self) -> int:
        return self.ad.n_layers

    def __getitem__(self, layer: int) -> torch.Tensor:  # type: ignore[override]
        if not -len(self) <= layer < len(self):
            raise IndexError(layer)
        return self.ad.W_O(layer % len(self)).detach().to(self.device, torch.float64)


@dataclass
class Readout:
    """Projection machinery for one model and metric direction (see module doc)."""

    gamma: torch.Tensor          # (d,) float64
    beta_u: torch.Tensor         # (B,) <beta, u> + b_U
    u: torch.Tensor              # (B, d) float64
    eps: float
    centre: bool                 # LayerNorm centres, RMSNorm does not
    W_O: Sequence[torch.Tensor]  # per layer (H, dh, d) float64, converted when read (no float64 copy kept)
    b_O_sum: torch.Tensor        # (d,) sum of attention output biases
    components: list[Component]  # the finest partition (heads, MLPs), model order
    post_gamma: list[torch.Tensor] | None = None  # per layer (d,) post-attention norm scale, float64
    post_eps: float = 0.0

    @classmethod
    def build(cls, model, u: torch.Tensor, bias: torch.Tensor) -> Readout:
        ad = model.adapter
        gamma, beta, eps = ad.norm_params()
        f = torch.float64
        dev = u.device  # one device for all of it, however the model is split
        u64 = u.to(f)
        beta_u = bias.to(dev, f) + (0 if beta is None else u64 @ beta.detach().to(dev, f))
        bsum = torch.zeros(ad.d_model, dtype=f, device=ad.device)
        for l in range(ad.n_layers):
            b = ad.b_O(l)
            if b is not None:
                bsum = bsum + b.detach().to(bsum.device, f)
        post = None
        post_eps = 0.0
        if ad.has_post_attn_norm:
            post = []
            for l in range(ad.n_layers):
                pg, post_eps = ad.post_norm_params(l, "attn")
                if ad.b_O(l) is not None:
                    raise ArchitectureError(
                        f"{ad.table.family}: layer {l}'s attention output projection has a bias inside its "
                        "post-attention norm, which hydra_probe's decomposition does not split; use a "
                        "checkpoint without attention output biases.")
                post.append(pg.detach().to(dev, f))
            bsum = torch.zeros(ad.d_model, dtype=f, device=dev)
        return cls(gamma.detach().to(dev, f), beta_u, u64, eps, ad.table.norm_kind == "layernorm",
                   Float64Weights(ad, dev), bsum.to(dev), finest(model), post, post_eps)

    def P(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centre else x

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """Norm scale of residual vectors x (..., d) -> (...)."""
        return norm_scale(x, self.eps, self.centre)

    def project(self, v: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """<gamma * P(v), u> for v (..., B, d) -> (..., B)."""
        u = self.u if u is None else u
        return (self.P(v.to(self.gamma.device, torch.float64)) * self.gamma * u).sum(-1)

    def head_outputs(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """z (N, H*dh) at one position -> per-head outputs (N, H, d), float64."""
        W = self.W_O[layer]
        return torch.einsum("nhk,hkd->nhd", z.to(W.device, torch.float64).reshape(z.shape[0], W.shape[0], W.shape[1]), W)

    def read_vector(self, u: torch.Tensor) -> torch.Tensor:
        """P(gamma * u): since P is symmetric, <gamma * P(v), u> = <v, P(gamma * u)>."""
        return self.P(self.gamma * u.to(torch.float64))

    @property
    def has_post_norms(self) -> bool:
        """Whether heads write through a post-attention norm (then :meth:`post_sigma` matters)."""
        return self.post_gamma is not None

    def post_sigma(self, z: list[torch.Tensor]) -> torch.Tensor | None:
        """Post-attention norm scale of every layer: z[l] (N, H*dh) -> (N, L) float64; None without post norms."""
        if self.post_gamma is None:
            return None
        cols = []
        for l, W in enumerate(self.W_O):
            a = z[l].to(W.device, torch.float64) @ W.reshape(-1, W.shape[-1])          # (N, d) attention output
            cols.append(norm_scale(a, self.post_eps, centre=False))  # post norms are RMSNorms
        return torch.stack(cols, dim=1)

    def head_layers(self) -> torch.Tensor:
        """Layer of each finest component's column (C,), -1 for MLPs."""
        return torch.tensor([c.layer if c.kind == "head" else -1 for c in self.components])

    def column_scale(self, post_sigma: torch.Tensor | None, n: int) -> torch.Tensor:
        """Per row and finest column (n, C): the post-attention scale a head's write is divided by
        (its layer's sigma_l), 1 for MLPs and for families without post norms."""
        C = len(self.components)
        out = torch.ones(n, C, dtype=torch.float64)
        if post_sigma is None:
            return out
        lay = self.head_layers()
        heads = lay >= 0
        out[:, heads] = post_sigma.cpu()[:, lay[heads]]
        return out

    def raw_metric(self, resid: torch.Tensor) -> torch.Tensor:
        """The linear metric before any logit soft-cap, from final residuals (n, d) in task order: (n,)."""
        return self.project(resid.to(self.u.device)).cpu() / self.sigma(resid).cpu() + self.beta_u.cpu()

    def projections(self, z: list[torch.Tensor], mlp: list[torch.Tensor], u: torch.Tensor | None = None,
                    post_sigma: torch.Tensor | None = None) -> torch.Tensor:
        """Projections of every finest component's write, free of the final norm's scale: (N, C) in model order.

        ``z[l]`` (N, H*dh) and ``mlp[l]`` (N, d) are last-position activations
        of N = k * B rows (k stacked copies of B prompts); ``u`` (B, d)
        defaults to the readout's direction. Each head's projection is
        ``z_h . (W_O[h] @ P(gamma * u))``, so no head output is materialised.
        With post-attention norms each head's write is ``gamma_l * W_O^h z_h /
        sigma_l`` at ``post_sigma`` (N, L) (default: the rows' own, from ``z``).
        """
        u = self.u if u is None else u
        r = self.read_vector(u)                                   # (B, d)
        B = r.shape[0]
        N = z[0].shape[0]
        k = N // B
        if self.post_gamma is not None and post_sigma is None:
            post_sigma = self.post_sigma(z)
        cols = []
        for l in range(len(self.W_O)):
            W = self.W_O[l]                                       # (H, dh, d)
            rl = r if self.post_gamma is None else r * self.post_gamma[l]
            w = torch.einsum("hkd,bd->bhk", W, rl)                # (B, H, dh)
            zl = z[l].to(W.device, torch.float64).reshape(k, B, W.shape[0], W.shape[1])
            col = torch.einsum("cbhk,bhk->cbh", zl, w).reshape(N, W.shape[0])
            if post_sigma is not None:
                col = col / post_sigma[:, l:l + 1].to(col.device)
            cols.append(col)
            cols.append((mlp[l].to(r.device, torch.float64).reshape(k, B, -1) * r).sum(-1).reshape(N, 1))
        return torch.cat(cols, dim=1)

    def const_projection(self, resid0: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled projection of embeddings plus attention output biases: (N,) for N = k * B rows; u (B, d)."""
        r = self.read_vector(self.u if u is None else u)
        B = r.shape[0]
        v = resid0.to(self.b_O_sum.device, torch.float64) + self.b_O_sum
        return (v.reshape(-1, B, v.shape[-1]) * r).sum(-1).reshape(-1)
