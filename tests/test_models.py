"""models.py: parity with the published DiT code, checkpoint compatibility and invariants."""
import functools
import json
import zlib

import pytest
import torch

from conftest import GOLDEN_DIR, randomize
from models import (DIT_CONFIGS, DiT, DiT_models, DiT_XL_2, Guidance, VDiT_models, forward_flops_per_image,
                    get_2d_sincos_pos_embed, load_image_weights)

PAPER_SIZES = [f"DiT-{s}/{p}" for s in ("XL", "L", "B", "S") for p in (2, 4, 8)]

# Small models on the shared 2 cores: torch's second thread only adds contention (several times slower).
pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def golden_model(name):
    """The model with the golden file's deterministic weights (see tests/golden/README.md); built once per size,
    on the meta device (every weight is replaced, so initialising them would be wasted work)."""
    with torch.device("meta"):
        model = DiT_models[name](input_size=16, num_classes=1000).eval()
    state = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(zlib.crc32(("golden:" + k).encode()))) * 0.05
        for k, v in sorted(model.state_dict().items())
    }
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)  # shared between tests: none may train it
    return model


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4"])
def test_forward_matches_reference(golden, name):
    model = golden_model(name)
    x, t, y = golden["inputs"]["x"], golden["inputs"]["t"], golden["inputs"]["y"]
    with torch.no_grad():
        out = model(x, t, y)
    torch.testing.assert_close(out, golden[name]["forward"], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4"])
def test_forward_with_cfg_matches_reference(golden, name):
    model = golden_model(name)
    inp = golden[name]["cfg_inputs"]
    with torch.no_grad():
        out = model.forward_with_cfg(inp["x"], inp["t"], inp["y"], inp["cfg_scale"])
    torch.testing.assert_close(out, golden[name]["forward_with_cfg"], rtol=1e-5, atol=2e-5)


def test_paper_table_is_complete():
    assert sorted(DIT_CONFIGS) == sorted(PAPER_SIZES)
    assert set(PAPER_SIZES) <= set(DiT_models)
    assert DIT_CONFIGS["DiT-XL/2"] == (28, 1152, 16, 2)
    assert DIT_CONFIGS["DiT-S/8"] == (12, 384, 6, 8)


@pytest.mark.parametrize("manifest,input_size", [("DiT-XL-2-256x256.keys.json", 32), ("DiT-XL-2-512x512.keys.json", 64)])
def test_released_checkpoint_keys_load_strictly(manifest, input_size):
    shapes = json.loads((GOLDEN_DIR / manifest).read_text())
    with torch.device("meta"):  # shapes only: no 2.7 GB of weights
        model = DiT_XL_2(input_size=input_size)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    state = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if input_size == 32:
        assert sum(p.numel() for p in model.parameters()) == 675_129_632


@pytest.mark.parametrize("name", PAPER_SIZES)
def test_every_size_builds_and_runs(name):
    small = name.startswith("DiT-S")
    # B, L and XL run on the meta device (shapes and dispatch, no arithmetic) to keep the suite fast; they differ
    # from S only in width and depth, and B/4 and S/2 are checked against the reference's numbers above.
    with torch.device("cpu" if small else "meta"):
        model = DiT_models[name](input_size=16, num_classes=10)
        x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), torch.tensor([0, 9])
        out = model(x, t, y)
    assert out.shape == (2, 8, 16, 16)
    if small:
        out.sum().backward()
        assert model.blocks[0].attn.qkv.weight.grad is not None


def test_output_is_zero_at_initialisation():
    model = DiT_models["DiT-S/4"](input_size=16, num_classes=10)
    out = model(torch.randn(3, 4, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([0, 3, 10]))
    assert torch.count_nonzero(out) == 0


def test_cfg_at_scale_one_equals_conditional_pass():
    model = golden_model("DiT-S/2")
    x = torch.randn(2, 4, 16, 16)
    t, y = torch.tensor([10, 700]), torch.tensor([5, 42])
    with torch.no_grad():
        cond = model(x, t, y)
        for guidance in Guidance:
            out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 1000)]), 1.0, guidance=guidance)
            torch.testing.assert_close(out[:2], cond, rtol=1e-5, atol=1e-5)
            # The second half carries the same guided noise (its other channels stay the null pass's).
            n = 3 if guidance is Guidance.DIT else 4
            torch.testing.assert_close(out[2:, :n], cond[:, :n], rtol=1e-5, atol=1e-5)


def test_guidance_forms_and_interval():
    model = golden_model("DiT-S/2")
    x = torch.randn(1, 4, 16, 16)
    xx, yy = torch.cat([x, x]), torch.tensor([5, 1000])
    with torch.no_grad():
        # The conditional and null passes batched as forward_with_cfg batches them: separate passes sum in
        # other orders, and the guidance scale amplifies that past the tolerance (1.1e-5 measured).
        cond, uncond = model(xx, torch.tensor([400, 400]), yy).split(1)
        full = uncond[:, :4] + 3.0 * (cond[:, :4] - uncond[:, :4])
        tt = torch.tensor([400, 400])
        dit = model.forward_with_cfg(xx, tt, yy, 3.0)  # default: the reference's 3 channels
        torch.testing.assert_close(dit[:1, :3], full[:, :3], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dit[:1, 3:], cond[:, 3:], rtol=1e-5, atol=1e-5)
        every = model.forward_with_cfg(xx, tt, yy, 3.0, guidance="all")
        torch.testing.assert_close(every[:1, :4], full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(every[:1, 4:], cond[:, 4:], rtol=1e-5, atol=1e-5)
        inside = model.forward_with_cfg(xx, tt, yy, 3.0, guidance="all", interval=(300, 500))
        torch.testing.assert_close(inside, every)
        outside = model.forward_with_cfg(xx, tt, yy, 3.0, guidance="all", interval=(0, 399))
        torch.testing.assert_close(outside[:1], cond, rtol=1e-5, atol=1e-5)


def test_grayscale_model_never_guides_the_variance():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2, num_classes=3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([100]), torch.tensor([2])
    with torch.no_grad():
        cond = model(x, t, y)
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.tensor([2, 3]), 4.0)
    assert out.shape == (2, 2, 8, 8)
    torch.testing.assert_close(out[:1, 1:], cond[:, 1:], rtol=1e-5, atol=1e-5)  # the variance channel is the conditional one
    assert not torch.allclose(out[:1, :1], cond[:, :1])    # the noise channel is guided


def test_unconditional_model_and_any_class_count():
    uncond = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=0)
    assert uncond.y_embedder is None and not any(k.startswith("y_embedder") for k in uncond.state_dict())
    assert uncond(torch.randn(2, 4, 8, 8), torch.tensor([1, 2])).shape == (2, 8, 8, 8)
    with pytest.raises(ValueError, match="class-conditional"):
        uncond.forward_with_cfg(torch.randn(2, 4, 8, 8), torch.tensor([1, 1]), None, 2.0)
    seven = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=2, num_classes=7)
    assert seven.y_embedder.embedding_table.num_embeddings == 8  # 7 classes + the null class
    assert seven(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([6, 7])).shape == (2, 8, 8, 8)


def test_label_dropout_only_in_training():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2, num_classes=5, class_dropout_prob=0.5)
    labels = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    dropped = model.y_embedder.token_drop(labels)
    assert 0.45 < (dropped == 5).float().mean() < 0.55
    eval_emb = model.y_embedder(labels[:4], train=False)
    torch.testing.assert_close(eval_emb, model.y_embedder.embedding_table.weight[[0, 0, 0, 0]])


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/4"](input_size=16, num_classes=10)
    for p in model.parameters():  # leave adaLN-Zero so every parameter gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 900]), torch.tensor([1, 2])

    def grads(checkpointing):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        model(x, t, y).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, recomputed = grads(False), grads(True)
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def test_pos_embed_layout():
    emb = get_2d_sincos_pos_embed(8, 3)  # (9, 8): token (i, j) -> [sin j, sin j, cos j, cos j, sin i, ...]
    i, j = 1, 2
    token = emb[i * 3 + j]
    assert token[0] == pytest.approx(torch.sin(torch.tensor(float(j))).item(), abs=1e-6)
    assert token[4] == pytest.approx(torch.sin(torch.tensor(float(i))).item(), abs=1e-6)
    assert token[2] == pytest.approx(torch.cos(torch.tensor(float(j))).item(), abs=1e-6)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="patch size 4 does not divide"):
        DiT_models["DiT-S/4"](input_size=18)
    model = DiT_models["DiT-S/8"](input_size=16, num_classes=10)
    with pytest.raises(ValueError, match="'sideways' is not a valid Guidance"):
        model.forward_with_cfg(torch.randn(2, 4, 16, 16), torch.tensor([1, 1]), torch.tensor([1, 10]), 2.0, guidance="sideways")


def test_compiles_without_graph_breaks_in_blocks():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=1, num_heads=2, num_classes=3)
    block = model.blocks[0]
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    explanation = torch._dynamo.explain(block)(x, c)
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-B/4", "DiT-XL/2"])
def test_flop_count_matches_torch_flop_counter(name):
    """forward_flops_per_image equals what torch counts for the matmuls of a real forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=1000).eval()
        x, t, y = torch.randn(2, 4, 32, 32), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, y)
    assert counter.get_total_flops() == 2 * forward_flops_per_image(model)


#################################################################################
#                                  Video: VDiT                                  #
#################################################################################

FRAMES = 3


def video_pair(learn_sigma=True):
    """A randomized image DiT-Digits/4 and a VDiT-Digits/4 whose spatial part it filled; temporal blocks at init."""
    image = randomize(DiT_models["DiT-Digits/4"](input_size=8, in_channels=3, num_classes=10, learn_sigma=learn_sigma))
    torch.manual_seed(0)
    video = VDiT_models["VDiT-Digits/4"](input_size=8, in_channels=3, num_classes=10, learn_sigma=learn_sigma,
                                         num_frames=FRAMES).eval()
    load_image_weights(video, image.state_dict())
    return image, video


def clip_inputs(n=2):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, FRAMES, 8, 8, generator=g), torch.tensor([3, 700, 400][:n]), torch.tensor([1, 7, 4][:n])


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_video_model_starts_as_the_image_model_on_each_frame(learn_sigma):
    image, video = video_pair(learn_sigma)
    x, t, y = clip_inputs()
    with torch.no_grad():
        out = video(x, t, y)
        per_frame = torch.stack([image(x[:, :, f], t, y) for f in range(FRAMES)], dim=2)  # (N, out, F, H, W)
    assert out.shape == (2, 6 if learn_sigma else 3, FRAMES, 8, 8)
    assert per_frame.abs().max() > 0.1  # randomized spatial weights: not adaLN-Zero's all-zero output
    torch.testing.assert_close(out, per_frame, rtol=0, atol=1e-6)


def test_frames_interact_only_through_trained_temporal_blocks():
    _, video = video_pair()
    x, t, y = clip_inputs()
    moved = x.clone()
    moved[:, :, 1] += 1.0  # another frame 1
    with torch.no_grad():
        assert torch.equal(video(x, t, y)[:, :, 0], video(moved, t, y)[:, :, 0])
        randomize(video, seed=3)  # as after training: temporal gates open
        assert not torch.allclose(video(x, t, y)[:, :, 0], video(moved, t, y)[:, :, 0], atol=1e-4)


def test_load_image_weights_fills_the_spatial_part_and_lists_the_rest():
    image, video = video_pair()
    fresh = VDiT_models["VDiT-Digits/4"](input_size=8, in_channels=3, num_classes=10, num_frames=FRAMES)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    left = load_image_weights(fresh, image.state_dict())
    after = fresh.state_dict()
    assert left == [k for k in after if k.startswith("temporal_")] and len(left) == 1 + 6 * 10
    for k, v in image.state_dict().items():
        assert torch.equal(after[k], v)
    for k in left:
        assert torch.equal(after[k], before[k])
    # Other classes: the label table is left out, keeps its init and is listed.
    without_labels = {k: v for k, v in image.state_dict().items() if not k.startswith("y_embedder")}
    other = VDiT_models["VDiT-Digits/4"](input_size=8, in_channels=3, num_classes=7, num_frames=FRAMES)
    assert "y_embedder.embedding_table.weight" in load_image_weights(other, without_labels)


def test_load_image_weights_refuses_another_width_or_unknown_keys():
    with torch.device("meta"):
        small = DiT_models["DiT-S/2"](input_size=16, num_classes=10).state_dict()
        video = VDiT_models["VDiT-B/2"](input_size=16, num_classes=10, num_frames=FRAMES)
    with pytest.raises(ValueError, match=r"pos_embed: the image checkpoint has shape \[1, 64, 384\], the video model \[1, 64, 768\]"):
        load_image_weights(video, small)
    with pytest.raises(ValueError, match="1 image keys have no place in the video model: repa_projector.weight"):
        load_image_weights(video, {"repa_projector.weight": torch.empty(3, device="meta")})


def test_released_dit_xl_2_fills_vdit_xl_2():
    shapes = json.loads((GOLDEN_DIR / "DiT-XL-2-256x256.keys.json").read_text())
    with torch.device("meta"):  # shapes only
        video = VDiT_models["VDiT-XL/2"](input_size=32, num_frames=16)
        left = load_image_weights(video, {k: torch.empty(v) for k, v in shapes.items()})
    assert left == [k for k in video.state_dict() if k not in shapes]
    assert all(k.startswith("temporal_") for k in left) and len(left) == 1 + 28 * 10
    assert list(video.temporal_pos_embed.shape) == [1, 16, 1152]


def test_video_sizes_table():
    assert sorted(VDiT_models) == sorted(["V" + name for name in DIT_CONFIGS] + ["VDiT-Digits/4"])
    assert set(DiT_models).isdisjoint(VDiT_models)


def test_video_cfg_at_scale_one_and_guidance_interval():
    _, video = video_pair()
    randomize(video, seed=5)
    x, t, y = clip_inputs()
    xx, tt, yy = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])
    with torch.no_grad():
        cond = video(x, t, y)
        torch.testing.assert_close(video.forward_with_cfg(xx, tt, yy, 1.0)[:2], cond, rtol=1e-5, atol=1e-5)
        guided = video.forward_with_cfg(xx, tt, yy, 4.0)
        # t = 3 is inside (0, 500): guided; t = 700 outside: the conditional prediction.
        interval = video.forward_with_cfg(xx, tt, yy, 4.0, interval=(0, 500))
        uncond = video(x, t, yy[2:])
    assert guided.shape == (4, 6, FRAMES, 8, 8)
    torch.testing.assert_close(guided[:2, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(interval[:1], guided[:1])
    torch.testing.assert_close(interval[1:2], cond[1:2], rtol=1e-5, atol=1e-5)
    assert not torch.equal(guided[1:2, :3], cond[1:2, :3])


def test_video_grad_checkpointing_gives_identical_gradients():
    _, video = video_pair()
    randomize(video, seed=7).train()
    x, t, y = clip_inputs()
    drop = torch.tensor([0, 1])

    def grads(checkpointing):
        video.grad_checkpointing = checkpointing
        video.zero_grad()
        video(x, t, y, force_drop_ids=drop).square().mean().backward()
        return [p.grad.clone() for p in video.parameters() if p.requires_grad]

    plain, recomputed = grads(False), grads(True)
    assert plain[-1].abs().sum() > 0
    for a, b in zip(plain, recomputed):
        assert torch.equal(a, b)


def test_video_refuses_another_frame_count():
    _, video = video_pair()
    with pytest.raises(ValueError, match="clips of 3 frames, not 4"):
        video(torch.randn(1, 3, 4, 8, 8), torch.tensor([1]), torch.tensor([1]))


def test_video_flop_count_matches_torch_flop_counter():
    """forward_flops_per_image gives a VDiT's per-clip figure: what torch counts for a real forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = VDiT_models["VDiT-S/2"](input_size=32, num_classes=1000, num_frames=16).eval()
        x, t = torch.randn(2, 4, 16, 32, 32), torch.zeros(2, dtype=torch.long)
        with FlopCounterMode(display=False) as counter:
            model(x, t, t)
    assert counter.get_total_flops() == 2 * forward_flops_per_image(model)
