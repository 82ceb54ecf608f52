"""Build a tiny random-weight Llama model that real vLLM can serve on the CPU.

Nothing is downloaded: the weights are random (seeded) and the tokenizer is a
byte-level BPE trained here on a few lines of text. The result is a normal
Hugging Face model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a chat template), about 300 KB.

Usage: python deploy/cpu/build_tiny_model.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CORPUS = [
    "Sentinel guards the inference server and keeps tokens flowing.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? I am fine, thank you.",
    "An engine that serves nothing is not healthy, whatever its health endpoint says.",
    "Reap zombies, kill orphans, restart with backoff, drain gracefully.",
    "0 1 2 3 4 5 6 7 8 9 ten eleven twelve",
    "system user assistant: say hi",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 256
    fast.save_pretrained(str(out))
    return len(fast)


def build_model(out: Path, vocab: int, bos_id: int, eos_id: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: head_dim 16 is rejected by the CPU kernel
        num_key_value_heads=1,
        max_position_embeddings=256,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        tie_word_embeddings=True,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out), safe_serialization=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, vocab_size=512)
    tk = json.loads((out / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tk["added_tokens"]}
    build_model(out, vocab, ids["<|bos|>"], ids["<|eos|>"])
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids["<|bos|>"], "eos_token_id": ids["<|eos|>"]})
    )
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"tiny model written to {out} ({size // 1024} KB, vocab {vocab})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
