#!/usr/bin/env python3
"""PyTorch baseline for the GPU benchmark: one full Llama training step
(forward + CE loss, backward, AdamW) timed on a single CUDA GPU.

Pure-bf16 setup (the usual PyTorch recipe): bf16 parameters, bf16 gradients,
bf16 AdamW state, no fp32 master weights. SDPA attention. No network access:
the model is built from a config with random weights; data is random tokens.

  python3 torch_llama_step.py --flops-per-token 6.9e9 --json
"""
import argparse
import json
import os
import statistics
import sys

# Never touch the network (the benchmark machine has none anyway).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, typ, dflt in [("hidden", int, 2048), ("intermediate", int, 5632),
                            ("layers", int, 22), ("heads", int, 32), ("kv-heads", int, 4),
                            ("vocab", int, 32000), ("seq", int, 2048), ("batch", int, 8),
                            ("warmup", int, 3), ("steps", int, 10), ("lr", float, 3e-4),
                            ("peak-tflops", float, 989.0)]:  # 989 = H100 dense bf16
        p.add_argument("--" + name, type=typ, default=dflt)
    p.add_argument("--flops-per-token", type=float, required=True,
                   help="model FLOPs per trained token (supplied by the caller)")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--json", action="store_true", help="one JSON line on stdout")
    return p.parse_args()


def build_model(a, torch, transformers):
    cfg = transformers.LlamaConfig(
        hidden_size=a.hidden, intermediate_size=a.intermediate,
        num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
        max_position_embeddings=max(a.seq, 2048), rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    auto = transformers.AutoModelForCausalLM
    model = None
    # Build directly on the GPU in bf16: `dtype=` (transformers >= 4.56 / 5.x),
    # then `torch_dtype=` (older 4.x), then a plain constructor + cast.
    with torch.device("cuda"):
        for kw in ("dtype", "torch_dtype"):
            try:
                model = auto.from_config(cfg, **{kw: torch.bfloat16})
                break
            except TypeError:
                continue
        if model is None:
            model = transformers.LlamaForCausalLM(cfg)
    if any(p.dtype != torch.bfloat16 for p in model.parameters()):
        model.to(dtype=torch.bfloat16)  # (also casts float buffers; fallback only)
    model.to(device="cuda")
    model.config.use_cache = False
    if a.grad_checkpoint:
        try:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        except TypeError:  # very old transformers
            model.gradient_checkpointing_enable()
    model.train()  # HF only checkpoints in training mode; dropout is 0 anyway
    return model


def run(a):
    import torch
    import transformers
    transformers.logging.set_verbosity_error()  # keep stdout/stderr quiet
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    model = build_model(a, torch, transformers)
    n_params = sum(p.numel() for p in model.parameters())
    try:  # bf16 params -> bf16 exp_avg / exp_avg_sq (pure-bf16 AdamW)
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95),
                                weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95),
                                weight_decay=0.1, foreach=True)

    with torch.no_grad():  # fixed-seed random tokens, generated on the GPU
        g = torch.Generator(device="cuda").manual_seed(1234)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device="cuda", generator=g)
        # HF shifts labels inside the loss (logits[:, :-1] vs labels[:, 1:]),
        # so input_ids and labels are the same length-`seq` tensor.
        x = ids[:, :-1].contiguous()

    def step():
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(a.warmup):
        loss = step()
    torch.cuda.synchronize()
    ev = lambda: torch.cuda.Event(enable_timing=True)
    marks = [ev() for _ in range(a.steps + 1)]
    t0, t1 = ev(), ev()
    t0.record()
    for i in range(a.steps):
        marks[i].record()
        loss = step()
    marks[-1].record()
    t1.record()
    torch.cuda.synchronize()

    per_step = [marks[i].elapsed_time(marks[i + 1]) / 1e3 for i in range(a.steps)]
    step_s = statistics.median(per_step)
    tok_s = a.batch * a.seq / step_s  # counts batch*seq tokens, like our engine
    tflops = tok_s * a.flops_per_token / 1e12
    return {
        "impl": "pytorch", "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "tokens_per_s": tok_s, "step_s": step_s, "tflops": tflops,
        "mfu": tflops / a.peak_tflops,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": float(loss.item()), "precision": "bf16 params, bf16 AdamW state",
        "batch": a.batch, "seq": a.seq, "params": n_params,
        "steps": a.steps, "loop_mean_step_s": t0.elapsed_time(t1) / 1e3 / a.steps,
    }


def main():
    a = parse_args()
    try:
        if a.steps < 1:
            raise ValueError("--steps must be >= 1")
        r = run(a)
    except Exception as e:  # noqa: BLE001 - report any failure to the caller's table
        if a.json:
            msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:2000]
            print(json.dumps({"impl": "pytorch", "error": msg}), flush=True)
            return 1
        raise
    if a.json:
        print(json.dumps(r), flush=True)
    else:
        for k, v in r.items():
            print(f"{k:>17}: {v:.6g}" if isinstance(v, float) else f"{k:>17}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
