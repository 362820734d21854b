"""The text half of ``raydiff data encode --text-encoder`` (``encode.py``): a Ray Data stage of
actors that run the frozen text encoder (``model/text_encoder.py``) once per caption, and the
PNG bytes of decoded images stored beside the embeddings when there is no VAE."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import ray.data


class TextEncoderActor:
    """Ray Data class UDF: adds ``text_embedding`` [N, L, D] (dtype) and ``text_mask`` [N, L]
    (uint8) of ``batch["text"]``; the frozen encoder loads once per actor."""

    def __init__(self, path: str, max_length: int | None, dtype: str, device: str) -> None:
        import torch

        from model.text_encoder import FrozenTextEncoder

        # Encoded in float32 and stored in ``dtype``: the stored values then equal what a worker
        # encoding in float32 gets, cast once.
        self.encoder = FrozenTextEncoder.from_pretrained(path, dtype=torch.float32, device=device, max_length=max_length)
        self.dtype = np.dtype(dtype)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        if texts:
            emb = self.encoder.encode(texts)
            h, m = emb.hidden_states.float().cpu().numpy(), emb.mask.cpu().numpy()
        else:
            h = np.zeros((0, self.encoder.max_length, self.encoder.embedding_dim), np.float32)
            m = np.zeros((0, self.encoder.max_length), bool)
        return {**batch, "text_embedding": h.astype(self.dtype), "text_mask": m.astype(np.uint8)}


def text_stage(ds: "ray.data.Dataset", path: str, *, batch_size: int, max_length: int | None = None,
               concurrency: int | None = None, use_gpu: bool | None = None, dtype: str = "float32"
               ) -> "ray.data.Dataset":
    """``ds`` (rows with ``text``) with the captions' embeddings added by ``concurrency``
    ``TextEncoderActor`` actors (GPU as in ``latent_stage``)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    n = concurrency or (max(gpus, 1) if use_gpu else 1)
    return ds.map_batches(
        TextEncoderActor,
        fn_constructor_kwargs={"path": path, "max_length": max_length, "dtype": dtype, "device": "cuda" if use_gpu else "cpu"},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_gpus=1 if use_gpu else 0,
        num_cpus=1,
    )


def png_bytes(images: np.ndarray) -> np.ndarray:
    """float32 [N, C, H, W] in [-1, 1] (decoded from 8-bit pixels) -> PNG bytes per image, the same
    pixels (to_model_range is exact on 8-bit values and inverted here by rounding)."""
    import io

    from PIL import Image

    u8 = np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    out = np.empty(len(u8), dtype=object)
    for i, a in enumerate(u8):
        buf = io.BytesIO()
        Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format="PNG")
        out[i] = buf.getvalue()
    return out
