"""Fixed-seed generation and the side-by-side grid, on the real tiny Stable Diffusion pipeline."""

import json

import PIL.Image
import pytest
import torch

from diffsqueeze.cli import main
from diffsqueeze.loading import load_pipeline
from diffsqueeze.metrics.grid import (
    GridColumn,
    column_label,
    generate_images,
    grid_rows,
    make_grid,
    make_paired_grid,
)
from diffsqueeze.metrics.pipeline_info import denoiser_bytes, resolve_sampling, sampler_description, sampling_defaults
from diffsqueeze.models import save_pipeline

PROMPTS = ["a photo of a cat", "a red car on a street"]


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("builtin:tiny-sd")


@pytest.fixture(scope="module")
def altered_folder(tmp_path_factory, pipe):
    """tiny-sd with the UNet's first conv scaled: a stand-in for a compressed model."""
    other = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        other.unet.conv_in.weight.mul_(0.5)
    folder = tmp_path_factory.mktemp("altered")
    save_pipeline(other, folder)
    return folder


def test_same_seed_same_image_and_batch_independent(pipe):
    a = generate_images(pipe, [PROMPTS[0]] * 2, [0, 1], 2, 5.0, batch_size=2)
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 32, 32)
    b = generate_images(pipe, [PROMPTS[0]] * 2, [0, 1], 2, 5.0, batch_size=1)
    assert (a.int() - b.int()).abs().max() <= 1  # one generator per image: batching does not change the noise
    assert not torch.equal(a[0], a[1])  # another seed, another image


def test_grid_rows_and_drawing():
    prompts, seeds, labels = grid_rows(["p", "q"], [3, 4])
    assert prompts == ["p", "p", "q", "q"] and seeds == [3, 4, 3, 4] and labels[1] == "p [seed 4]"
    cols = [GridColumn(n, torch.full((4, 3, 16, 16), v, dtype=torch.uint8), ["1.00 MB"]) for n, v in (("a", 0), ("b", 255))]
    im = make_grid(cols, labels, cell=32)
    assert im.width > 2 * 32 and im.height > 4 * 32
    px = im.getpixel((im.width - 4 - 16, im.height - 4 - 16))
    assert px == (255, 255, 255)
    with pytest.raises(ValueError, match="rows"):
        make_grid(cols, labels[:3])


def test_sizes_and_labels(pipe, altered_folder):
    mem, kind = denoiser_bytes(pipe)
    assert kind == "memory" and mem == sum(p.numel() * 4 for p in pipe.unet.parameters()) + sum(
        b.numel() * b.element_size() for b in pipe.unet.buffers())
    disk, kind = denoiser_bytes(pipe, altered_folder)
    assert kind == "disk" and abs(disk - mem) / mem < 0.05
    (altered_folder / "metrics.json").write_text(json.dumps({"fid": {"value": 12.345, "num_generated": 64}}))
    assert column_label(pipe, str(altered_folder)) == [f"{disk / 1e6:.2f} MB (disk)", "FID 12.35 (n=64)"]
    (altered_folder / "metrics.json").write_text(json.dumps({"fid": {"value": None}, "fidelity": {"psnr": 31.26}}))
    assert column_label(pipe, str(altered_folder))[1] == "PSNR 31.3 dB"
    (altered_folder / "metrics.json").unlink()
    assert "DDIMScheduler" in sampler_description(pipe)


def test_grid_cli(tmp_path, pipe, altered_folder):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "grid.png"
    rc = main(["grid", "--models", "builtin:tiny-sd", str(altered_folder), "--names", "fp", "altered",
               "--prompts", str(prompts), "--seeds", "0", "1", "--steps", "2", "--guidance", "5", "--out", str(out),
               "--cell", "64"])
    assert rc == 0
    im = PIL.Image.open(out)
    assert im.width >= 3 * 64 and im.height >= 4 * 64
    info = json.loads(out.with_suffix(".json").read_text())
    assert [c["name"] for c in info["columns"]] == ["fp", "altered"] and info["same_sampler"]
    assert info["seeds"] == [0, 1] and info["num_inference_steps"] == 2 and info["prompt_source"] == str(prompts)
    assert info["columns"][1]["label"][0].endswith("MB (disk)")


def test_grid_cli_errors(tmp_path, capsys):
    assert main(["grid", "--models", "builtin:nope", "--out", str(tmp_path / "g.png")]) == 1
    assert "unknown builtin" in capsys.readouterr().err
    assert main(["grid", "--models", "builtin:tiny-sd", "--names", "a", "b", "--out", str(tmp_path / "g.png")]) == 1
    assert main(["grid", "--models", "builtin:tiny-sd", "--out", str(tmp_path / "g.txt")]) == 1


def test_sampling_defaults_come_from_the_model(pipe):
    from diffsqueeze.models.fashion import build_fashion_pipeline

    assert sampling_defaults(pipe) == (50, 7.5)  # StableDiffusionPipeline.__call__'s own defaults
    fashion = build_fashion_pipeline()
    assert sampling_defaults(fashion) == (10, 2.0)  # the builtin model card's DDIM 10 steps, guidance 2
    assert resolve_sampling(fashion, None, 4.0) == (10, 4.0) and resolve_sampling(fashion, 3, None) == (3, 2.0)


def test_grid_cli_uses_the_model_defaults(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["grid", "--models", "builtin:fashion", "--seeds", "0", "--max-prompts", "1", "--prompts",
                 "builtin:fashion", "--out", str(out), "--cell", "32"]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["num_inference_steps"], info["guidance_scale"]) == (10, 2.0)
    assert "sampling: 10 steps, guidance 2 (the model's own defaults" in capsys.readouterr().out


def test_paired_grid_wraps_prompts_and_pairs_models_per_seed():
    prompts, seeds = [f"p{i}" for i in range(7)], [0, 1]
    n = len(prompts) * len(seeds)
    white = torch.full((n, 3, 8, 8), 255, dtype=torch.uint8)
    black = torch.zeros((n, 3, 8, 8), dtype=torch.uint8)
    im = make_paired_grid([GridColumn("original", black), GridColumn("compressed", white)], prompts, seeds, cell=16,
                          max_rows=5)
    # two blocks of at most 5 prompt rows; per block 2 seeds x 2 models
    header = 4 + 2 * 14 + 4
    block_w = 96 + 2 * (2 * (16 + 4) + 8) + 4
    assert im.size == (2 * block_w, header + 5 * (16 + 4) + 4)  # wrapped: 5 rows, not 7
    x0 = 96  # first image column of the first block: the original's seed-0 image
    assert im.getpixel((x0 + 8, header + 8)) == (0, 0, 0) and im.getpixel((x0 + 20 + 8, header + 8)) == (255, 255, 255)
    assert im.getpixel((x0 + 48 + 8, header + 8)) == (0, 0, 0)  # seed 1's original, after the gap
    with pytest.raises(ValueError, match="images for 7 prompts x 2 seeds"):
        make_paired_grid([GridColumn("a", black[:3])], prompts, seeds)
