"""Generate a tiny random Llama-style model for local runs and tests.

The model has the file layout of a Hugging Face Llama checkpoint (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json),
so downloaders, image builders and the CPU engine treat it like a real one. Its
weights are random: it produces text-shaped noise, which is all the pipeline needs.

Every file is a pure function of the seed, byte for byte, so two hubs that generate
the same seed publish the same file hashes. Only the weights depend on the seed; the
tokenizer is trained on the fixed text below and is the same for every seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Final

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS_TOKEN: Final = "<|begin_of_text|>"
EOS_TOKEN: Final = "<|end_of_text|>"
SPECIAL_TOKENS: Final = (
    BOS_TOKEN,
    EOS_TOKEN,
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
)
TARGET_VOCAB_SIZE: Final = 512

HIDDEN_SIZE: Final = 64
INTERMEDIATE_SIZE: Final = 128
NUM_LAYERS: Final = 2
NUM_ATTENTION_HEADS: Final = 4
NUM_KEY_VALUE_HEADS: Final = 2
HEAD_DIM: Final = 16
MAX_POSITION_EMBEDDINGS: Final = 512
INIT_STD: Final = 0.02

# Each message renders as <|role|>content<|end_of_text|>. The generation prompt
# opens an assistant turn for the model to complete.
CHAT_TEMPLATE: Final = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TRAINING_TEXT: Final = (
    "The night train left the valley a little after nine. Most of the carriages "
    "were empty, and the conductor walked slowly from one end to the other, "
    "checking tickets that nobody had bought. Outside, the river ran beside the "
    "track for a long while, then turned away into the dark fields.",
    "A model refresh starts with a question: which commit should be served? The "
    "pipeline reads the branch, finds the commit, and compares it with the one "
    "already running. When they match, there is nothing to do. When they differ, "
    "the weights are downloaded, checked against their hashes, and packed into a "
    "new image layer.",
    "Every service runs under its own identity. Requests must carry a token, the "
    "token must belong to a listed caller, and the caller may only reach the "
    "routes that were opened for it. Secrets live outside the image and are "
    "pinned to a version number, so a rollback restores the exact key that the "
    "old revision used.",
    "In the garden behind the station, someone had planted tomatoes, beans and a "
    "row of tall sunflowers. The sunflowers leaned toward the platform as if they "
    "were waiting for the next train too. On warm evenings the stationmaster sat "
    "on a bench there, reading the newspaper and counting the clouds.",
    "Logs are written one line at a time, each line a small JSON object with a "
    "severity, a message and an event name. Alerts count the events that should "
    "never happen: a rejected tool call, a leaked prompt, a request that was far "
    "too large. When the count rises above zero, someone is told about it.",
    "Numbers and names appear in many shapes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, "
    "42, 100, 2048; Monday, Tuesday, Wednesday; north, south, east, west; red, "
    "green, blue; yes, no, maybe? Questions end with a question mark, and lists "
    "are separated by commas.",
)


def generate_model(seed: int, out_dir: Path) -> None:
    """Write the demo model for `seed` into `out_dir`, creating the folder."""
    out_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer()
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    bos_token_id = _special_token_id(tokenizer, BOS_TOKEN)
    eos_token_id = _special_token_id(tokenizer, EOS_TOKEN)

    (out_dir / "tokenizer.json").write_text(tokenizer.to_str(), encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config())
    _write_json(
        out_dir / "config.json", _model_config(vocab_size, bos_token_id, eos_token_id)
    )
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id},
    )
    save_file(
        random_weights(seed, vocab_size),
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )


def train_tokenizer() -> Tokenizer:
    """Train the byte-level BPE tokenizer on the fixed text.

    With tokenizers 0.23, runs with different RAYON_NUM_THREADS and PYTHONHASHSEED
    wrote identical tokenizer.json files, and the tests compare two runs.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    return tokenizer


def random_weights(seed: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Draw float32 weights under the Hugging Face Llama tensor names."""
    rng = np.random.default_rng(seed)
    kv_dim = NUM_KEY_VALUE_HEADS * HEAD_DIM
    q_dim = NUM_ATTENTION_HEADS * HEAD_DIM

    def normal(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * INIT_STD).astype(np.float32)

    def ones() -> np.ndarray:
        return np.ones(HIDDEN_SIZE, dtype=np.float32)

    # The draw order is fixed, so the same seed gives the same tensors.
    weights = {"model.embed_tokens.weight": normal(vocab_size, HIDDEN_SIZE)}
    for i in range(NUM_LAYERS):
        prefix = f"model.layers.{i}"
        weights[f"{prefix}.input_layernorm.weight"] = ones()
        weights[f"{prefix}.self_attn.q_proj.weight"] = normal(q_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.k_proj.weight"] = normal(kv_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.v_proj.weight"] = normal(kv_dim, HIDDEN_SIZE)
        weights[f"{prefix}.self_attn.o_proj.weight"] = normal(HIDDEN_SIZE, q_dim)
        weights[f"{prefix}.post_attention_layernorm.weight"] = ones()
        weights[f"{prefix}.mlp.gate_proj.weight"] = normal(
            INTERMEDIATE_SIZE, HIDDEN_SIZE
        )
        weights[f"{prefix}.mlp.up_proj.weight"] = normal(INTERMEDIATE_SIZE, HIDDEN_SIZE)
        weights[f"{prefix}.mlp.down_proj.weight"] = normal(
            HIDDEN_SIZE, INTERMEDIATE_SIZE
        )
    weights["model.norm.weight"] = ones()
    weights["lm_head.weight"] = normal(vocab_size, HIDDEN_SIZE)
    return weights


def _special_token_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"special token {token!r} missing from the trained vocabulary")
    return token_id


def _model_config(vocab_size: int, bos_token_id: int, eos_token_id: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "num_key_value_heads": NUM_KEY_VALUE_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "additional_special_tokens": list(SPECIAL_TOKENS[2:]),
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the tiny demo Llama model.")
    parser.add_argument("out_dir", type=Path, help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights")
    args = parser.parse_args()
    generate_model(args.seed, args.out_dir)


if __name__ == "__main__":
    main()
