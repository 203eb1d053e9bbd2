"""The DyDiT block: the package's :class:`DiTBlock` with TDW and SDT routers.

Two ways to run the same decisions:

- **masked** (training, and the reference): full-width attention and MLP; head outputs, MLP
  channel groups and per-token MLP outputs are multiplied by the 0/1 decisions (straight-through
  Gumbel samples in training, so gradients reach the routers).
- **fast** (inference): the compute really shrinks. TDW slices qkv/proj rows/columns to the active
  heads and fc1/fc2 to the active channel groups; SDT packs the tokens that need the MLP across the
  whole batch (:mod:`.routed_tokens`: the batch viewed as one sequence of N*L tokens), runs the MLP on
  them only and adds the gated results back in place.

TDW decisions depend on the timestep embedding only, so at a sampling step (one sigma for the whole
batch, guidance included) every sample shares them and the weights are sliced once. If samples
disagree (different sigmas in one batch), the batch is split into groups of identical decisions and
each group runs its own sliced weights: still exact, one pass per distinct pattern.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import RouterConfig
from .layers import DiTBlock, attend, gelu
from .routed_tokens import gated_unpack_add, pack
from .routers import TokenRouter, WidthRouter, decide

MODES = ("auto", "masked", "fast")


@dataclass
class Routing:
    """One block's decisions for a batch (0/1 floats; straight-through in training)."""

    heads: torch.Tensor   # (N, H) attention heads on
    groups: torch.Tensor  # (N, H) MLP channel groups on
    tokens: torch.Tensor  # (N, L) tokens that go through the MLP


class DyDiTBlock(DiTBlock):
    """A DiT block whose heads / MLP groups follow the timestep and whose MLP skips tokens.

    ``forward(x, c, t_emb)``: x (N, L, D), c (N, cond_dim) the block's conditioning,
    t_emb (N, t_dim) the timestep embedding that drives TDW. The decisions of the last call are
    kept in ``self.routing``. ``self.mode``: ``auto`` (masked in training, fast in eval),
    ``masked`` or ``fast``.
    """

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float = 4.0,
                 t_dim: int | None = None, router: RouterConfig | None = None):
        super().__init__(dim, num_heads, cond_dim, mlp_ratio)
        router = router or RouterConfig()
        hidden = self.mlp.fc1.out_features
        if hidden % num_heads:
            raise ValueError(f"MLP width {hidden} does not split into {num_heads} channel groups")
        self.num_heads = num_heads
        self.temperature = router.temperature
        self.tdw, self.sdt = router.tdw, router.sdt
        t_dim = t_dim or cond_dim
        self.head_router = WidthRouter(t_dim, num_heads, router.width_bias) if router.tdw else None
        self.group_router = WidthRouter(t_dim, num_heads, router.width_bias) if router.tdw else None
        self.token_router = TokenRouter(dim, router.token_ratio, router.token_bias) if router.sdt else None
        self.mode = "auto"
        self.routing: Routing | None = None

    @classmethod
    def from_block(cls, block: DiTBlock, t_dim: int, router: RouterConfig) -> DyDiTBlock:
        """A DyDiT block holding (a copy of) ``block``'s weights, routers all on."""
        dim = block.attn.proj.out_features
        new = cls(dim, block.attn.num_heads, block.adaLN_modulation[-1].in_features,
                  block.mlp.fc1.out_features / dim, t_dim, router)
        new.load_state_dict(block.state_dict(), strict=False)
        return new.to(block.attn.qkv.weight)

    def reset_routers(self) -> None:
        for router in (self.head_router, self.group_router, self.token_router):
            if router is not None:
                router.reset_parameters()

    def runs_fast(self) -> bool:
        """Whether a forward now takes the fast path (else the masked formulation, which computes everything)."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        return self.mode == "fast" or (self.mode == "auto" and not self.training)

    # ---- decisions -------------------------------------------------------------------------
    def _width_decisions(self, t_emb: torch.Tensor, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.tdw:
            ones = like.new_ones(n, self.num_heads)
            return ones, ones
        return (decide(self.head_router(t_emb), self.training, self.temperature),
                decide(self.group_router(t_emb), self.training, self.temperature))

    def _token_decisions(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sdt:
            return x.new_ones(x.shape[:2])
        return decide(self.token_router(x), self.training, self.temperature)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, c: torch.Tensor, t_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, L, D), c: (N, cond_dim), t_emb: (N, t_dim) -> (N, L, D)."""
        if t_emb is None:
            raise ValueError("a DyDiT block needs the timestep embedding t_emb")
        fast = self.runs_fast()
        if fast and self.training:
            raise ValueError("the fast path takes hard decisions and has no router gradients; use it in eval mode")
        heads, groups = self._width_decisions(t_emb, x.shape[0], x)
        mod = self.modulation(c)
        if not fast:
            x, tokens = self._masked(x, mod, heads, groups)
        else:
            x, tokens = self._fast_grouped(x, mod, heads, groups)
        self.routing = Routing(heads, groups, tokens)
        return x

    def _masked(self, x, mod, heads, groups):
        """The block's two steps, attention heads and MLP channel groups weighted by the decisions,
        each token's MLP output by its token decision."""
        x, h = self.attention_step(x, mod, lambda h: self.attn(h, heads))
        tokens = self._token_decisions(x)

        def mlp(h: torch.Tensor) -> torch.Tensor:
            y = self.mlp(h, groups)
            return y * tokens.to(y.dtype).unsqueeze(-1)

        return self.mlp_step(x, h, mod, mlp), tokens

    def _fast_grouped(self, x, mod, heads, groups):
        """Split the batch by distinct (heads, groups) patterns; one sliced pass per pattern."""
        pattern = torch.cat([heads, groups], dim=1).bool()
        if bool((pattern == pattern[:1]).all()):
            return self._fast(x, mod, pattern[0, :self.num_heads], pattern[0, self.num_heads:])
        unique, inverse = torch.unique(pattern, dim=0, return_inverse=True)
        out, tokens = torch.empty_like(x), x.new_empty(x.shape[:2])
        for i, p in enumerate(unique):
            rows = (inverse == i).nonzero().squeeze(1)
            xo, to = self._fast(x[rows], [m[rows] for m in mod], p[:self.num_heads], p[self.num_heads:])
            out[rows], tokens[rows] = xo, to
        return out, tokens

    def _fast(self, x, mod, head_on, group_on):
        """x: (N, L, D); head_on, group_on: (H,) bool, shared by the N samples. The block's attention
        step with sliced weights; the MLP on the packed tokens that need it."""
        n, length, _ = x.shape
        x, h = self.attention_step(x, mod, lambda h: self._sliced_attention(h, head_on))
        tokens = self._token_decisions(x)
        ids = tokens.reshape(-1).nonzero().squeeze(1)  # active tokens, packed across the batch
        if ids.numel() == 0:
            return x, tokens
        mlp = lambda h: self._sliced_mlp(h, group_on)  # noqa: E731
        if ids.numel() == n * length:
            return self.mlp_step(x, h, mod, mlp), tokens
        return gated_unpack_add(x, mod[5], mlp(pack(h, ids)), ids), tokens

    def _sliced_attention(self, h: torch.Tensor, head_on: torch.Tensor) -> torch.Tensor:
        """The attention with the qkv rows and proj columns of the heads in ``head_on`` only."""
        n, length, dim = h.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        qkv, proj = self.attn.qkv, self.attn.proj
        active = int(head_on.sum())
        if active == 0:
            return proj.bias.expand(n, length, dim)
        if active == heads:
            w_qkv, b_qkv, w_proj = qkv.weight, qkv.bias, proj.weight
        else:
            idx = head_on.nonzero().squeeze(1)
            w_qkv = qkv.weight.view(3, heads, head_dim, dim)[:, idx].reshape(3 * active * head_dim, dim)
            b_qkv = qkv.bias.view(3, heads, head_dim)[:, idx].reshape(-1)
            w_proj = proj.weight.view(dim, heads, head_dim)[:, idx].reshape(dim, active * head_dim)
        return F.linear(attend(F.linear(h, w_qkv, b_qkv), active), w_proj, proj.bias)

    def _sliced_mlp(self, h: torch.Tensor, group_on: torch.Tensor) -> torch.Tensor:
        """The MLP with the fc1 rows and fc2 columns of the channel groups in ``group_on`` only."""
        fc1, fc2 = self.mlp.fc1, self.mlp.fc2
        groups = self.num_heads
        active = int(group_on.sum())
        if active == 0:
            return fc2.bias.expand(*h.shape[:-1], fc2.out_features)
        if active == groups:
            w1, b1, w2 = fc1.weight, fc1.bias, fc2.weight
        else:
            size = fc1.out_features // groups
            idx = group_on.nonzero().squeeze(1)
            w1 = fc1.weight.view(groups, size, -1)[idx].reshape(active * size, -1)
            b1 = fc1.bias.view(groups, size)[idx].reshape(-1)
            w2 = fc2.weight.view(fc2.out_features, groups, size)[:, idx].reshape(fc2.out_features, active * size)
        return F.linear(gelu(F.linear(h, w1, b1)), w2, fc2.bias)
