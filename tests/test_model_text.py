"""Text conditioning: TextEmbeddings' operations, the frozen text encoder loaded from a local
directory (a tiny random CLIP text model with a word-level tokenizer), cross-attention networks
and classifier-free guidance against the empty prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.conditioning import TextEmbeddings, text_conditioning
from model.text_encoder import FrozenTextEncoder, encoder_info
from text_encoder_factory import make_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def encoder(clip_dir):
    return FrozenTextEncoder.from_pretrained(str(clip_dir))


def _emb(b=4, L=5, D=3):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(b, L, D, generator=g)
    m = torch.arange(L)[None] < torch.tensor([2, 3, 4, 5][:b])[:, None]
    return TextEmbeddings(h, m, torch.full((L, D), 7.0), torch.arange(L) < 2)


def test_text_embeddings_null_drop_cat_index():
    t = _emb()
    assert t.batch_size == 4 and (t.seq_len, t.dim) == (5, 3) and t.mask.dtype == torch.bool
    n = t.null_like()
    assert n.batch_size == 4 and torch.all(n.hidden_states == 7.0)
    assert n.mask.tolist() == [[True, True, False, False, False]] * 4
    d = t.drop(torch.tensor([True, False, True, False]))
    assert torch.all(d.hidden_states[0] == 7.0) and torch.equal(d.hidden_states[1], t.hidden_states[1])
    assert torch.equal(d.mask[2], t.null_mask) and torch.equal(d.mask[3], t.mask[3])
    assert not torch.all(t.hidden_states[0] == 7.0)  # operations return new objects
    both = t.cat(n)
    assert both.batch_size == 8 and torch.equal(both.hidden_states[:4], t.hidden_states)
    assert torch.equal(both.hidden_states[4:], n.hidden_states)
    assert torch.equal(t[1:3].hidden_states, t.hidden_states[1:3])
    sel = t[torch.tensor([3, 0])]
    assert torch.equal(sel.mask, t.mask[[3, 0]]) and torch.equal(sel.null_hidden, t.null_hidden)
    half = t.to("cpu", torch.bfloat16)
    assert half.hidden_states.dtype == torch.bfloat16 and half.null_hidden.dtype == torch.bfloat16


def test_text_embeddings_reject_bad_input():
    h = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match="mask must have shape"):
        TextEmbeddings(h, torch.ones(2, 4), torch.zeros(5, 3), torch.ones(5))
    with pytest.raises(ValueError, match="null_hidden"):
        TextEmbeddings(h, torch.ones(2, 5), torch.zeros(4, 3), torch.ones(5))
    with pytest.raises(ValueError, match=r"float tensor \[B, L, D\]"):
        TextEmbeddings(torch.zeros(2, 5), torch.ones(2, 5), torch.zeros(5), torch.ones(5))
    with pytest.raises(ValueError, match="mask must have shape"):
        _emb().drop(torch.tensor([True]))
    with pytest.raises(ValueError, match="concatenate"):
        _emb().cat(_emb(L=6))
    with pytest.raises(ValueError, match="re-encode"):
        text_conditioning(np.zeros((2, 4, 3), np.float32), np.ones((2, 4)), _emb())


def test_encoder_is_frozen_and_pads_to_max_length(encoder, clip_dir):
    assert encoder.max_length == 16 and encoder.embedding_dim == 32
    assert not any(p.requires_grad for p in encoder.model.parameters()) and not encoder.model.training
    t = encoder.encode(["a red circle", "", "a small blue triangle on the left"])
    assert (t.batch_size, t.seq_len, t.dim) == (3, 16, 32)
    # <bos> a red circle <eos> = 5 real tokens; "" = <bos> <eos>
    assert t.mask.sum(1).tolist() == [5, 2, 9]
    # the empty prompt's row equals the carried null embedding: the unconditional input
    assert torch.equal(t.hidden_states[1], t.null_hidden) and torch.equal(t.mask[1], t.null_mask)
    assert not torch.allclose(t.hidden_states[0], t.hidden_states[2])
    info = encoder_info(str(clip_dir))
    assert info["type"] == "clip_text_model" and info["hidden_size"] == 32
    with pytest.raises(ValueError, match="list of str"):
        encoder.encode("a red circle")


def test_encoder_loads_pipeline_layout_and_half_precision(clip_dir, tmp_path, encoder):
    import shutil

    shutil.copytree(clip_dir, tmp_path / "text_encoder")
    shutil.copytree(clip_dir, tmp_path / "tokenizer")
    e = FrozenTextEncoder.from_pretrained(str(tmp_path), dtype=torch.bfloat16, max_length=8)
    t = e.encode(["a red circle"])
    assert t.hidden_states.dtype == torch.bfloat16 and t.seq_len == 8
    ref = encoder.encode(["a red circle"]).hidden_states[0, :5]
    # CLIP's causal mask: the states of real tokens do not depend on the padded length
    torch.testing.assert_close(t.hidden_states[0, :5].float(), ref, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="at most 16"):
        FrozenTextEncoder.from_pretrained(str(clip_dir), max_length=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        FrozenTextEncoder.from_pretrained(str(tmp_path / "empty"))


def test_precomputed_embeddings_take_the_encoders_null(encoder):
    t = encoder.encode(["a red circle", "a blue square"])
    pre = text_conditioning(t.hidden_states.numpy(), t.mask.numpy().astype(np.int8), encoder.null())
    assert torch.equal(pre.hidden_states, t.hidden_states) and torch.equal(pre.null_hidden, t.null_hidden)
    assert pre.mask.dtype == torch.bool


@pytest.mark.parametrize("name,channels,size", [("unet-text-tiny", 3, 16), ("pixart-tiny", 4, 8)])
def test_text_networks_read_the_prompt(encoder, name, channels, size):
    from model.registry import build_model

    torch.manual_seed(0)
    net = build_model(name, in_channels=channels, image_size=size, text_dim=encoder.embedding_dim).eval()
    x = torch.randn(2, channels, size, size)
    t = torch.tensor([10, 500])
    a = encoder.encode(["a red circle", "a red circle"])
    b = encoder.encode(["a blue square", "a blue square"])
    with torch.no_grad():
        out_a, out_b = net(x, t, a), net(x, t, b)
    assert out_a.shape == x.shape
    # the output depends on the prompt: cross-attention reads it
    assert (out_a - out_b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="takes TextEmbeddings"):
        net(x, t, None)
    with pytest.raises(ValueError, match="hidden size 32"):
        net(x, t, _emb(b=2, L=4, D=5))


def test_registry_text_arguments():
    from model.registry import TEXT_MODEL_NAMES, build_model, is_text_model

    assert set(TEXT_MODEL_NAMES) == {"unet-text-tiny", "unet-text-demo", "unet-text-sd", "pixart-tiny", "pixart-alpha"}
    assert is_text_model("pixart-tiny") and not is_text_model("unet-tiny")
    with pytest.raises(ValueError, match="text_dim"):
        build_model("unet-text-tiny", image_size=16)
    with pytest.raises(ValueError, match="not text-conditioned"):
        build_model("unet-tiny", image_size=16, text_dim=32)
    with pytest.raises(ValueError, match="takes no class labels"):
        build_model("pixart-tiny", image_size=16, text_dim=32, num_classes=3)


def test_guided_sampling_with_text_is_seeded_and_uses_the_negative_prompt(encoder):
    from model.guidance import CFGDenoiser
    from model.registry import build_model
    from model.samplers import DDIMOptions, ddim_sample, initial_noise, timesteps_for
    from model.schedules import make_schedule

    torch.manual_seed(0)
    net = build_model("unet-text-tiny", image_size=16, text_dim=32).eval()
    sched = make_schedule("cosine", 100)
    ts = timesteps_for("trailing", 4, 100)
    cond = encoder.encode(["a red circle", "a blue square"])
    neg = encoder.encode(["a green triangle"])
    with_neg = TextEmbeddings(cond.hidden_states, cond.mask, neg.hidden_states[0], neg.mask[0])

    def run(c, w):
        g = torch.Generator().manual_seed(3)
        x = initial_noise((2, 3, 16, 16), generator=g, device="cpu")
        with torch.no_grad():
            return ddim_sample(CFGDenoiser(net, c, w), x, sched, ts, prediction="v",
                               options=DDIMOptions(eta=0.0), generator=g)

    a, b = run(cond, 4.0), run(cond, 4.0)
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert (a - run(cond, 1.0)).abs().max() > 1e-4  # guidance changes the samples
    assert (a - run(with_neg, 4.0)).abs().max() > 1e-4  # so does the negative prompt
    # w = 0 is the unconditional model: the prompt no longer matters, only the null (negative)
    other = encoder.encode(["a yellow square", "a dog"])
    torch.testing.assert_close(run(cond, 0.0), run(other, 0.0))


def test_caption_dropout_replaces_by_the_empty_prompt(encoder):
    from model.objectives import DiffusionObjective
    from model.schedules import make_schedule

    obj = DiffusionObjective(make_schedule("cosine", 100), "v", "uniform", cond_dropout=0.5)
    cond = encoder.encode(["a red circle"] * 64)
    dropped = obj.drop_cond(cond, generator=torch.Generator().manual_seed(0), device="cpu")
    is_null = (dropped.hidden_states == cond.null_hidden).flatten(1).all(1)
    is_kept = (dropped.hidden_states == cond.hidden_states).flatten(1).all(1)
    assert torch.all(is_null ^ is_kept) and 16 < int(is_null.sum()) < 48


def test_t5_encoder_passes_the_padding_mask_and_feeds_pixart(tmp_path):
    from model.registry import build_model
    from text_encoder_factory import make_tiny_t5

    path = make_tiny_t5(tmp_path / "t5")
    assert encoder_info(str(path))["type"] == "t5"
    enc = FrozenTextEncoder.from_pretrained(str(path))
    t = enc.encode(["a red circle", "a red circle on the left"])
    assert (t.seq_len, t.dim) == (12, 32) and t.mask.sum(1).tolist() == [4, 7]  # words + </s>
    # T5 is bidirectional: with the padding mask, a prompt's token states do not depend on how
    # much padding follows them (without it they would)
    short = FrozenTextEncoder.from_pretrained(str(path), max_length=6).encode(["a red circle"])
    torch.testing.assert_close(short.hidden_states[0, :4], t.hidden_states[0, :4], atol=1e-5, rtol=1e-5)
    # fp16 requests load T5 in bf16 (fp16 overflows T5's activations)
    assert FrozenTextEncoder.from_pretrained(str(path), dtype=torch.float16).dtype == torch.bfloat16
    net = build_model("pixart-tiny", in_channels=4, image_size=8, text_dim=enc.embedding_dim).eval()
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([3, 700]), t)
        # the DiT masks padded tokens: changing their states changes nothing
        poked = TextEmbeddings(torch.where(t.mask[..., None], t.hidden_states, torch.tensor(5.0)), t.mask,
                               t.null_hidden, t.null_mask)
        torch.testing.assert_close(net(x, torch.tensor([3, 700]), poked), out)


def test_a_text_model_learns_to_follow_colour_words(encoder):
    """pixart-tiny on 8x8 images of one solid colour each, captioned "a <colour> circle", with
    caption dropout; guided samples of each prompt come out in its colour. The data puts the
    prompt's channel at +1 and the others at -1, so the brightest channel names the colour."""
    from model.guidance import CFGDenoiser
    from model.objectives import DiffusionObjective
    from model.registry import build_model
    from model.samplers import DDIMOptions, ddim_sample, initial_noise, timesteps_for
    from model.schedules import make_schedule

    colours = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
    emb = encoder.encode([f"a {c} circle" for c in colours])
    rgb = torch.tensor(list(colours.values()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        net = build_model("pixart-tiny", image_size=8, text_dim=encoder.embedding_dim)
        sched = make_schedule("cosine", 1000)
        obj = DiffusionObjective(sched, "v", "uniform", cond_dropout=0.1)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randint(0, 3, (16,), generator=g)
            out = obj.training_losses(net, rgb[idx][:, :, None, None].expand(16, 3, 8, 8), emb[idx], generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        net.eval()
        idx = torch.arange(3).repeat_interleave(4)
        gs = torch.Generator().manual_seed(1)
        x = initial_noise((12, 3, 8, 8), generator=gs, device="cpu")
        with torch.no_grad():
            s = ddim_sample(CFGDenoiser(net, emb[idx], 3.0), x, sched, timesteps_for("trailing", 10, 1000),
                            prediction="v", options=DDIMOptions(eta=0.0), generator=gs)
    finally:
        torch.set_num_threads(threads)
    mean = s.mean((2, 3))
    assert torch.equal(mean.argmax(1), idx)
    assert (mean[torch.arange(12), idx] > 0.3).all()
