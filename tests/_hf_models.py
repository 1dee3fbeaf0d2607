"""Small random-init Hugging Face models, built and saved by `transformers` itself (no network): one per
architecture gptstack imports, each exercising its features (GQA, biases, q/k norm, tied/untied, Llama 3 RoPE
scaling, sliding window, sharded files, bf16/fp16 on disk), with a byte-level BPE tokenizer.json trained here
and the chat template of the model family."""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>"]

CHATML_SMOL = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
               "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
               "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_QWEN = ("{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
               "{{- '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{%- endif %}"
               "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
               "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}"
          "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
           "{{ '[SYS] ' + message['content'] + ' [/SYS]' }}{% elif message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ ' ' + message['content'] + eos_token }}{% else %}{{ raise_exception('unknown role') }}{% endif %}"
           "{% endfor %}")

# name -> (transformers config class, config kwargs, tokenizer settings, save options)
VARIANTS = {
    "llama3": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
               dict(bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3, gen_eos=["<|eot_id|>", "<|endoftext|>"]),
               dict(dtype="float32")),
    "smollm2": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
                dict(bos="<|im_start|>", eos="<|im_end|>", template=CHATML_SMOL, gen_eos=["<|im_end|>"]),
                dict(dtype="bfloat16")),
    "mistral": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=128,
                                      tie_word_embeddings=False),
                dict(bos="<s>", eos="</s>", template=MISTRAL, gen_eos=["</s>"]),
                dict(dtype="float16")),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
              dict(bos=None, eos="<|im_end|>", template=CHATML_QWEN, gen_eos=["<|im_end|>", "<|endoftext|>"]),
              dict(dtype="float32")),
    "qwen3": ("Qwen3Config", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
              dict(bos=None, eos="<|im_end|>", template=CHATML_QWEN, gen_eos=["<|im_end|>"]),
              dict(dtype="float32", max_shard_size="200KB")),
}


# Qwen's split (digits one by one); transformers 5 builds Qwen2Tokenizer with it whatever tokenizer.json says,
# so the test vocabulary uses it too, as real Qwen checkpoints do
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")


def train_tokenizer(out: Path, vocab: int = 384, split: str | None = None) -> int:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    tk.train_from_iterator([text] * 2, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    return tk.get_vocab_size()


def build(name: str, out: Path, vocab_size: int | None = None, n_layer: int = 2, hidden: int = 64,
          seed: int = 0) -> Path:
    """Save a random-init `name` model with its tokenizer into `out` (returns `out`)."""
    import torch
    import transformers

    cls_name, kwargs, tok, save = VARIANTS[name]
    n_tokens = train_tokenizer(out, split=QWEN_SPLIT if name.startswith("qwen") else None)
    vocab = {t: i for i, t in enumerate(SPECIALS)}   # specials come first in the trained vocabulary
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok["bos"], "eos_token": tok["eos"], "chat_template": tok["template"],
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256}))
    config_cls = getattr(transformers, cls_name)
    cfg = config_cls(vocab_size=vocab_size or n_tokens, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=n_layer, max_position_embeddings=256, rms_norm_eps=1e-6,
                     bos_token_id=vocab.get(tok["bos"]), eos_token_id=[vocab[e] for e in tok["gen_eos"]],
                     pad_token_id=vocab["<|endoftext|>"], **kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(cfg).eval()
    with torch.no_grad():   # biases and norms start at 0 / 1: make them random so a dropped one shows
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, save["dtype"]))
    model.save_pretrained(out, **({"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {}))
    return out
