#!/usr/bin/env python3
"""Make a random-weight Llama checkpoint with a trained byte-level BPE tokenizer, no model hub.

Usage: python tools/make_tiny_llama.py OUTDIR [--hidden 256] [--layers 2] [--device cpu|cuda]
                                              [--vocab N] [--seed 0] [--pp N]

--hidden 256 --layers 2 gives a ~2.5 M-parameter model that a 2-core CPU serves in seconds; --hidden 4096 gives ~1 B parameters (all-reduce messages of Llama-8B size).
The layer count must divide by the pipeline-parallel size it will be served with.

Everything is seeded, so the same arguments give byte-identical safetensors (a stable sha256
manifest). Needs torch, transformers and tokenizers: the lab image has them all, e.g.
  docker run --rm -v "$PWD:/w" -w /w vllm-fleet:lab python tools/make_tiny_llama.py /w/build/tiny-llama
"""
import argparse
import json
import os
import random
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=0,
                    help="model vocab size; 0: the tokenizer's (so every sampled id decodes to text)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pp", type=int, default=1, help="refuse layer counts that PP does not divide")
    a = ap.parse_args(argv)
    if a.layers % a.pp:
        sys.exit(f"--layers {a.layers} does not divide by pipeline-parallel size {a.pp}")

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    random.seed(a.seed)
    torch.manual_seed(a.seed)
    heads = max(4, a.hidden // 128)
    words = ("the cluster serves tokens over nccl ray gpu node model health latency allreduce "
             "tensor pipeline parallel ethernet infiniband").split()
    corpus = [" ".join(random.choice(words) for _ in range(64)) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    ft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 unk_token="<unk>")
    ft.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                        "{% endfor %}assistant:")
    ft.save_pretrained(a.outdir)

    vocab = a.vocab or len(ft)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 7 // 2,
                      num_hidden_layers=a.layers, num_attention_heads=heads,
                      num_key_value_heads=max(2, heads // 4), max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.set_default_device(a.device)
    torch.set_default_dtype(torch.bfloat16)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(a.outdir, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"saved": os.path.abspath(a.outdir), "params": n, "hidden": a.hidden,
                      "layers": a.layers, "files": sorted(os.listdir(a.outdir))}))


if __name__ == "__main__":
    main()
