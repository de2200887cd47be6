"""``PackedDecoder``: greedy decoding of a packed HF ``BitNetForCausalLM`` without HF's per-step machinery.

HF's ``generate`` spends most of a packed model's decode step outside the packed matmuls (dynamic cache objects,
mask construction, per-layer module dispatch, logits processors). This loop runs the same math over the model's own
modules and buffers: a static KV cache preallocated for the whole sequence, q/k/v and gate/up fused into one packed
matmul each (one pass over the packed weights, one int8 quantization of the shared input, which the separate layers
would each repeat with identical results), RoPE from the model's ``inv_freq``, and ``scaled_dot_product_attention``.
Logits equal the packed HF model's up to fp32 summation order in attention (``tests/nn/test_decoder.py``).
With ``int8_head=True`` the full-precision lm_head runs on a GGML Q8_0 copy of its weight (``Q8_0Linear``): a
quarter of the bytes a decode step streams for it, at a small perplexity cost (``bench/int8_head_perplexity.py``).

Example usage::

    model = pack_model(hf_bitnet_model)
    ids = PackedDecoder(model).generate(prompt_ids, max_new_tokens=32)
    ids = PackedDecoder(model, int8_head=True).generate(prompt_ids, max_new_tokens=32)
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qat.errors import QATError
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


@dataclass
class _Block:
    """One decoder layer's modules, with q/k/v and gate/up fused."""
    input_norm: nn.Module
    qkv: PackedLinear
    attn_sub_norm: nn.Module
    o_proj: nn.Module
    post_norm: nn.Module
    gate_up: PackedLinear
    act: nn.Module
    ffn_sub_norm: nn.Module
    down_proj: nn.Module


class PackedDecoder:
    """Greedy decoder over a packed ``BitNetForCausalLM`` (``pack_model`` output), sharing its weights.

    ``int8_head``: compute the logits with a Q8_0 copy of the full-precision lm_head weight (int8, one scale per
    block of 32 inputs) instead of the fp32 weight.

    Raises:
        DecoderError: the model is not a packed HF BitNet model (layout, int8 activations, sub-norms), or
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
        self.embed, self.norm, self.lm_head = inner.embed_tokens, inner.norm, model.lm_head
        if int8_head:
            if not isinstance(model.lm_head, nn.Linear):
                raise DecoderError(f"int8_head quantizes a full-precision linear lm_head; this model's is "
                                   f"{type(model.lm_head).__name__}. Decode without int8_head")
            self.lm_head = Q8_0Linear.from_linear(model.lm_head)
        rotary = inner.rotary_emb
        if getattr(rotary, "rope_type", "default") != "default":
            raise DecoderError(f"the packed decoder implements default RoPE, this model uses {rotary.rope_type!r}")
        self.inv_freq, self.rope_scaling = rotary.inv_freq.float(), float(rotary.attention_scaling)
        self.blocks = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            check_packed([attn.o_proj])
            check_packed([mlp.down_proj])
            self.blocks.append(_Block(
                layer.input_layernorm, fuse_packed_linears([attn.q_proj, attn.k_proj, attn.v_proj]),
                attn.attn_sub_norm, attn.o_proj, layer.post_attention_layernorm,
                fuse_packed_linears([mlp.gate_proj, mlp.up_proj]), mlp.act_fn, mlp.ffn_sub_norm, mlp.down_proj))
        self.q_size, self.kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.k_cache = self.v_cache = None
        self.length = 0

    def reset(self, max_len: int) -> None:
        """Empty the cache and allocate it for ``max_len`` positions."""
        shape = (len(self.blocks), 1, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.embed.weight.dtype)
        self.v_cache = torch.zeros(shape, dtype=self.embed.weight.dtype)
        self.length = 0

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # As BitNetRotaryEmbedding: fp32 angles, cos/sin of the duplicated frequencies, cast to the activations' dtype.
        freqs = positions[:, None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.rope_scaling).to(dtype), (emb.sin() * self.rope_scaling).to(dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits (1, T, vocab) of ``ids`` (1, T), which continue the cached sequence (``reset`` first); with
        ``last_only`` those of the last position only (1, 1, vocab), all that greedy decoding reads."""
        if self.k_cache is None:
            raise DecoderError("call reset(max_len) before forward")
        tokens = ids.shape[1]
        start, end = self.length, self.length + tokens
        if end > self.k_cache.shape[3]:
            raise DecoderError(f"sequence of {end} tokens exceeds the cache of {self.k_cache.shape[3]}; reset with "
                               "a larger max_len")
        x = self.embed(ids)
        cos, sin = self._rope(torch.arange(start, end), x.dtype)
        cos, sin = cos[None, :, None], sin[None, :, None]   # (1, T, 1, head_dim): over (1, T, heads, head_dim)
        # New queries see every cached position and the new ones up to their own (causal within the block).
        mask = None if tokens == 1 else torch.ones(tokens, end, dtype=torch.bool).tril(start)
        groups = self.heads // self.kv_heads
        for i, block in enumerate(self.blocks):
            h = block.input_norm(x)
            qk, v = block.qkv(h).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
            # q and k heads are adjacent in the fused output: one rotation for both.
            qk = self._rotate(qk.view(1, tokens, self.heads + self.kv_heads, self.head_dim), cos, sin).transpose(1, 2)
            q, k = qk[:, :self.heads], qk[:, self.heads:]
            self.k_cache[i, :, :, start:end] = k
            self.v_cache[i, :, :, start:end] = v.view(1, tokens, self.kv_heads, self.head_dim).transpose(1, 2)
            keys, values = self.k_cache[i, :, :, :end], self.v_cache[i, :, :, :end]
            if groups > 1:
                keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim ** -0.5)
            a = block.attn_sub_norm(a.transpose(1, 2).reshape(1, tokens, self.q_size))
            x = x + block.o_proj(a)
            h = block.post_norm(x)
            gate, up = block.gate_up(h).chunk(2, dim=-1)
            x = x + block.down_proj(block.ffn_sub_norm(block.act(gate) * up))
        self.length = end
        # The head over every prompt position is a vocab-wide GEMM that greedy decoding never reads.
        return self.lm_head(self.norm(x[:, -1:] if last_only else x))

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
