"""The forward engine: packed batches (packing), the native engine (native), the transformers
fallback (hf), CUDA graphs of the trained blocks (graphs), and layer streaming from CPU memory (offload)."""
