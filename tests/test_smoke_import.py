from helpers import padded_batch, tiny_llama

from adaption_fx import AdaptionConfig, rewrite


def test_rewrite_runs():
    model = tiny_llama()
    ids, mask = padded_batch()
    adapted = rewrite(model, AdaptionConfig(adapter_len=3, adapter_layers=2))
    assert adapted(input_ids=ids, attention_mask=mask).logits.shape == (3, 7, 96)
