"""Expose K/V producers that a module computes without a submodule of its own.

Discovery and the hooks of injection.py need a module whose output holds K and V.
``nn.MultiheadAttention`` has none: ``F.multi_head_attention_forward`` applies its packed
``in_proj_weight`` inside one function. Before discovery, limeify *exposes* such modules: it
swaps the instance's class for a subclass that runs the in-projection through parameter-less
children (the weights are passed in, so parameters and state_dict keys stay the original's)
and otherwise computes exactly what the original's standard path computes, op for op. After
discovery, exposed modules no attention site uses are restored, and ``unlimeify`` restores
the rest. A new mechanism is one :class:`Restructurer` in ``RESTRUCTURERS``, keyed by the
exact type it handles (a user's subclass may override what a swapped class would drop).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LimeError


class Restructurer:
    """Exposes the K/V producers of one module type, and undoes that."""

    def expose(self, module: nn.Module) -> bool:
        """Restructure ``module`` in place; False when there is nothing to expose."""
        raise NotImplementedError

    def exposed(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def settle(self, module: nn.Module, path: str, producers: set[str]) -> bool:
        """Drop what no site uses (``producers``: the sites' K/V module paths); False: restore it all."""
        raise NotImplementedError

    def restore(self, module: nn.Module) -> None:
        raise NotImplementedError


class InProjection(nn.Module):
    """``F.linear`` of the weights its parent passes in: a K/V producer LIMe's hooks can reach.

    It owns no parameters, so the parent's state_dict is unchanged.
    """

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


def _standard_path(module: nn.Module, args: tuple) -> None:
    """No-op pre-hook on each exposed projection: ``nn.TransformerEncoderLayer`` takes its fused
    kernel, which never calls its submodules (nor LIMe's hooks), only when none of them has hooks."""


# Children of an exposed nn.MultiheadAttention, one per way F.multi_head_attention_forward
# projects its inputs (see _FORMS): packed self-attention gives [q | k | v] of the input, packed
# cross-attention with key is value [k | v] of the key, any other call K and V separately.
IN_PROJ, KV_PROJ, K_PROJ, V_PROJ = "lime_in_proj", "lime_kv_proj", "lime_k_proj", "lime_v_proj"


class LimeMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose K/V in-projection runs in ``lime_*`` children.

    The forward is the original's standard path (``MultiheadAttention.forward`` with the fast
    path off, then ``F.multi_head_attention_forward``) written out with the same tensor
    operations in the same order, so its outputs are bit-identical to it; its eval fast path
    (``torch._native_multi_head_attention``) is never taken: it would compute K and V out of
    LIMe's reach.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.is_nested or key.is_nested or value.is_nested:
            raise LimeError(
                "a NestedTensor reached a limeified nn.MultiheadAttention, whose K/V mixing needs padded "
                "tensors; pass padded inputs with key_padding_mask (nn.TransformerEncoder's own conversion "
                "to nested tensors is turned off while it is limeified)"
            )
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
            check_other=False,
        )
        if self.batch_first and is_batched:
            # Transposed so that "query is key is value" still holds: it picks the projection.
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
        """``F.multi_head_attention_forward`` (torch 2.13) with this module's arguments, the
        in-projection of K and V through the ``lime_*`` children."""
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=query.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = embed_dim // num_heads
        q, k, v = self._in_projection(query, key, value)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        # Learned bias and zero tokens are appended after the mix: they are no layer's K/V.
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if self.add_zero_attn:
            zeros = (bsz * num_heads, 1, head_dim)
            k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
            v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)
        if key_padding_mask is not None:
            F._check_key_padding_mask(key_padding_mask, src_len, bsz)
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
            if is_causal and attn_mask is None:
                raise AssertionError("FIXME: is_causal not implemented for need_weights")
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v)
            out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
            out = out.view(tgt_len, bsz, out.size(1))
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        return (out if is_batched else out.squeeze(1)), None

    def _in_projection(self, query, key, value) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``F._in_projection_packed`` / ``F._in_projection`` compute them."""
        bias = self.in_proj_bias
        if not self._qkv_same_embed_dim:
            b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
            return (F.linear(query, self.q_proj_weight, b_q), self._child(K_PROJ)(key, self.k_proj_weight, b_k),
                    self._child(V_PROJ)(value, self.v_proj_weight, b_v))
        E, w = query.size(-1), self.in_proj_weight
        if key is value and query is key:
            proj = self._child(IN_PROJ)(query, w, bias)
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return proj[0], proj[1], proj[2]
        if key is value:
            w_q, w_kv = w.split([E, E * 2])
            b_q, b_kv = (None, None) if bias is None else bias.split([E, E * 2])
            q = F.linear(query, w_q, b_q)
            kv = self._child(KV_PROJ)(key, w_kv, b_kv)
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            return q, kv[0], kv[1]
        w_q, w_k, w_v = w.chunk(3)
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        return F.linear(query, w_q, b_q), self._child(K_PROJ)(key, w_k, b_k), self._child(V_PROJ)(value, w_v, b_v)

    def _child(self, name: str) -> nn.Module:
        child = self._modules.get(name)
        if child is None:
            kept = [n for n in self._modules if n in _FORMS]
            raise LimeError(
                f"this limeified nn.MultiheadAttention takes its K/V from {kept}, as in the call it was analysed "
                f"on, and is now called as {_FORMS[name]}, whose K/V ({name!r}) LIMe does not mix; call it with "
                "query, key and value related as then, or unlimeify and limeify it again on inputs of this form"
            )
        return child


# Each child and the calls of F.multi_head_attention_forward that project through it.
_FORMS = {IN_PROJ: "self-attention (query is key is value)",
          KV_PROJ: "cross-attention with key is value (query is not)",
          K_PROJ: "attention with distinct key and value tensors, or with separate q/k/v weights",
          V_PROJ: "attention with distinct key and value tensors, or with separate q/k/v weights"}


class MultiheadAttentionRestructurer(Restructurer):
    """``nn.MultiheadAttention`` -> :class:`LimeMultiheadAttention` (class swap plus children)."""

    def expose(self, module: nn.Module) -> bool:
        module.__class__ = LimeMultiheadAttention
        names = (IN_PROJ, KV_PROJ, K_PROJ, V_PROJ) if module._qkv_same_embed_dim else (K_PROJ, V_PROJ)
        for name in names:
            child = InProjection()
            child.register_forward_pre_hook(_standard_path)
            module.add_module(name, child)
        return True

    def exposed(self, module: nn.Module) -> bool:
        return type(module) is LimeMultiheadAttention

    def settle(self, module: nn.Module, path: str, producers: set[str]) -> bool:
        unused = [name for name in _FORMS if name in module._modules and f"{path}.{name}" not in producers]
        if len(unused) == sum(name in module._modules for name in _FORMS):
            return False
        for name in unused:
            del module._modules[name]
        return True

    def restore(self, module: nn.Module) -> None:
        for name in _FORMS:
            module._modules.pop(name, None)
        module.__class__ = nn.MultiheadAttention


_NESTED = "_lime_use_nested_tensor"


class NestedTensorRestructurer(Restructurer):
    """``nn.TransformerEncoder`` turns a padded batch into a NestedTensor in its eval fast path, for
    fused layers only; LIMe's mix needs the padded batch, so that conversion is turned off."""

    def expose(self, module: nn.Module) -> bool:
        if not getattr(module, "use_nested_tensor", False):
            return False
        module.__dict__[_NESTED] = module.use_nested_tensor
        module.use_nested_tensor = False
        return True

    def exposed(self, module: nn.Module) -> bool:
        return _NESTED in module.__dict__

    def settle(self, module: nn.Module, path: str, producers: set[str]) -> bool:
        return any(type(m) is LimeMultiheadAttention for m in module.modules())

    def restore(self, module: nn.Module) -> None:
        module.use_nested_tensor = module.__dict__.pop(_NESTED)


RESTRUCTURERS: dict[type, Restructurer] = {
    nn.MultiheadAttention: MultiheadAttentionRestructurer(),
    nn.TransformerEncoder: NestedTensorRestructurer(),
}


def _exposed_by(module: nn.Module) -> Restructurer | None:
    return next((r for r in RESTRUCTURERS.values() if r.exposed(module)), None)


def expose(model: nn.Module) -> Callable[[], None]:
    """Expose every module of a registered type in ``model``; returns what undoes exactly that."""
    done = []
    for module in list(model.modules()):
        restructurer = RESTRUCTURERS.get(type(module))
        # A forward set on the instance (accelerate's dispatch hooks) would keep running the
        # original class's forward: such a module stays as it is, as if not registered.
        if restructurer is None or _exposed_by(module) is not None or "forward" in vars(module):
            continue
        if restructurer.expose(module):
            done.append((restructurer, module))

    def undo() -> None:
        for restructurer, module in reversed(done):
            if restructurer.exposed(module):
                restructurer.restore(module)

    return undo


def settle(model: nn.Module, producers: set[str]) -> None:
    """Restore the exposed modules whose exposed producers no site names (innermost first)."""
    for path, module in reversed(list(model.named_modules())):
        restructurer = _exposed_by(module)
        if restructurer is not None and not restructurer.settle(module, path, producers):
            restructurer.restore(module)


def restore(model: nn.Module) -> None:
    """Undo every exposure in ``model``: classes, children and attributes as they were."""
    for module in reversed(list(model.modules())):
        restructurer = _exposed_by(module)
        if restructurer is not None:
            restructurer.restore(module)
