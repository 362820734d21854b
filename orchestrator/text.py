"""Text conditioning for training and sampling: the frozen text encoder of ``model.text_encoder``
and the batches' captions (or precomputed embeddings) turned into :class:`TextEmbeddings`.

Where embeddings come from: a dataset encoded by ``raydiff data encode`` carries
``text_embedding`` [B, L, D] and ``text_mask`` [B, L] per sample, and the training step runs no
encoder (Ray's Stable Diffusion template and MosaicML's diffusion precompute them the same way);
other datasets carry the caption (``text``, str) and each worker encodes its micro-batch under
``no_grad``, in half precision when training is in half precision. Either way each worker loads
the encoder once at start: the empty prompt's embedding (the unconditional input) and the grid
prompts' embeddings are computed from it. The encoder is never in the optimizer or a checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from model.conditioning import TextEmbeddings, text_conditioning
from orchestrator.config import ConfigError, DataConfig, ModelConfig

TEXT_FIELDS = ("text", "text_embedding", "text_mask")


def text_dim(model: ModelConfig) -> int | None:
    """The hidden size of ``model.text_encoder`` (the width cross-attention reads), None for a
    model that is not text-conditioned. Reads the encoder's config only."""
    if not model.text_conditioned:
        return None
    from model.text_encoder import encoder_info

    if not model.text_encoder:
        raise ConfigError(f"model.name={model.name} is text-conditioned. Fix: set model.text_encoder")
    from orchestrator.data.source import BUILTIN_TEXT_ENCODER

    if model.text_encoder == BUILTIN_TEXT_ENCODER:
        # The captioned demo's encoder (orchestrator/data/demo_text.py), written with the data
        # when a run starts; its width is fixed, so plans and parameter counts need not write it.
        from orchestrator.data.demo_text import ENCODER_HIDDEN

        return ENCODER_HIDDEN
    try:
        return encoder_info(model.text_encoder)["hidden_size"]
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.text_encoder={model.text_encoder!r} could not be read ({e}). Fix: point it at a "
                          "directory saved with save_pretrained (model + tokenizer), e.g. the one "
                          "`raydiff data make-demo --captions` writes") from None


# What `raydiff data encode --text-encoder` writes beside its shards: latents.json (with --vae) or
# embeddings.json (Parquet images), each with a "text" entry (encoder, hidden_size, shape [L, D]).
ENCODED_MANIFESTS = {"latents": "latents.json", "parquet": "embeddings.json"}


def stored_text_embeddings(data: DataConfig) -> dict[str, Any] | None:
    """The "text" entry of the encoded dataset's manifest at ``data.source`` (caption embeddings
    computed once by ``raydiff data encode``), None when the data carries none or is not an
    encoded dataset (or cannot be read from here: the run then reads whatever the data holds)."""
    import json

    from orchestrator import storage

    names = [ENCODED_MANIFESTS[data.format]] if data.format in ENCODED_MANIFESTS else (
        list(ENCODED_MANIFESTS.values()) if data.format == "auto" else [])
    for name in names:
        try:
            m = json.loads(storage.read_bytes(storage.join(data.source, name), data.s3))
        except Exception:  # noqa: BLE001 - absent or unreadable: not an encoded dataset (see above)
            continue
        if isinstance(m, dict) and isinstance(m.get("text"), dict):
            return m["text"]
    return None


class TextConditioner:
    """The run's frozen text encoder on ``device`` in ``dtype``; ``keep_encoder`` False frees
    it after the empty prompt and ``prompts`` are encoded (precomputed training data: the step
    never encodes)."""

    def __init__(self, model: ModelConfig, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 prompts: list[str] | tuple[str, ...] = (), keep_encoder: bool = True) -> None:
        from model.text_encoder import FrozenTextEncoder

        self.path = model.text_encoder
        self.encoder = FrozenTextEncoder.from_pretrained(model.text_encoder, dtype=dtype, device=device,
                                                         max_length=model.text_max_length)
        self._null = self.encoder.null()
        self._prompts = {p: self.encoder.encode([p]) for p in dict.fromkeys(prompts)}
        self.max_length, self.dim = self.encoder.max_length, self.encoder.embedding_dim
        if not keep_encoder:
            self.encoder = None

    def null(self) -> TextEmbeddings:
        return self._null

    def prompts(self, prompts: list[str], negative_prompt: str = "") -> TextEmbeddings:
        """Embeddings of ``prompts`` whose unconditional input (what guidance steers away from)
        is ``negative_prompt``'s embedding: "" is the empty prompt the model was trained with
        (diffusers' ``negative_prompt`` replaces the same embedding)."""
        if not prompts:
            raise ValueError("no prompts given")
        emb = self._encode(list(prompts))
        if negative_prompt:
            neg = self._encode([negative_prompt])
            emb = TextEmbeddings(emb.hidden_states, emb.mask, neg.hidden_states[0], neg.mask[0])
        return emb

    def _encode(self, prompts: list[str]) -> TextEmbeddings:
        if all(p in self._prompts for p in prompts):
            parts = [self._prompts[p] for p in prompts]
            out = parts[0]
            for p in parts[1:]:
                out = out.cat(p)
            return out
        if self.encoder is None:
            missing = [p for p in prompts if p not in self._prompts]
            raise RuntimeError(f"prompts {missing!r} were not encoded before the text encoder was freed")
        return self.encoder.encode(prompts)

    def batch(self, batch: Mapping[str, Any]) -> TextEmbeddings:
        """The conditioning of a training micro-batch: its precomputed ``text_embedding`` /
        ``text_mask``, else its captions ``text`` encoded now (``""``: the empty prompt)."""
        if "text_embedding" in batch:
            if "text_mask" not in batch:
                raise ValueError("a batch with text_embedding must carry text_mask (raydiff data encode writes both)")
            return text_conditioning(batch["text_embedding"], batch["text_mask"], self._null)
        if "text" not in batch:
            raise ValueError("a text-conditioned model got a batch without captions: set data.captions=true "
                             "(or train on a dataset encoded by `raydiff data encode` with a text encoder)")
        if self.encoder is None:
            raise RuntimeError("this conditioner was built for precomputed embeddings but the batch carries captions")
        text = batch["text"]
        return self.encoder.encode([str(t) for t in (text.tolist() if isinstance(text, np.ndarray) else text)])
