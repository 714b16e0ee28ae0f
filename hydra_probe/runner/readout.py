"""Last-position readout: every component's projection on the metric direction.

For a linear metric with direction u (B, d), the final norm
``N(x) = gamma * P(x) / sigma(x) + beta`` makes the metric

    m = sum_c <gamma * P(out_c), u> / sigma  +  <gamma * P(const), u> / sigma
        + <beta, u> + b_U

``proj[c] = <gamma * P(out_c), u>`` is scale-free: dividing by the clean
sigma gives frozen-scale direct effects, by the run's own sigma recomputed
ones. Computations are in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..components import Component, finest


@dataclass
class Readout:
    """Projection machinery for one model and metric direction (see module doc)."""

    gamma: torch.Tensor          # (d,) float64
    beta_u: torch.Tensor         # (B,) <beta, u> + b_U
    u: torch.Tensor              # (B, d) float64
    eps: float
    centre: bool                 # LayerNorm centres, RMSNorm does not
    W_O: list[torch.Tensor]      # per layer (H, dh, d) float64
    b_O_sum: torch.Tensor        # (d,) sum of attention output biases
    components: list[Component]  # the finest partition (heads, MLPs), model order

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
        return cls(gamma.detach().to(dev, f), beta_u, u64, eps, ad.table.norm_kind == "layernorm",
                   [ad.W_O(l).detach().to(dev, f) for l in range(ad.n_layers)], bsum.to(dev), finest(model))

    def P(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.centre else x

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """Norm scale of residual vectors x (..., d) -> (...)."""
        x = x.to(torch.float64)
        if self.centre:
            return torch.sqrt(x.var(-1, unbiased=False) + self.eps)
        return torch.sqrt(x.pow(2).mean(-1) + self.eps)

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

    def projections(self, z: list[torch.Tensor], mlp: list[torch.Tensor], u: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Unscaled projections of every finest component: (N, C) in model order.

        ``z[l]`` (N, H*dh) and ``mlp[l]`` (N, d) are last-position activations
        of N = k * B rows (k stacked copies of B prompts); ``u`` (B, d)
        defaults to the readout's direction. Each head's projection is
        ``z_h . (W_O[h] @ P(gamma * u))``, so no head output is materialised.
        """
        u = self.u if u is None else u
        r = self.read_vector(u)                                   # (B, d)
        B = r.shape[0]
        N = z[0].shape[0]
        k = N // B
        cols = []
        for l in range(len(self.W_O)):
            W = self.W_O[l]                                       # (H, dh, d)
            w = torch.einsum("hkd,bd->bhk", W, r)                 # (B, H, dh)
            zl = z[l].to(W.device, torch.float64).reshape(k, B, W.shape[0], W.shape[1])
            cols.append(torch.einsum("cbhk,bhk->cbh", zl, w).reshape(N, W.shape[0]))
            cols.append((mlp[l].to(r.device, torch.float64).reshape(k, B, -1) * r).sum(-1).reshape(N, 1))
        return torch.cat(cols, dim=1)

    def const_projection(self, resid0: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled projection of embeddings plus attention output biases: (N,) for N = k * B rows; u (B, d)."""
        r = self.read_vector(self.u if u is None else u)
        B = r.shape[0]
        v = resid0.to(self.b_O_sum.device, torch.float64) + self.b_O_sum
        return (v.reshape(-1, B, v.shape[-1]) * r).sum(-1).reshape(-1)
