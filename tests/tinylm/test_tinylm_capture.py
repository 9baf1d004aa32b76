"""Queries and keys of the shipped model on a task example (for distortion studies)."""

import torch

from tinylm.capture import example_queries_keys, load_model


def test_example_queries_keys_shapes_and_needle():
    torch.set_num_threads(2)
    model, tokenizer = load_model()
    qk = example_queries_keys("multikey", length=512, seed=0, model=model, tokenizer=tokenizer)
    c = model.config
    t = qk.input_ids.shape[1]
    assert sorted(qk.layers) == list(range(c.num_hidden_layers))
    for q, k in qk.layers.values():
        assert q.shape == (1, c.num_attention_heads, t, c.head_dim) and q.dtype == torch.float32
        assert k.shape == (1, c.num_key_value_heads, t, c.head_dim)
        assert torch.isfinite(q).all() and torch.isfinite(k).all()
    assert len(qk.answer_positions) == 2  # the needle states its number twice
    tokens = tokenizer.convert_ids_to_tokens(qk.input_ids[0, qk.answer_positions].tolist())
    assert tokens == [qk.record["answers"][0]] * 2
