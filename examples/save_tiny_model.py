"""Save a small random-weight Llama as a local model folder *without* a tokenizer (to try ``--tokenizer``).

    python examples/save_tiny_model.py runs/tiny-llama
    attnlab report --model runs/tiny-llama --tokenizer smollm2-135m --seq-len 64 --max-windows 1 --out runs/tiny

The model has SmolLM2-135M's vocabulary (49152 ids), so SmolLM2's tokenizer fits it; 4 layers, 4 query heads over
2 kv heads (GQA), hidden size 64, weights drawn from a fixed seed. Its weights are random: use it to check that a
command runs on a model folder, never to read findings from.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (config.json + model.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(args.out)  # safetensors; no tokenizer files
    print(args.out)


if __name__ == "__main__":
    main()
