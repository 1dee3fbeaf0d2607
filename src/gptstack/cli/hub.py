"""Models in and out: `gptstack import DIR_OR_ID --out RUN` and `gptstack export RUN --format hf|gguf`."""

from __future__ import annotations

EXPORT_TYPES = ("f32", "f16", "q8_0")


def cmd_import(args) -> None:
    from ..runs import import_model, read_config

    out = import_model(args.source, args.out)
    cfg = read_config(out)
    m = cfg["model"]
    notes = "; ".join((cfg.get("hf") or {}).get("notes") or [])
    print(f"imported {args.source} ({cfg['hf']['model_type']}: {m['n_layer']} layers, {m['n_embd']} wide, "
          f"{m['vocab_size']} tokens, context {m['seq_len']}) -> {out}" + (f" [{notes}]" if notes else ""))


def cmd_export(args) -> None:
    from ..errors import ConfigError

    if args.format == "hf":
        if args.type != "f32":
            raise ConfigError("--type applies to --format gguf; an hf export keeps float32 weights")
        from ..export.hf import export_hf

        out = export_hf(args.run, args.out, adapter=args.adapter)
        print(f"exported {args.run} as a Hugging Face model -> {out}"
              + (f" (base + PEFT adapter in {out}/adapter)" if args.adapter else ""))
        return
    if args.adapter:
        raise ConfigError("--adapter applies to --format hf; a GGUF file holds the merged weights")
    from ..export.gguf import export_gguf

    out = export_gguf(args.run, args.out, tensor_type=args.type)
    print(f"exported {args.run} as GGUF ({args.type}) -> {out}")


def register_hub_commands(sub) -> None:
    p = sub.add_parser("import", help="write a Hugging Face model (a directory or hub id) as a gptstack run")
    p.add_argument("source", help="an HF model directory (config.json, safetensors, tokenizer.json) or a hub id "
                                  "such as HuggingFaceTB/SmolLM2-135M-Instruct")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("export", help="write a run as a Hugging Face model directory or a GGUF file (llama.cpp)")
    p.add_argument("run", help="the run to export (any model run; a LoRA run exports merged weights)")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf: a transformers directory; gguf: "
                   "one file for llama.cpp and the tools built on it (default: %(default)s)")
    p.add_argument("--out", required=True, help="the directory (hf) or .gguf file to write")
    p.add_argument("--type", choices=EXPORT_TYPES, default="f32",
                   help="GGUF tensor type: f32, f16, or q8_0 (8-bit blocks) (default: %(default)s)")
    p.add_argument("--adapter", action="store_true",
                   help="hf only, for a LoRA run: the base weights plus the PEFT adapter instead of merged weights")
    p.set_defaults(func=cmd_export)
