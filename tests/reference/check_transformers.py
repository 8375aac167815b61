"""Loads a llama-train export with transformers' LlamaForCausalLM and compares its fp32
logits with the engine's (1e-4). Exits 77 (skipped) when transformers is not installed."""
import argparse
import os
import subprocess
import sys

SKIP = 77


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--llama-train", required=True)
    parser.add_argument("--hf-logits", required=True)
    parser.add_argument("--workdir", required=True)
    args = parser.parse_args()
    try:
        import numpy as np
        import torch
        from transformers import LlamaForCausalLM
    except ImportError as e:
        print(f"SKIPPED: transformers with torch is not installed ({e}); "
              "install them to compare with LlamaForCausalLM")
        return SKIP

    os.makedirs(args.workdir, exist_ok=True)
    tokens_path = os.path.join(args.workdir, "tokens.u32")
    rng = np.random.default_rng(0)
    rng.integers(0, 97, size=4000, dtype=np.uint32).astype("<u4").tofile(tokens_path)
    job = os.path.join(args.workdir, "job.yaml")
    with open(job, "w") as f:
        f.write("name: hf\n"
                "model: {hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2,\n"
                "        num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 97,\n"
                "        max_position_embeddings: 128, rope_theta: 500.0, rms_norm_eps: 1.0e-5}\n"
                "training: {max_length: 32, batch_size: 4, steps: 5, lr: 1.0e-2}\n"
                "data: {dataset: tokens.u32}\n"
                "checkpoint: {dir: ckpt, interval: 5}\n")
    subprocess.run([args.llama_train, "train", "--config", job, "--fresh"], check=True)
    hf_dir = os.path.join(args.workdir, "hf")
    subprocess.run([args.llama_train, "export", "--load", os.path.join(args.workdir, "ckpt", "hf", "step-5"),
                    "--hf", hf_dir], check=True)
    tokens = [int(t) for t in rng.integers(0, 97, size=40)]
    ours_path = os.path.join(args.workdir, "logits.bin")
    subprocess.run([args.hf_logits, hf_dir, ours_path, *map(str, tokens)], check=True)
    ours = np.fromfile(ours_path, dtype="<f4").reshape(len(tokens), 97)

    model = LlamaForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].numpy()
    err = float(np.max(np.abs(ours - theirs)))
    print(f"max |logits difference| = {err:.2e} over {ours.size} logits")
    if err > 1e-4:
        return 1
    return check_tokenizer(args)


def check_tokenizer(args):
    """A job trained on the sample corpus exports its tokenizer: transformers loads it
    and encodes text to the ids our tokenizer gives."""
    try:
        import sentencepiece  # noqa: F401  (LlamaTokenizer needs it)
        from transformers import AutoTokenizer
    except ImportError as e:
        print(f"tokenizer check skipped: sentencepiece is not installed ({e})")
        return 0
    workdir = os.path.join(args.workdir, "tokenizer")
    os.makedirs(workdir, exist_ok=True)
    job = os.path.join(workdir, "job.yaml")
    with open(job, "w") as f:
        f.write("name: tok\n"
                "model: {hidden_size: 64, intermediate_size: 96, num_hidden_layers: 1,\n"
                "        num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 4096,\n"
                "        max_position_embeddings: 64}\n"
                "training: {max_length: 16, batch_size: 2, steps: 1, lr: 1.0e-3}\n"
                "data: {dataset: sample}\n"
                "checkpoint: {dir: ckpt, interval: 1}\n")
    subprocess.run([args.llama_train, "train", "--config", job, "--fresh"], check=True)
    hf_dir = os.path.join(workdir, "hf")
    subprocess.run([args.llama_train, "export", "--load", os.path.join(workdir, "ckpt", "tok", "step-1"),
                    "--hf", hf_dir], check=True)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    text = "The quick brown fox jumps over the lazy dog, 1234 times; naïve café."
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    import sentencepiece as spm
    ours = spm.SentencePieceProcessor(model_file=os.path.join(hf_dir, "tokenizer.model")).encode(text)
    print(f"tokenizer: {type(tokenizer).__name__}, {len(theirs)} ids; sentencepiece gives {len(ours)}")
    if theirs != ours:
        print(f"transformers: {theirs}\nsentencepiece: {ours}")
        return 1
    with_bos = tokenizer(text)["input_ids"]
    if with_bos[0] != 1:
        print(f"the exported tokenizer does not start with bos (id 1): {with_bos[:3]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
