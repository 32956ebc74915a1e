"""Save a seeded model and a LoRA adapter from however many ranks torchrun starts
(used by tests/unit/test_save_sharded.py):

    python tests/save_sharded.py OUT_DIR
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/save_sharded.py OUT_DIR

Writes OUT_DIR/full (model.safetensors), OUT_DIR/adapter (adapter_model.safetensors)
and OUT_DIR/rank{r}.json: how many tensors model_state_dict / lora_state_dict
returned on that rank. OUT_DIR/tokenizer.model must exist (any bytes).
"""

import json
import os
import sys
import zlib

import torch
from helpers import lora_state_dict

from nanobumble.base.distributed import distributed_run
from nanobumble.model.transformer import ModelConfig, copy_full_into
from nanobumble.run.build import build_model
from nanobumble.store.adapter import adapter_config_for
from nanobumble.store.model_dir import model_state_dict, save_model_dir

# vocab 321 and intermediate 97 do not split evenly over 2 ranks: uneven shards too.
CONFIG = ModelConfig(vocab_size=321, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=97)
LORA_CONFIG = ModelConfig(**{**CONFIG.__dict__, "tie_word_embeddings": False})
LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules="all", seed=3)


def main(out_dir: str) -> None:
    tokenizer = os.path.join(out_dir, "tokenizer.model")
    with distributed_run() as info:
        model = build_model(CONFIG, info, seed=7, weights_from=None, param_dtype=None)
        save_model_dir(os.path.join(out_dir, "full"), model, tokenizer, "seed: 7\n")
        kept = {"model": len(model_state_dict(model))}

        lora_model = build_model(LORA_CONFIG, info, seed=7, weights_from=None, param_dtype=None, lora=LORA)
        with torch.no_grad():  # B starts at zero; seeded values make the saved adapter say something
            for name, param in lora_model.named_parameters():
                if name.endswith(".lora_B"):
                    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    copy_full_into(param, torch.randn(param.shape, generator=generator))
        save_model_dir(os.path.join(out_dir, "adapter"), lora_model, tokenizer, "seed: 7\n",
                       adapter_config=adapter_config_for(lora_model, "base"))
        kept["adapter"] = len(lora_state_dict(lora_model))
        with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as f:
            json.dump(kept, f)


if __name__ == "__main__":
    main(sys.argv[1])
    # Everything is written and the process group is gone; leave without running
    # C++ static destructors, where gloo threads have aborted a rank at exit
    # ("terminate called without an active exception") in a loaded CI run.
    sys.stdout.flush()
    os._exit(0)
