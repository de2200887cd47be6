"""Independent float64 references of the quantized math (formulas from the BitNet b1.58 FAQ), written without
qat's code, for the tests to compare against."""

import numpy as np


def absmean_ternary_ref(w: np.ndarray) -> tuple[np.ndarray, float]:
    scale = max(np.abs(w).mean(), 1e-5)
    return np.clip(np.round(w / scale), -1, 1), scale


def absmedian_ternary_ref(w: np.ndarray) -> tuple[np.ndarray, float]:
    a = np.sort(np.abs(w).reshape(-1))
    scale = max(a[(a.size - 1) // 2], 1e-5)  # lower median, as torch.median
    return np.clip(np.round(w / scale), -1, 1), scale


def int8_per_token_ref(x: np.ndarray) -> np.ndarray:
    scale = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
    return np.clip(np.round(x * scale), -128, 127) / scale


def bitlinear_ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    codes, scale = absmean_ternary_ref(w)
    return int8_per_token_ref(x) @ (codes * scale).T


def rms_norm_ref(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * weight


def rope_ref(x: np.ndarray, theta: float) -> np.ndarray:
    """x: (heads, T, d); HF rotate-half RoPE."""
    d, t = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (np.arange(0, d, 2) / d)
    freqs = np.outer(np.arange(t), inv_freq)
    emb = np.concatenate([freqs, freqs], -1)
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def bitnet_forward_ref(w: dict[str, np.ndarray], ids: np.ndarray, n_layers: int, n_heads: int, eps: float,
                       theta: float) -> np.ndarray:
    """Logits of HF BitNetForCausalLM (SubLN, ReLU², RoPE, MHA) with BitLinear q/k/v/o/gate/up/down, one sequence."""
    h = w["model.embed_tokens.weight"][ids]
    t = len(ids)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        x = rms_norm_ref(h, w[p + "input_layernorm.weight"], eps)
        heads = [bitlinear_ref(x, w[p + f"self_attn.{n}_proj.weight"]) for n in "qkv"]
        q, k, v = (a.reshape(t, n_heads, -1).transpose(1, 0, 2) for a in heads)
        q, k = rope_ref(q, theta), rope_ref(k, theta)
        scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1]) + np.triu(np.full((t, t), -np.inf), 1)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = (probs @ v).transpose(1, 0, 2).reshape(t, -1)
        attn = rms_norm_ref(attn, w[p + "self_attn.attn_sub_norm.weight"], eps)
        h = h + bitlinear_ref(attn, w[p + "self_attn.o_proj.weight"])
        x = rms_norm_ref(h, w[p + "post_attention_layernorm.weight"], eps)
        gate = bitlinear_ref(x, w[p + "mlp.gate_proj.weight"])
        up = bitlinear_ref(x, w[p + "mlp.up_proj.weight"])
        act = rms_norm_ref(np.maximum(gate, 0) ** 2 * up, w[p + "mlp.ffn_sub_norm.weight"], eps)
        h = h + bitlinear_ref(act, w[p + "mlp.down_proj.weight"])
    h = rms_norm_ref(h, w["model.norm.weight"], eps)
    return h @ w["lm_head.weight"].T
