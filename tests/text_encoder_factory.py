"""A tiny randomly initialised CLIP text encoder and word-level tokenizer saved to a directory,
as a real local encoder would be (``save_pretrained``): nothing is downloaded."""

from __future__ import annotations

import pathlib

WORDS = ("a red green blue yellow circle square triangle small large on the left right of "
         "picture photo cat dog").split()


def _word_tokenizer(max_length: int, *, bos: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>" if bos else "$A <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>", model_max_length=max_length)
    return fast, vocab


def make_tiny_t5(path: pathlib.Path, *, d_model: int = 32, max_length: int = 12, seed: int = 0) -> pathlib.Path:
    """A tiny random T5 encoder (PixArt's kind of text encoder) with a word-level tokenizer that,
    like T5's, appends </s> and no <s>."""
    import torch
    from transformers import T5Config, T5EncoderModel

    fast, vocab = _word_tokenizer(max_length, bos=False)
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
                   pad_token_id=vocab["<pad>"], eos_token_id=vocab["<eos>"], decoder_start_token_id=vocab["<pad>"])
    path.mkdir(parents=True, exist_ok=True)
    T5EncoderModel(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_tiny_clip(path: pathlib.Path, *, hidden_size: int = 32, max_length: int = 16, seed: int = 0) -> pathlib.Path:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    fast, vocab = _word_tokenizer(max_length, bos=True)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                         pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"], eos_token_id=vocab["<eos>"])
    model = CLIPTextModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path
