"""Native model families (opt, llama) and the transformers fallback (hf)."""
