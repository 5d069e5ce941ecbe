"""Tiny random decoders (Llama, Qwen2, Mistral) saved as HF folders with a small word tokenizer."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the a of and to in is was it that for on with as by at from his her they this which be "
    "good bad fine awful great poor nice terrible lovely dull city river town trade port market "
    "history early period small settlement grew around crossing over following centuries became "
    "centre learning cathedral university busy then begins medieval when with"
).split()
SPECIAL = ["<unk>", "<s>", "</s>"]


def make_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (300 tokens, no pad token: like a real decoder's), saved to `folder`.

    Byte-level BPE, because transformers 5 loads a folder's tokenizer by model type (Qwen2Tokenizer
    for qwen2), and those classes expect byte-level BPE files.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([" ".join(WORDS)] * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(folder)
    return tok


def decoder_config(family: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    kw = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, tie_word_embeddings=True, **overrides)
    if family == "llama":
        return LlamaConfig(**kw)
    if family == "qwen2":
        return Qwen2Config(**kw)
    if family == "mistral":
        return MistralConfig(head_dim=8, sliding_window=None, **kw)
    raise ValueError(family)


def make_decoder(folder: Path, family: str = "llama", seed: int = 0) -> Path:
    """A 2-layer, 32-wide random causal LM of `family` with the word tokenizer, saved to `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    decoder_config(family, 300).save_pretrained(folder)  # the family decides the tokenizer class
    vocab = len(AutoTokenizer.from_pretrained(folder))  # qwen2's class adds <|endoftext|>
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(decoder_config(family, vocab))
    model.save_pretrained(folder)
    return folder


def write_text(path: Path, n_words: int = 600, seed: int = 0) -> Path:
    """Plain text of `n_words` words from the tokenizer's vocabulary, in lines."""
    rng = random.Random(seed)
    words = [rng.choice(WORDS) for _ in range(n_words)]
    lines = [" ".join(words[i:i + 12]) for i in range(0, n_words, 12)]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
