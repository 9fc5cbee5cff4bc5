"""Small reusable parts of the Vision Transformer: attention, MLP, encoder block, drop path,
patch dropout."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionImpl = Literal["auto", "sdpa", "eager"]


def lecun_normal_(tensor: torch.Tensor) -> torch.Tensor:
    """JAX's ``lecun_normal``: truncated normal (±2σ) with variance 1/fan_in.

    JAX corrects the standard deviation for the truncation (σ / 0.8796), so the variance of
    the truncated samples is exactly 1/fan_in.
    """
    fan_in = tensor[0].numel()
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class Linear(nn.Linear):
    """``nn.Linear`` that keeps its autocast copy of the weights while they do not change.

    Autocast casts the fp32 weights to the low-precision dtype on every call: its own weight
    cache is skipped under ``torch.inference_mode`` and emptied on leaving each ``autocast``
    block. At batch 1 that cast was half of a bf16 ViT-B/16 forward on CPU. With no gradient
    tracked, this layer casts once and reuses the copy until the parameters are modified in
    place (their version counter moves) or replaced; the result is autocast's, bit for bit.
    The copy costs half the layer's fp32 size in memory and is dropped when the module moves.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (key, sources, low-precision parameters). The sources are detached aliases that keep
        # the cast-from storage alive, so its address cannot be reused by a new tensor whose
        # version counter happens to match.
        self._autocast_copy: tuple[Any, list[torch.Tensor], list[torch.Tensor | None]] | None
        self._autocast_copy = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # the compiled graph fuses the cast; no recompiles
            or not torch.amp.is_autocast_available(device)  # e.g. the meta device
            or not torch.is_autocast_enabled(device)
            or self.weight.dtype != torch.float32
            or x.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        ):
            return super().forward(x)
        dtype = torch.get_autocast_dtype(device)
        params = (self.weight, self.bias)
        key = (dtype, *((p.data_ptr(), p._version) for p in params if p is not None))
        if self._autocast_copy is None or self._autocast_copy[0] != key:
            sources = [p.detach() for p in params if p is not None]
            low: list[torch.Tensor | None] = [
                None if p is None else p.detach().to(dtype) for p in params
            ]
            self._autocast_copy = (key, sources, low)
        weight, bias = self._autocast_copy[2]
        assert weight is not None  # only the bias is optional
        with torch.autocast(device, enabled=False):
            return F.linear(x.to(dtype), weight, bias)

    def _apply(self, fn: Any, recurse: bool = True) -> Linear:
        self._autocast_copy = None
        return super()._apply(fn, recurse)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchDropout(nn.Module):
    """Patch dropout (Liu et al., "PatchDropout: Economizing Vision Transformers Using Patch
    Dropout", WACV 2023; timm's ``patch_drop_rate``): while training, each image keeps a random
    ``1 - p`` of its patch tokens, at least one, and drops the rest before the encoder; the
    first ``num_prefix`` tokens (the [class] token) are always kept. The encoder's cost falls
    with the tokens, and the random subset acts as a regulariser; evaluation sees every token.
    The kept tokens stay in a random order: the encoder is blind to order except through the
    position embeddings, which were added before the drop."""

    def __init__(self, p: float = 0.0, num_prefix: int = 1) -> None:
        super().__init__()
        self.p = p
        self.num_prefix = num_prefix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        prefix, patches = x[:, : self.num_prefix], x[:, self.num_prefix :]
        batch, count = patches.shape[:2]
        keep = max(1, int(count * (1.0 - self.p)))
        chosen = torch.rand(batch, count, device=x.device).argsort(dim=1)[:, :keep]
        kept = patches.gather(1, chosen.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        return torch.cat([prefix, kept], dim=1)

    def extra_repr(self) -> str:
        return f"p={self.p}, num_prefix={self.num_prefix}"


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection.

    ``bias`` (optional, broadcastable to (B, heads, N, N)) is added to the logits; the
    relative position embedding uses it. ``impl`` picks how softmax(QK^T)V is computed:
    ``"sdpa"`` (``scaled_dot_product_attention``), ``"eager"`` (the explicit product) or
    ``"auto"``, which takes the faster one measured for the device, dtype and pass
    (``benchmarks/train_step.py`` and ``benchmarks/inference.py``, ``--attn auto sdpa eager``):
    the explicit product when a CPU trains in bf16 or fp16 (SDPA's CPU backward is several
    times slower there: 2-5x on an AMD EPYC Zen 4), SDPA everywhere else (level or faster in
    fp32, in inference and on GPUs). The explicit path also runs whenever the probabilities
    are returned; both give the same numbers (tests/test_models.py).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: AttentionImpl = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.qkv = Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, N, C = x.shape
        q, k, v = self.project(x)
        bias = self.logit_bias(bias, q)
        drop = self.attn_drop if self.training else 0.0
        probs = None
        if return_attention or self._explicit(q):
            logits = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            if bias is not None:
                logits = logits + bias
            probs = logits.softmax(dim=-1)
            out = F.dropout(probs, drop, self.training) @ v
        else:
            if bias is not None:
                bias = bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
        out = self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))
        return out, (probs if return_attention else None)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, each (B, heads, N, head_dim); the logits are their
        product times ``head_dim ** -0.5``. A variant may rescale the queries here."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def logit_bias(self, bias: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
        """What is added to the logits: ``bias`` as given; a variant may mask logits here."""
        return bias

    def _explicit(self, q: torch.Tensor) -> bool:
        """Whether this call computes softmax(QK^T)V explicitly rather than through SDPA."""
        if self.impl != "auto":
            return self.impl == "eager"
        low_precision = q.dtype in (torch.bfloat16, torch.float16)
        return q.device.type == "cpu" and low_precision and q.requires_grad


class Mlp(nn.Module):
    """Dense → GELU → dropout → Dense → dropout, as the official ``MlpBlock``."""

    def __init__(self, dim: int, hidden: int, gelu: str = "tanh", drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU(approximate=gelu)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm encoder block: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool = True,
        eps: float = 1e-6,
        gelu: str = "tanh",
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        attn_impl: AttentionImpl = "auto",
        attention: type[Attention] = Attention,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = attention(dim, num_heads, qkv_bias, attn_drop, drop, attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, gelu, drop)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, probs = self.attn(self.norm1(x), bias, return_attention)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, probs

    def init_weights(self) -> None:
        """The official initialisation: xavier-uniform kernels, MLP biases N(0, 1e-6)."""
        dim = self.attn.proj.in_features
        # Xavier bound of each of the q, k, v (dim, dim) matrices, not of the fused one.
        bound = math.sqrt(6.0 / (dim + dim))
        nn.init.uniform_(self.attn.qkv.weight, -bound, bound)
        if self.attn.qkv.bias is not None:
            nn.init.zeros_(self.attn.qkv.bias)
        nn.init.xavier_uniform_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)
        for fc in (self.mlp.fc1, self.mlp.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)
