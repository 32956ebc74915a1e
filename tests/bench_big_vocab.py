"""Peak host memory of one validation batch or one DPO step at vocab 151,936, with
the full logits ("before") or the chunked LM head + loss ("after"); used by
tests/bench/test_bench_big_vocab.py:

    python tests/bench_big_vocab.py {val,dpo} {before,after} ROWS SEQ OUT.pt

"before" is the code these paths had: logits = model(x), then F.cross_entropy
(validation) or references.token_logps_reference (DPO). "after" is model(x, y, reduction="none")
and dpo.batch_logps as they are. OUT.pt gets the RSS just before the call, the
peak (VmHWM, reset just before by writing 5 to /proc/self/clear_refs; Linux),
the seconds, and the numbers the test compares (losses, or the DPO loss and
the embedding's gradient).
"""

import sys

import references
import torch
import torch.nn.functional as F
from host_memory import measure

from nanobumble.model import dpo
from nanobumble.model.layers import IGNORE_INDEX
from nanobumble.model.transformer import ModelConfig, Transformer

# Tiny except for the vocabulary, so the logits are nearly all the memory there is.
CONFIG = ModelConfig(vocab_size=151936, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                     intermediate_size=128, max_position_embeddings=2048, tie_word_embeddings=True)
BETA = 0.1


def validation(model, x, y, way):
    model.eval()
    with torch.no_grad():
        if way == "before":
            logits = model(x)
            losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        else:
            losses = model(x, y, reduction="none")[0].flatten()
    return {"losses": losses}


def dpo_step(model, ids, labels, way):
    n = ids.shape[0] // 2
    if way == "before":
        logits = model(ids)
        logps, mask = references.token_logps_reference(logits, labels)
        policy = dpo.sequence_logps(logps, mask)
        references.mean_logits_reference(logits, mask)  # the old batch_logps computed it too (chunked, no grad)
    else:
        policy = dpo.batch_logps(model, ids, labels)[0]
    ref = torch.zeros(2 * n)  # constants stand in for the reference model's log-probs
    losses, _, _ = dpo.preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], BETA)
    loss = losses.mean()
    loss.backward()
    return {"loss": loss.detach(), "embed_grad": model.embed_tokens.weight.grad}


def main(case: str, way: str, rows: int, seq: int, out: str) -> None:
    torch.manual_seed(0)
    model = Transformer(CONFIG)  # init_weights is seeded: every process gets the same model
    model.kernels = "torch"
    ids = torch.randint(0, CONFIG.vocab_size, (rows, seq))
    if case == "val":
        args = (ids, torch.randint(0, CONFIG.vocab_size, (rows, seq)))
        fn = validation
    else:
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, seq // 4:-1] = ids[:, seq // 4 + 1:]  # next tokens; the first quarter is the prompt
        args = (ids, labels)
        fn = dpo_step
    values, before, peak, seconds = measure(lambda: fn(model, *args, way))
    torch.save({"before_mib": before, "peak_mib": peak, "seconds": seconds, **values}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
