"""``PackedDecoder``: greedy decoding of a packed HF ``BitNetForCausalLM`` without HF's per-step machinery.

HF's ``generate`` spends most of a packed model's decode step outside the packed matmuls (dynamic cache objects,
mask construction, per-layer module dispatch, logits processors). This loop runs the same math on the model's own
weights: a static KV cache preallocated for the whole sequence, q/k/v and up/gate fused into one packed matmul each
(one pass over the packed weights, one int8 quantization of the shared input, which the separate layers would each
repeat with identical results), called straight on their kernel, which also computes the RMSNorm before each of
them. A decode step's work between the matmuls is a short fixed list of calls on preallocated buffers (5 per layer,
where HF's modules take about 70): the attention of the new position is one native call bound to the cache
(``qat.kernels.attention``: RoPE on q/k rows in Meta's pair order, the cache write, softmax(qK)V with GQA without
copies); a prompt (several positions) runs RoPE as one complex multiply and ``scaled_dot_product_attention``.
Logits equal the packed HF model's to fp32 rounding, which differs in the last bit from HF's modules and so can move
an int8 activation code that lands at a rounding boundary by one step, as between an fp32 HF export and its QAT
model (``qat/eval/agreement.py``; ``tests/nn/test_decoder.py``).
With ``int8_head=True`` the full-precision lm_head runs on a GGML Q8_0 copy of its weight (``Q8_0Linear``): a
quarter of the bytes a decode step streams for it, at a small perplexity cost (``bench/int8_head_perplexity.py``).

Example usage::

    model = pack_model(hf_bitnet_model)
    ids = PackedDecoder(model).generate(prompt_ids, max_new_tokens=32)
    ids = PackedDecoder(model, int8_head=True).generate(prompt_ids, max_new_tokens=32)
"""

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ReLUSquaredActivation, SiLUActivation

from qat.errors import QATError
from qat.kernels.attention import bind_decode_attention
from qat.kernels.packed_linear import bind_packed_linear, rms_norm
from qat.nn.packed_linear import PACKERS, PackedLinear, Q8_0Linear


class DecoderError(QATError, ValueError):
    """The model is not one the packed decoder can run (it then runs with HF ``generate``)."""


def check_packed(layers: list[nn.Module]) -> None:
    """Raises DecoderError unless ``layers`` are ``PackedLinear`` with int8 activations, no in-layer norm, and one
    input size, bit width and group size (what one fused packed matmul needs)."""
    first = layers[0]
    for layer in layers:
        if not isinstance(layer, PackedLinear):
            raise DecoderError(f"expected packed layers, got {type(layer).__name__}; pack the model with "
                               "qat.nn.packed_linear.pack_model first")
        same = (layer.in_features, layer.bits, layer.group_size, layer.scale.shape[1]) == \
            (first.in_features, first.bits, first.group_size, first.scale.shape[1])
        if not same or layer.rms_norm is not None or layer.activation != "int8_per_token":
            raise DecoderError("the packed decoder runs layers with int8 activations and no in-layer norm "
                               "(norm_placement: subln), fused layers with one input size, bit width and group "
                               f"size; this model has {layer!r}. Decode it with HF generate instead")


def fuse_packed_linears(layers: list[PackedLinear]) -> PackedLinear:
    """One ``PackedLinear`` whose output is the concatenation of ``layers``' outputs on the same input.

    Rows of every layout are independent and the activation quantization is per token, so each output row is the
    same integer dot and the same fp32 epilogue as in its own layer: the fused output is bit-identical.

    Raises:
        DecoderError: the layers differ in input size, bits, group size or activation, or normalise in-layer.
    """
    check_packed(layers)
    first = layers[0]
    codes = torch.cat([layer.codes() for layer in layers])
    scale = torch.cat([layer.scale for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias.float() if layer.bias is not None else torch.zeros(layer.out_features)
                          for layer in layers])
    return PackedLinear(first.in_features, codes.shape[0], first.bits, PACKERS[first.bits](codes), scale,
                        first.group_size, first.activation, bias)


def rms_floor(n: int, eps: float) -> float:
    """The value that follows each row of ``rms_norm``'s ``x_and_floor``: sqrt(n) * sqrt(mean(x²) + eps) =
    sqrt(sum(x²) + n * eps)."""
    return math.sqrt(n * eps)


def rms_norm_weight(norm: nn.Module) -> torch.Tensor:
    """``rms_norm``'s ``weight`` for an HF ``BitNetRMSNorm`` over n features: its weight times sqrt(n)."""
    return norm.weight.detach().float() * math.sqrt(norm.weight.shape[-1])


def attention_qkv(attn: nn.Module, heads: int, kv_heads: int, head_dim: int) -> PackedLinear:
    """q/k/v of ``attn`` fused into one ``PackedLinear`` (``fuse_packed_linears``) whose output holds, per q and k
    head, RoPE's pairs (i, i + head_dim / 2) of HF's ``rotate_half`` layout as adjacent values, the pair layout of
    Meta's LLaMA code (HF's conversion permutes the weight rows the other way): the rotation is then one in-place
    complex multiply. q and k are permuted alike, so their dot products are unchanged. The q rows' scales carry
    attention's 1 / sqrt(head_dim) (exact for a power-of-4 ``head_dim``; to fp32 rounding otherwise).

    Raises:
        DecoderError: as ``fuse_packed_linears``.
    """
    fused = fuse_packed_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    pairs = torch.arange(head_dim).view(2, -1).t().reshape(-1)           # 0, d/2, 1, d/2 + 1, ...
    rope_rows = (torch.arange(heads + kv_heads)[:, None] * head_dim + pairs).reshape(-1)
    order = torch.cat((rope_rows, torch.arange(len(rope_rows), fused.out_features)))
    q_rows = heads * head_dim
    scale = fused.scale[order].clone()
    scale[:q_rows] *= head_dim ** -0.5
    bias = None
    if fused.bias is not None:
        bias = fused.bias.float()[order].clone()
        bias[:q_rows] *= head_dim ** -0.5
    return PackedLinear(fused.in_features, fused.out_features, fused.bits, PACKERS[fused.bits](fused.codes()[order]),
                        scale, fused.group_size, fused.activation, bias)


def rope_table(inv_freq: torch.Tensor, scaling: float, positions: int) -> torch.Tensor:
    """``cos + i sin`` of every position and frequency, complex (positions, 1, head_dim / 2): RoPE of a head whose
    pairs are adjacent values (``attention_qkv``) is its complex view times this. As ``BitNetRotaryEmbedding``: fp32
    angles, cos and sin scaled by its attention scaling."""
    freqs = torch.arange(positions).float()[:, None] * inv_freq
    return torch.complex(freqs.cos() * scaling, freqs.sin() * scaling)[:, None]


def _bind(layer: PackedLinear, norm_weight: torch.Tensor, residual: bool = False, gated_activation: str | None = None
          ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(x_and_floor, out) -> out``: ``layer`` on the ``rms_norm`` of its input, the norm, the bias and the epilogues
    (``residual``, ``gated_activation``) inside the native call (``bind_packed_linear``)."""
    return bind_packed_linear(layer.packed, layer.scale, layer.bits, layer.in_features, layer.group_size, norm_weight,
                              None if layer.bias is None else layer.bias.float(), residual, gated_activation)


def gated_activation_name(act: nn.Module) -> str | None:
    """The ``GATED_ACTIVATIONS`` name of an FFN activation module (the up/gate matmul's epilogue computes it), or
    None for one it does not implement (the decoder then applies the module itself)."""
    if isinstance(act, nn.SiLU | SiLUActivation):
        return "silu"
    if isinstance(act, ReLUSquaredActivation):
        return "relu2"
    return None


def _activation(act: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``act`` applied in place (the gate's buffer is the FFN product's)."""
    return lambda gate: gate.copy_(act(gate))


class _Layer(NamedTuple):
    """One decoder layer, as the forward loop unpacks it: its packed matmuls with q/k/v and up/gate fused
    (``attention_qkv``, ``fuse_packed_linears``), each bound to its kernel with the norm before it (input, attention
    sub-norm, post-attention, FFN sub-norm; ``bind_packed_linear``: ``(x_and_floor, out) -> out``), o and down adding
    into the residual stream, up/gate leaving the FFN product in its gate half; ``act``: None, or the FFN activation
    (in place) where the up/gate call does not compute it (``gated_activation_name``)."""
    qkv: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    o_proj: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    up_gate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    down_proj: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor] | None


class _Buffers:
    """The activations of a forward over ``tokens`` positions, which every layer overwrites in turn, and the views the
    layers read of them (one decode step reuses one set: no allocation, no view op per layer). The inputs of norms
    (residual stream, attention output, FFN product) each have a last column holding ``rms_floor``. A prompt's
    attention reads the q/k/v views; a decode step's (``bind_decode_attention``) reads ``qkv`` itself."""

    def __init__(self, tokens: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, eps: float):
        q_size = heads * head_dim
        self.residual = torch.empty(tokens, q_size + 1)
        self.residual[:, -1] = rms_floor(q_size, eps)
        self.x = self.residual[:, :-1]                                # (T, hidden)
        self.qkv = torch.empty(tokens, q_size + 2 * kv_heads * head_dim)
        pairs = self.qkv.view(tokens, heads + 2 * kv_heads, head_dim // 2, 2)
        self.qk = torch.view_as_complex(pairs[:, :heads + kv_heads])   # q and k heads, rotated in place
        self.new_kv = self.qkv[:, q_size:].view(tokens, 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        q = self.qkv[:, :q_size]
        self.attn_and_floor = torch.empty(tokens, q_size + 1)
        self.attn_and_floor[:, -1] = rms_floor(q_size, eps)
        self.attn = self.attn_and_floor[:, :-1]
        # (1, heads, T, head_dim) for sdpa, and (heads, T, head_dim) over the output buffer
        self.q = q.view(tokens, heads, head_dim).transpose(0, 1)[None]
        self.attn_heads = self.attn.view(tokens, heads, head_dim).transpose(0, 1)
        # up, then gate: the FFN product act(gate) * up is computed over gate, followed by the floor.
        self.up_gate_and_floor = torch.empty(tokens, 2 * intermediate + 1)
        self.up_gate_and_floor[:, -1] = rms_floor(intermediate, eps)
        self.up_gate = self.up_gate_and_floor[:, :-1]
        self.up, self.gate = self.up_gate.chunk(2, dim=-1)
        self.ffn_and_floor = self.up_gate_and_floor[:, intermediate:]


class PackedDecoder:
    """Greedy decoder over a packed ``BitNetForCausalLM`` (``pack_model`` output, float32), sharing its weights.

    ``int8_head``: compute the logits with a Q8_0 copy of the full-precision lm_head weight (int8, one scale per
    block of 32 inputs) instead of the fp32 weight.

    Raises:
        DecoderError: the model is not a float32 packed HF BitNet model (layout, int8 activations, sub-norms), or
            ``int8_head`` with an lm_head that is not a plain linear layer.
    """

    def __init__(self, model: nn.Module, int8_head: bool = False):
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) != "bitnet":
            raise DecoderError(f"the packed decoder runs HF BitNetForCausalLM models, got "
                               f"{getattr(config, 'model_type', type(model).__name__)!r}")
        self.model, self.config = model, config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        inner = model.model
        if inner.embed_tokens.weight.dtype != torch.float32:
            raise DecoderError(f"the packed decoder computes in float32 (the packed kernels' output), this model is "
                               f"{inner.embed_tokens.weight.dtype}; load it with dtype=torch.float32")
        if self.heads * self.head_dim != config.hidden_size:
            raise DecoderError(f"the packed decoder needs heads x head_dim == hidden_size, this model has "
                               f"{self.heads} x {self.head_dim} != {config.hidden_size}")
        self.embed, self.lm_head = inner.embed_tokens, model.lm_head
        if int8_head:
            if not isinstance(model.lm_head, nn.Linear):
                raise DecoderError(f"int8_head quantizes a full-precision linear lm_head; this model's is "
                                   f"{type(model.lm_head).__name__}. Decode without int8_head")
            self.lm_head = Q8_0Linear.from_linear(model.lm_head)
        rotary = inner.rotary_emb
        if getattr(rotary, "rope_type", "default") != "default":
            raise DecoderError(f"the packed decoder implements default RoPE, this model uses {rotary.rope_type!r}")
        self.inv_freq, self.rope_scaling = rotary.inv_freq.float(), float(rotary.attention_scaling)
        self.layers, norms = [], [inner.norm]
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            check_packed([attn.o_proj])
            check_packed([mlp.down_proj])
            qkv = attention_qkv(attn, self.heads, self.kv_heads, self.head_dim)
            up_gate = fuse_packed_linears([mlp.up_proj, mlp.gate_proj])
            layer_norms = (layer.input_layernorm, attn.attn_sub_norm, layer.post_attention_layernorm, mlp.ffn_sub_norm)
            weights = [rms_norm_weight(norm) for norm in layer_norms]
            gated = gated_activation_name(mlp.act_fn)
            self.layers.append(_Layer(_bind(qkv, weights[0]), _bind(attn.o_proj, weights[1], residual=True),
                                      _bind(up_gate, weights[2], gated_activation=gated),
                                      _bind(mlp.down_proj, weights[3], residual=True),
                                      None if gated else _activation(mlp.act_fn)))
            norms += layer_norms
        self.final_norm = rms_norm_weight(inner.norm)
        eps = {norm.variance_epsilon for norm in norms}
        if len(eps) != 1:   # one floor column per buffer (rms_norm)
            raise DecoderError(f"the packed decoder runs norms with one eps, this model's have {sorted(eps)}")
        self.eps = eps.pop()
        self.q_size = self.heads * self.head_dim
        self.kv_cache = self.rope = self.attend = None
        self.step_buffers = self._buffers(1)
        self.length = 0

    def _buffers(self, tokens: int) -> _Buffers:
        return _Buffers(tokens, self.heads, self.kv_heads, self.head_dim, self.config.intermediate_size, self.eps)

    def reset(self, max_len: int) -> None:
        """Empty the cache and allocate it, and the RoPE table, for ``max_len`` positions."""
        # Per layer keys then values, (2, kv_heads, max_len, head_dim): one copy writes both of new positions.
        # Keys hold their head dims in the pair order of ``attention_qkv``, as the queries do.
        self.kv_cache = torch.zeros(len(self.layers), 2, self.kv_heads, max_len, self.head_dim)
        self.rope = rope_table(self.inv_freq, self.rope_scaling, max_len)
        self.attend = bind_decode_attention(self.rope, self.kv_cache)
        self.length = 0

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits (1, T, vocab) of ``ids`` (1, T), which continue the cached sequence (``reset`` first); with
        ``last_only`` those of the last position only (1, 1, vocab), all that greedy decoding reads."""
        if self.kv_cache is None:
            raise DecoderError("call reset(max_len) before forward")
        tokens = ids.shape[1]
        start, end = self.length, self.length + tokens
        if end > self.kv_cache.shape[3]:
            raise DecoderError(f"sequence of {end} tokens exceeds the cache of {self.kv_cache.shape[3]}; reset "
                               "with a larger max_len")
        # Per layer, a fixed list of calls on preallocated buffers and views: in a decode step each costs more than
        # its arithmetic (more still right after a packed matmul has streamed megabytes of weights through the
        # caches), so every op, view and module call left out counts.
        step = tokens == 1
        buf = self.step_buffers if step else self._buffers(tokens)
        residual, x, qkv, attn_and_floor = buf.residual, buf.x, buf.qkv, buf.attn_and_floor
        up_gate, up, gate, ffn_and_floor = buf.up_gate, buf.up, buf.gate, buf.ffn_and_floor
        if step:
            attend, attn = self.attend, buf.attn
        else:
            rope = self.rope[start:end]                             # (T, 1, head_dim / 2) complex
            slots = self.kv_cache[:, :, :, start:end].unbind(0)     # per layer (2, kv_heads, T, head_dim)
            keys, values = self.kv_cache[:, 0, :, :end].unbind(0), self.kv_cache[:, 1, :, :end].unbind(0)
            # New queries see every cached position and the new ones up to their own (causal within the block).
            mask = None if start == 0 else torch.ones(tokens, end, dtype=torch.bool).tril(start)
            gqa = self.heads > self.kv_heads
        x.copy_(F.embedding(ids[0], self.embed.weight))
        # Each packed matmul normalizes its input itself (``_bind``): it reads the buffer with the floor column.
        for index, (qkv_proj, o_proj, up_gate_proj, down_proj, act) in enumerate(self.layers):
            qkv_proj(residual, qkv)   # q comes out scaled by 1 / sqrt(head_dim)
            if step:
                attend(qkv, index, start, attn)
            else:
                buf.qk.mul_(rope)
                slots[index].copy_(buf.new_kv)
                buf.attn_heads.copy_(F.scaled_dot_product_attention(
                    buf.q, keys[index][None], values[index][None], attn_mask=mask, is_causal=mask is None,
                    scale=1.0, enable_gqa=gqa)[0])
            o_proj(attn_and_floor, x)                               # adds into the residual stream
            up_gate_proj(residual, up_gate)                         # the FFN product, over gate
            if act is not None:
                act(gate).mul_(up)
            down_proj(ffn_and_floor, x)
        self.length = end
        # The head over every prompt position is a vocab-wide GEMM that greedy decoding never reads.
        if last_only:
            x, residual = x[-1:], residual[-1:]
        return self.lm_head(rms_norm(x, residual, self.final_norm))[None]

    def sequence_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of ``ids`` (B, T), each row a sequence of its own from an empty cache: what the
        packed model's forward returns for an unpadded batch (held-out perplexity in ``qat eval``)."""
        logits = []
        for row in ids:
            self.reset(ids.shape[1])
            logits.append(self.forward(row[None]))
        return torch.cat(logits)

    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None
                 ) -> torch.Tensor:
        """Greedy continuation of ``ids`` (1, T): ``ids`` followed by up to ``max_new_tokens`` tokens, stopping after
        an end-of-sequence token (``eos_token_id``, default the model's generation config) as HF ``generate`` does.
        """
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise DecoderError(f"the packed decoder decodes one sequence, shape (1, T); got {tuple(ids.shape)}")
        if eos_token_id is None:
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        self.reset(ids.shape[1] + max_new_tokens)
        out = [ids]
        logits = self.forward(ids, last_only=True)
        for _ in range(max_new_tokens):
            token = logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            if int(token) in eos or len(out) - 1 == max_new_tokens:
                break
            logits = self.forward(token)
        return torch.cat(out, dim=1)
