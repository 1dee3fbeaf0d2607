"""Runs go out as Hugging Face models (transformers, PEFT read them back exactly), and imported models train
with every stage: SFT (full, LoRA, QLoRA), DPO, GRPO, a JSON-schema generate, and the import command."""

import json

import pytest
import torch

from _hf_models import build
from _infer_util import save_run, tiny_model

pytest.importorskip("transformers")
pytest.importorskip("peft")

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 17*3?"}]


def _ids(x):
    return list(x["input_ids"] if isinstance(x, dict) or hasattr(x, "input_ids") else x)


def test_export_round_trip_through_transformers(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptstack.cli import main

    model = tiny_model(tiny_tokenizer, n_head=4, n_kv_head=2)
    run = save_run(tmp_path / "run", model, tiny_tokenizer)
    assert main(["export", run, "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"   # our q/k norm is Qwen3's
    X = torch.randint(0, tiny_tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(X) - hf(X).logits).abs().max().item() <= 1e-4
    htok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    held_out = "Unseen text: 98765 + 4321 = ?\n\n  tabs\tand déjà vu!"
    assert htok.encode(held_out, add_special_tokens=False) == tiny_tokenizer.encode(held_out)
    assert _ids(htok.apply_chat_template(CONV, tokenize=True, add_generation_prompt=True)) == \
        tiny_tokenizer.render_prompt(CONV)
    full = CONV + [{"role": "assistant", "content": "51"}]
    assert _ids(htok.apply_chat_template(full, tokenize=True)) == tiny_tokenizer.render_conversation(full)[0]
    # and back in: the exported directory is itself an importable model
    from gptstack.runs import load_model

    again, tok2, _ = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
    assert tok2.render_prompt(CONV) == tiny_tokenizer.render_prompt(CONV)
    # a second export onto the same directory refuses, nothing overwritten
    assert main(["export", run, "--out", str(tmp_path / "hf")]) == 2


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build("qwen3", tmp_path_factory.mktemp("hf") / "qwen3")


def _sft(base, out, *extra):
    from gptstack.cli import main

    return main(["sft", str(base), "--out", str(out), "--steps", "2", "--batch-size", "4", "--seq-len", "160",
                 "--examples-per-task", "4", "--val-conversations", "4", "--no-progress", *extra])


def test_lora_adapter_loads_onto_the_hf_base_with_peft(tmp_path, qwen3_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from gptstack.cli import main
    from gptstack.runs import load_model

    assert _sft(qwen3_dir, tmp_path / "lora", "--lora", "--lora-rank", "4") == 0
    ours, _, cfg = load_model(tmp_path / "lora")
    X = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32)(X).logits
        # the run's own adapter/ goes straight onto the imported HF base
        hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32),
                                       str(tmp_path / "lora" / "adapter")).eval()
        ref = ours(X)
        assert (hf(X).logits - ref).abs().max().item() <= 1e-4
        assert (base_logits - ref).abs().max().item() > 1e-4   # the adapter did change the model
    # export --adapter: the base plus the adapter, which PEFT applies to equal our merged model
    assert main(["export", str(tmp_path / "lora"), "--out", str(tmp_path / "hf"), "--adapter"]) == 0
    assert json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with torch.no_grad():
        hf2 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32),
                                        str(tmp_path / "hf" / "adapter")).eval()
        assert (hf2(X).logits - ref).abs().max().item() <= 1e-4
    # merged export equals too
    assert main(["export", str(tmp_path / "lora"), "--out", str(tmp_path / "merged")]) == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert (merged(X).logits - ref).abs().max().item() <= 1e-4


def test_every_stage_trains_on_an_imported_model(tmp_path, qwen3_dir, capsys):
    from gptstack.cli import main
    from gptstack.runs import import_model, is_finished, read_config

    assert _sft(qwen3_dir, tmp_path / "sft") == 0
    assert _sft(qwen3_dir, tmp_path / "qlora", "--qlora", "--lora-rank", "4") == 0
    assert read_config(tmp_path / "sft")["tokenizer_fingerprint"]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": "no"}) + "\n"
                             for i in range(8)))
    assert main(["dpo", str(tmp_path / "sft"), "--prefs", str(prefs), "--out", str(tmp_path / "dpo"), "--steps", "2",
                 "--batch-size", "4", "--no-progress"]) == 0
    assert main(["rl", str(tmp_path / "sft"), "--algo", "grpo", "--out", str(tmp_path / "grpo"), "--steps", "2",
                 "--samples", "2", "--max-new-tokens", "6", "--no-progress"]) == 0
    for run in ("sft", "qlora", "dpo", "grpo"):
        assert is_finished(tmp_path / run), run
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"type": "boolean"}},
                                  "required": ["answer"], "additionalProperties": False}))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "grpo"), "--chat", "--prompt", "What is 2+2?", "--json-schema",
                 str(schema), "--max-new-tokens", "40", "--temperature", "0"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(json.loads(out)) == {"answer"}
    # `gptstack import` writes a normal, finished run that trains like the directory itself
    imported = import_model(qwen3_dir, tmp_path / "imported")
    assert is_finished(imported) and (imported / "tokenizer" / "tokenizer.json").exists()
    assert main(["import", str(qwen3_dir), "--out", str(imported)]) == 2   # never overwrites


def test_pipeline_starts_from_an_imported_model(tmp_path, qwen3_dir):
    from gptstack.cli import main
    from gptstack.runs import read_config

    root = tmp_path / "root"
    assert main(["pipeline", "--preset", "micro", "--base", str(qwen3_dir), "--out", str(root),
                 "--only", "base,sft"]) == 0
    record = json.loads((root / "pipeline.json").read_text())
    assert record["base_model"] == str(qwen3_dir) and record["stages"]["base"]["status"] == "done"
    assert read_config(root / "base")["stage"] == "import"
    assert read_config(root / "sft")["source_run"] == str(root / "base")
    assert not (root / "base" / "metrics.jsonl").exists()   # nothing was pretrained


def test_export_gguf_from_the_command_line(tmp_path, tiny_tokenizer):
    gguf = pytest.importorskip("gguf")
    from gptstack.cli import main

    run = save_run(tmp_path / "run", tiny_model(tiny_tokenizer, n_head=4, n_kv_head=2), tiny_tokenizer)
    out = tmp_path / "m.gguf"
    assert main(["export", run, "--format", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    reader = gguf.GGUFReader(str(out))
    assert any(t.name == "token_embd.weight" for t in reader.tensors)
    assert main(["export", run, "--format", "gguf", "--adapter", "--out", str(tmp_path / "x.gguf")]) == 2
    assert main(["export", run, "--format", "hf", "--type", "q8_0", "--out", str(tmp_path / "x")]) == 2
