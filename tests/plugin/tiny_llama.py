"""Make a tiny random-weight Llama (HIDDEN=256, LAYERS=2) with a locally trained byte-level BPE
tokenizer: no model hub. Run with the engine venv: ``python tiny_llama.py OUTDIR``."""
import random
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def main(out: str, hidden: int = 256, layers: int = 2) -> None:
    heads = max(4, hidden // 128)
    words = ("the cluster serves tokens over nccl ray gpu node model health latency allreduce "
             "tensor pipeline parallel ethernet infiniband").split()
    random.seed(0)
    corpus = [" ".join(random.choice(words) for _ in range(64)) for _ in range(500)]
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
    ft.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=max(2, heads // 4), max_position_embeddings=4096,
                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    LlamaForCausalLM(cfg).save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    main(sys.argv[1])
