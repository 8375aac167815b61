"""An independent numpy implementation of Hugging Face's LlamaForCausalLM training math.

Written from the transformers modelling code's definitions (rotate_half RoPE, fp32
RMSNorm, repeat_kv for grouped-query heads, SiLU-gated MLP, untied LM head, mean
cross-entropy over non-ignored targets), with a hand-written backward. It computes in
float64, materialises the full causal score matrix and shares no code with the engine.
"""
import numpy as np


def rms_norm(x, w, eps):
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return w * (x * r), r


def rms_norm_backward(dy, x, w, r):
    c = x.shape[-1]
    wdy = w * dy
    dx = r * wdy - x * r**3 * np.sum(wdy * x, axis=-1, keepdims=True) / c
    dw = np.sum(dy * x * r, axis=tuple(range(x.ndim - 1)))
    return dx, dw


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rotate_half_transposed(x):
    half = x.shape[-1] // 2
    return np.concatenate([x[..., half:], -x[..., :half]], axis=-1)


def rope_cos_sin(seq, dim, theta):
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    freqs = np.outer(np.arange(seq, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb), np.sin(emb)  # [T, D]


def silu(x):
    return x / (1.0 + np.exp(-x))


class Llama:
    def __init__(self, config, params):
        """params: dict of Hugging Face names to float64 arrays."""
        self.c = config
        self.p = params

    def _layer(self, i, x, cos, sin, cache):
        c, p = self.c, self.p
        pre = f"model.layers.{i}."
        B, T, C = x.shape
        H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        D, G = C // H, H // Hkv
        h1, r1 = rms_norm(x, p[pre + "input_layernorm.weight"], c["rms_norm_eps"])
        q = (h1 @ p[pre + "self_attn.q_proj.weight"].T).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        k = (h1 @ p[pre + "self_attn.k_proj.weight"].T).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        v = (h1 @ p[pre + "self_attn.v_proj.weight"].T).reshape(B, T, Hkv, D).transpose(0, 2, 1, 3)
        qr = q * cos + rotate_half(q) * sin
        kr = k * cos + rotate_half(k) * sin
        k_rep, v_rep = np.repeat(kr, G, axis=1), np.repeat(v, G, axis=1)  # repeat_kv
        scores = qr @ k_rep.transpose(0, 1, 3, 2) / np.sqrt(D)
        mask = np.triu(np.ones((T, T), dtype=bool), k=1)
        scores = np.where(mask, -np.inf, scores)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = (probs @ v_rep).transpose(0, 2, 1, 3).reshape(B, T, C)
        x_mid = x + attn @ p[pre + "self_attn.o_proj.weight"].T
        h2, r2 = rms_norm(x_mid, p[pre + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        gate = h2 @ p[pre + "mlp.gate_proj.weight"].T
        up = h2 @ p[pre + "mlp.up_proj.weight"].T
        act = silu(gate) * up
        out = x_mid + act @ p[pre + "mlp.down_proj.weight"].T
        cache.append(dict(x=x, h1=h1, r1=r1, qr=qr, k_rep=k_rep, v_rep=v_rep, probs=probs,
                          attn=attn, x_mid=x_mid, h2=h2, r2=r2, gate=gate, up=up, act=act))
        return out

    def _layer_backward(self, i, dout, a, cos, sin, grads):
        c, p = self.c, self.p
        pre = f"model.layers.{i}."
        B, T, C = dout.shape
        H, Hkv = c["num_attention_heads"], c["num_key_value_heads"]
        D, G = C // H, H // Hkv
        flat = lambda t: t.reshape(-1, t.shape[-1])
        # MLP
        grads[pre + "mlp.down_proj.weight"] = flat(dout).T @ flat(a["act"])
        dact = dout @ p[pre + "mlp.down_proj.weight"]
        sig = 1.0 / (1.0 + np.exp(-a["gate"]))
        dup = dact * silu(a["gate"])
        dgate = dact * a["up"] * sig * (1 + a["gate"] * (1 - sig))
        grads[pre + "mlp.gate_proj.weight"] = flat(dgate).T @ flat(a["h2"])
        grads[pre + "mlp.up_proj.weight"] = flat(dup).T @ flat(a["h2"])
        dh2 = dgate @ p[pre + "mlp.gate_proj.weight"] + dup @ p[pre + "mlp.up_proj.weight"]
        dx_mid, dw2 = rms_norm_backward(dh2, a["x_mid"], p[pre + "post_attention_layernorm.weight"], a["r2"])
        grads[pre + "post_attention_layernorm.weight"] = dw2
        dx_mid = dx_mid + dout
        # Attention
        grads[pre + "self_attn.o_proj.weight"] = flat(dx_mid).T @ flat(a["attn"])
        dattn = (dx_mid @ p[pre + "self_attn.o_proj.weight"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        probs = a["probs"]
        dv_rep = probs.transpose(0, 1, 3, 2) @ dattn
        dprobs = dattn @ a["v_rep"].transpose(0, 1, 3, 2)
        dscores = probs * (dprobs - np.sum(dprobs * probs, axis=-1, keepdims=True)) / np.sqrt(D)
        dqr = dscores @ a["k_rep"]
        dk_rep = dscores.transpose(0, 1, 3, 2) @ a["qr"]
        dkr = dk_rep.reshape(B, Hkv, G, T, D).sum(axis=2)
        dv = dv_rep.reshape(B, Hkv, G, T, D).sum(axis=2)
        dq = dqr * cos + rotate_half_transposed(dqr * sin)
        dk = dkr * cos + rotate_half_transposed(dkr * sin)
        dq2 = dq.transpose(0, 2, 1, 3).reshape(B, T, H * D)
        dk2 = dk.transpose(0, 2, 1, 3).reshape(B, T, Hkv * D)
        dv2 = dv.transpose(0, 2, 1, 3).reshape(B, T, Hkv * D)
        for name, d in (("q", dq2), ("k", dk2), ("v", dv2)):
            grads[pre + f"self_attn.{name}_proj.weight"] = flat(d).T @ flat(a["h1"])
        dh1 = (dq2 @ p[pre + "self_attn.q_proj.weight"] + dk2 @ p[pre + "self_attn.k_proj.weight"]
               + dv2 @ p[pre + "self_attn.v_proj.weight"])
        dx, dw1 = rms_norm_backward(dh1, a["x"], p[pre + "input_layernorm.weight"], a["r1"])
        grads[pre + "input_layernorm.weight"] = dw1
        return dx + dx_mid

    def loss_and_grads(self, tokens, targets):
        """tokens, targets: int arrays [B, T]; a negative target is ignored.
        Returns the mean cross-entropy over kept targets and the gradient of every parameter."""
        c, p = self.c, self.p
        B, T = tokens.shape
        C = c["hidden_size"]
        cos, sin = rope_cos_sin(T, C // c["num_attention_heads"], c["rope_theta"])
        x = p["model.embed_tokens.weight"][tokens]
        caches = []
        for i in range(c["num_hidden_layers"]):
            x = self._layer(i, x, cos, sin, caches)
        xf, rf = rms_norm(x, p["model.norm.weight"], c["rms_norm_eps"])
        logits = xf @ p["lm_head.weight"].T
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logprobs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        keep = targets >= 0
        count = keep.sum()
        safe = np.where(keep, targets, 0)
        picked = np.take_along_axis(logprobs, safe[..., None], axis=-1)[..., 0]
        loss = -np.sum(np.where(keep, picked, 0.0)) / count

        grads = {}
        dlogits = np.exp(logprobs)
        np.put_along_axis(dlogits, safe[..., None],
                          np.take_along_axis(dlogits, safe[..., None], axis=-1) - 1, axis=-1)
        dlogits = np.where(keep[..., None], dlogits, 0.0) / count
        grads["lm_head.weight"] = dlogits.reshape(-1, dlogits.shape[-1]).T @ xf.reshape(-1, C)
        dxf = dlogits @ p["lm_head.weight"]
        dx, grads["model.norm.weight"] = rms_norm_backward(dxf, x, p["model.norm.weight"], rf)
        for i in reversed(range(c["num_hidden_layers"])):
            dx = self._layer_backward(i, dx, caches[i], cos, sin, grads)
        demb = np.zeros_like(p["model.embed_tokens.weight"])
        np.add.at(demb, tokens.reshape(-1), dx.reshape(-1, C))
        grads["model.embed_tokens.weight"] = demb
        return loss, grads
