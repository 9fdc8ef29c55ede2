"""Speed: `acx-rt bench-speed` against Transformers' Llama and Qwen3-MoE (and, serving, against the GGUF export in
llama.cpp), the bounds any model computing the same numbers could reach, and the prepared GPU check."""
