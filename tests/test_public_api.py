"""The public API as README's "Use qat as a library" shows it: quantize your own HF model, train it with your own
loop, export it, reload the export with HF transformers and get the same logits; pack it for the kernels."""

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import qat
from qat import QuantConfig, export_model, pack_model, quantize


def _tokenizer(tmp_path) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def test_all_names_resolve():
    assert set(qat.__all__) <= set(dir(qat))
    for name in qat.__all__:
        assert getattr(qat, name) is not None


@pytest.mark.slow  # transformers compiles its BitNet unpack on first load
def test_quantize_train_export_reload_pack(tmp_path):
    torch.manual_seed(0)
    tok = _tokenizer(tmp_path)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=64, tie_word_embeddings=False))
    quantize(model, QuantConfig(weight="absmean_ternary"))
    assert sum(isinstance(m, qat.QuantizedLinear) for m in model.modules()) == 2 * 7

    # Our own training loop: the latent weights move and the loss falls.
    ids = torch.randint(0, len(tok), (4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    out = export_model(model.eval(), tok, tmp_path / "export")          # the scheme's default format: HF BitNet
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu").eval()
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
        packed = pack_model(model)(input_ids=ids).logits
    # Both runtimes compute the same integer matmuls; an int8 activation code at a .5 rounding tie may flip, so a
    # few logits differ by one activation step (the export tolerance of qat eval).
    for other in (theirs, packed):
        assert (ours.argmax(-1) == other.argmax(-1)).float().mean() >= 0.999
        assert (ours - other).abs().max() <= 2e-3 * ours.abs().max()
