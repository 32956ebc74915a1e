"""Peak host memory of each rank while saving a checkpoint of a sharded model
(weights and AdamW state; used by tests/bench/test_bench_save.py):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/bench_save.py {gathered,streamed} OUT_DIR

"streamed" is checkpoint.save_checkpoint as it is: each tensor is gathered, rank 0
appends it to the file and drops it. "gathered" is the simple way it replaces:
rank 0 collects the whole model and optimizer state, then writes each file.
Each rank writes OUT_DIR/{mode}-rank{r}.json. The peak is VmHWM, reset just
before the save by writing 5 to /proc/self/clear_refs (Linux).
"""

import json
import os
import sys

import torch
from host_memory import measure
from safetensors.torch import save_file

from nanobumble.base.distributed import barrier, distributed_run, is_main
from nanobumble.model.transformer import ModelConfig
from nanobumble.run.build import build_model
from nanobumble.run.optim import build_optimizer
from nanobumble.store import checkpoint, model_dir

# About 123M parameters, 470 MiB in fp32 (and twice that of AdamW moments); the
# largest tensor is the 125 MiB embedding.
CONFIG = ModelConfig(vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                     intermediate_size=2816)


def gathered_save(path, model, optimizer) -> None:
    """Rank 0 holds everything at once, then writes."""
    weights = model_dir.gather_full_on_main(model_dir._weights(model))
    moments = model_dir.gather_full_on_main(checkpoint._optimizer_tensors(model, optimizer)[1])
    if is_main():
        os.makedirs(path, exist_ok=True)
        save_file(weights, os.path.join(path, "model.safetensors"))
        save_file(moments, os.path.join(path, "optimizer.safetensors"))


def main(mode: str, out_dir: str) -> None:
    tokenizer = os.path.join(out_dir, "tokenizer.model")  # save_model_dir takes a loaded tokenizer or a path
    with distributed_run() as info:
        model = build_model(CONFIG, info, seed=0, weights_from=None, param_dtype=None)
        optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95))
        for param in model.parameters():  # one step makes the AdamW moments exist
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        barrier()
        if mode == "streamed":
            save = lambda: checkpoint.save_checkpoint(os.path.join(out_dir, mode), 1, model, optimizer, tokenizer,
                                                      "bench: true\n", save_total_limit=0)
        else:
            save = lambda: gathered_save(os.path.join(out_dir, mode), model, optimizer)
        _, before, peak, seconds = measure(save)
        full_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # DTensor: global size
        with open(os.path.join(out_dir, f"{mode}-rank{info.rank}.json"), "w") as f:
            json.dump({"before_mib": before, "peak_mib": peak, "seconds": seconds, "model_mib": full_mib}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
