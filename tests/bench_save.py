"""Peak host memory of each rank while saving a sharded model (used by
tests/test_bench_save.py):

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/bench_save.py {old,new} OUT_DIR

"new" is checkpoint.save_model_dir as it is; "old" is the same with the gather
it replaced (every rank gathers every tensor and keeps them all). Each rank
writes OUT_DIR/{mode}-rank{r}.json. The peak is VmHWM, reset just before the
save by writing 5 to /proc/self/clear_refs (Linux).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from nanobumble import checkpoint  # noqa: E402
from nanobumble.distributed import barrier, build_model, distributed_run  # noqa: E402
from nanobumble.model import ModelConfig  # noqa: E402
from host_memory import measure  # noqa: E402

# About 123M parameters, 470 MiB in fp32; the largest tensor is the 125 MiB embedding.
CONFIG = ModelConfig(vocab_size=32000, hidden_size=1024, num_layers=8, num_heads=16, num_kv_heads=4,
                     intermediate_size=2816)


def old_model_state_dict(model):
    """The gather before this change: every rank keeps a full CPU copy of everything."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        state[name] = tensor.detach().to("cpu").contiguous()
    return state


def main(mode: str, out_dir: str) -> None:
    if mode == "old":
        checkpoint.model_state_dict = old_model_state_dict  # save_model_dir looks it up at call time
    tokenizer = os.path.join(out_dir, "tokenizer.model")
    with distributed_run() as info:
        model = build_model(CONFIG, info, seed=0, weights_file=None, param_dtype=None)
        barrier()
        _, before, peak, seconds = measure(
            lambda: checkpoint.save_model_dir(os.path.join(out_dir, mode), model, tokenizer, "bench: true\n"))
        full_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # DTensor: global size
        with open(os.path.join(out_dir, f"{mode}-rank{info.rank}.json"), "w") as f:
            json.dump({"before_mib": before, "peak_mib": peak, "seconds": seconds, "model_mib": full_mib}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
