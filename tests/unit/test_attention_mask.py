"""Who attends to whom: packed documents (position_ids restarting at 0) and padding
(attention_mask), through flex_attention's BlockMask where it can run and through
a dense SDPA mask where it cannot (CPU with gradients). Both come from one rule."""

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from nanobumble.model import attention
from nanobumble.model.attention import attention_rule, document_attention_mask
from nanobumble.model.transformer import ModelConfig, Transformer

V = 97


def tiny() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                                    intermediate_size=80, max_position_embeddings=64))
    for param in model.parameters():  # off the init values, so biases and norms matter
        param.data.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    return model


def test_the_rule_by_hand():
    # One row: a document of 2 tokens, then one of 3; the last token is padding.
    positions = torch.tensor([[0, 1, 0, 1, 2, 3]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0]])
    with torch.enable_grad():  # the dense form
        mask = document_attention_mask(positions, valid)
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0],
                         [0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    # No query sees the padding key, except the padding token itself: its output is
    # ignored, but its row must not be empty (softmax over nothing is NaN).
    assert mask.shape == (1, 1, 6, 6)
    assert torch.equal(mask[0, 0], want)


def test_flex_block_mask_without_gradients_dense_mask_with_them():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        flex = document_attention_mask(positions)
    dense = document_attention_mask(positions)
    assert isinstance(flex, BlockMask)  # the branch CUDA takes, here without gradients
    assert isinstance(dense, torch.Tensor) and dense.dtype == torch.bool
    # The block mask holds the same rule: evaluated densely it gives the dense mask.
    documents = (positions == 0).cumsum(-1)
    i = torch.arange(8)
    assert torch.equal(attention_rule(documents, None)(0, 0, i[:, None], i[None, :]), dense[0, 0])


def pack(docs):
    row = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(d.shape[1]) for d in docs])[None]
    return row, positions


def test_packed_logits_equal_each_document_alone_on_both_paths():
    model = tiny().eval()
    docs = [torch.randint(0, V, (1, n)) for n in (7, 1, 12)]
    row, positions = pack(docs)
    alone = []
    with torch.no_grad():
        for d in docs:
            alone.append(model(d))
        flex_logits = model(row, position_ids=positions)  # BlockMask (no gradients on CPU)
    dense_logits = model(row, position_ids=positions)  # dense mask: gradients enabled
    start = 0
    for d, want in zip(docs, alone):
        n = d.shape[1]
        torch.testing.assert_close(flex_logits[:, start:start + n], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense_logits[:, start:start + n], want, rtol=1e-5, atol=1e-5)
        start += n


def test_packed_gradients_equal_the_sum_over_documents_alone():
    docs = [torch.randint(0, V, (1, n)) for n in (9, 4, 11)]
    row, positions = pack(docs)
    targets = torch.randint(0, V, row.shape)
    targets[0, 3] = -100

    packed = tiny()
    packed(row, targets, position_ids=positions, reduction="sum").backward()

    separate = tiny()
    start = 0
    for d in docs:
        n = d.shape[1]
        separate(d, targets[:, start:start + n], reduction="sum").backward()  # grads add up
        start += n
    for (name, a), (_, b) in zip(packed.named_parameters(), separate.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_left_or_right_leaves_real_tokens_as_if_unpadded():
    model = tiny().eval()
    x = torch.randint(0, V, (1, 10))
    pad = torch.zeros(1, 4, dtype=torch.long)
    left, right = torch.cat([pad, x], dim=1), torch.cat([x, pad], dim=1)
    ones, zeros = torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        want = model(x)
        got_left = model(left, attention_mask=torch.cat([zeros, ones], dim=1))
        got_right = model(right, attention_mask=torch.cat([ones, zeros], dim=1))
    torch.testing.assert_close(got_left[:, 4:], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_right[:, :10], want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got_left).all() and torch.isfinite(got_right).all()
    # With gradients (dense mask) the same, and padding gets no NaN into the loss.
    targets = torch.cat([torch.full((1, 4), -100), torch.randint(0, V, (1, 10))], dim=1)
    loss = model.train()(left, targets, attention_mask=torch.cat([zeros, ones], dim=1))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_compiled_flex_branch_runs_on_cpu(monkeypatch):
    """The branch CUDA takes (compiled block mask and compiled flex_attention), here on
    CPU without gradients: the packed row still gives each document its own logits."""
    monkeypatch.setattr(attention, "compiles_flex", lambda device: True)
    monkeypatch.setattr(attention, "_compiled_flex", None)
    model = tiny().eval()
    docs = [torch.randint(0, V, (1, n)) for n in (7, 13)]
    row, positions = pack(docs)
    with torch.no_grad():
        packed = model(row, position_ids=positions)
        torch.testing.assert_close(packed[:, :7], model(docs[0]), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(packed[:, 7:], model(docs[1]), rtol=1e-4, atol=1e-4)
    assert attention._compiled_flex is not None  # the compiled op was the one used
