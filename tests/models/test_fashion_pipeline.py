"""FashionDiffusionPipeline call contract, save/load round trip, builtin weights (fast, CPU)."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffsqueeze.models import fashion
from diffsqueeze.models.fashion.clip import clip_config
from diffsqueeze.models.fashion.pipeline import (
    FashionDiffusionPipeline,
    scheduler_config,
    unet_config,
)
from diffsqueeze.models.fashion.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny_pipe():
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    cfg = unet_config()
    cfg.update(block_out_channels=(8, 16, 16), attention_head_dim=2, addition_embed_type_num_heads=2)
    unet = UNet2DConditionModel(**cfg)
    text_encoder = CLIPTextModel(clip_config().text_config)
    pipe = FashionDiffusionPipeline(unet=unet, text_encoder=text_encoder, tokenizer=load_tokenizer(),
                                    scheduler=DDIMScheduler(**scheduler_config()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_components_named_like_stable_diffusion(tiny_pipe):
    assert set(tiny_pipe.components) == {"unet", "text_encoder", "tokenizer", "scheduler"}


def test_call_contract(tiny_pipe):
    out = tiny_pipe(["a photo of a bag", "a sneaker"], num_inference_steps=2, num_images_per_prompt=2,
                    negative_prompt="a shoe", generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 4
    assert all(isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (32, 32) for im in out.images)
    pt = tiny_pipe("a bag", num_inference_steps=2, output_type="pt").images
    assert pt.shape == (1, 3, 32, 32) and 0 <= pt.min() and pt.max() <= 1
    npy = tiny_pipe("a bag", num_inference_steps=2, output_type="np", guidance_scale=1.0).images
    assert npy.shape == (1, 32, 32, 3)
    (tup,) = tiny_pipe("a bag", num_inference_steps=2, return_dict=False)
    assert len(tup) == 1
    with pytest.raises(ValueError):
        tiny_pipe("a bag", num_inference_steps=2, output_type="latent")


def test_seeded_and_generator_list(tiny_pipe):
    a = tiny_pipe("a coat", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(3)).images
    b = tiny_pipe("a coat", num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(3)).images
    assert torch.equal(a, b)
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    c = tiny_pipe(["a coat", "a coat"], num_inference_steps=3, output_type="pt", generator=gens).images
    # same noise, but a batch of two may take another BLAS kernel than a batch of one: the
    # images agree up to float round-off, not bit for bit
    torch.testing.assert_close(c[:1], a, rtol=0, atol=1e-5)
    assert not torch.allclose(c[1:], a, atol=1e-2)  # the second generator's seed gives another image


def test_save_load_round_trip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path, safe_serialization=True)
    assert not list(tmp_path.rglob("*.bin")) and list(tmp_path.rglob("*.safetensors"))
    loaded = fashion.build_fashion_pipeline(tmp_path)
    kw = dict(num_inference_steps=3, output_type="pt")
    a = tiny_pipe("a dress", generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded("a dress", generator=torch.Generator().manual_seed(1), **kw).images
    assert torch.allclose(a, b, atol=1e-6)


def test_missing_weights_raise_clear_error(tmp_path):
    with pytest.raises(fashion.BuiltinWeightsMissingError, match="train_fashion_diffusion.py"):
        fashion.build_fashion_pipeline(tmp_path)
    with pytest.raises(fashion.BuiltinWeightsMissingError, match="train_fashion_clip.py"):
        fashion.build_fashion_clip(tmp_path)


@pytest.mark.skipif(not (fashion.PIPELINE_DIR / "model_index.json").is_file(), reason="builtin weights not trained")
def test_builtin_pipeline_generates():
    pipe = fashion.build_fashion_pipeline()
    out = pipe("a photo of a trouser", num_inference_steps=10, generator=torch.Generator().manual_seed(0))
    arr = np.asarray(out.images[0])
    assert arr.shape == (32, 32, 3) and arr.std() > 10


@pytest.mark.skipif(not (fashion.CLIP_DIR / "model.safetensors").is_file(), reason="builtin CLIP not trained")
def test_builtin_clip_classifies_reference_images():
    from diffsqueeze.models.fashion.clip import gray_to_clip_pixels, zero_shot_predict
    from diffsqueeze.models.fashion.data import (
        load_reference_subset,
        pad_to_32,
        to_model_range,
    )

    model, tok = fashion.build_fashion_clip()
    x, y = load_reference_subset()
    px = gray_to_clip_pixels(torch.from_numpy(to_model_range(pad_to_32(x[::10])))[:, None])
    acc = (zero_shot_predict(model, tok, px).numpy() == y[::10]).mean()
    assert acc > 0.6
    # the processor path (PIL RGB -> pixels) agrees with the direct tensor path
    proc = fashion.build_fashion_clip_processor()
    pil = [Image.fromarray(im).convert("RGB") for im in pad_to_32(x[::10][:4])]
    pv = proc(images=pil, return_tensors="pt").pixel_values
    assert torch.allclose(pv, px[:4], atol=1e-5)


def test_shipped_weights_within_budget():
    files = list(fashion.WEIGHTS_DIR.rglob("*.safetensors"))
    assert not list(fashion.WEIGHTS_DIR.rglob("*.bin")) and not list(fashion.WEIGHTS_DIR.rglob("*.pt"))
    assert sum(f.stat().st_size for f in files) <= 30 * 2**20
