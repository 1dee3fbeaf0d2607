"""Hugging Face interop: a transformers model directory (or hub id) read as a gptstack model, and the
vocabulary/chat template that come with it.

    convert.py    HF config.json <-> GPTConfig, parameter names (our GPT uses the Llama layout 1:1)
    weights.py    (sharded) safetensors in, checked tensor by tensor
    tokenizer.py  HFTokenizer: the model's own tokenizer.json and chat_template behind our tokenizer interface
    source.py     what counts as an HF model directory, hub ids, and reading one as a run

Writing models out (HF directories, GGUF) is `gptstack.export`, one layer up: it reads runs.
"""
