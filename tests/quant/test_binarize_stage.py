"""The binarize stage (docs/methods.md §7) on tiny-sd (UNet) and tiny-dit (SD3 transformer) through the runner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffsqueeze.errors import RecipeError
from diffsqueeze.loading import load_pipeline, load_with_state
from diffsqueeze.run.runner import run_recipe
from diffsqueeze.quant.binarydm.act_scales import init_act_scales
from diffsqueeze.quant.binarydm.policy import block_groups, plan_layers
from diffsqueeze.quant.binarydm.stage import BinarizeConfig, BinarizeStage
from diffsqueeze.quant.export.accounting import read_packed
from diffsqueeze.quant.nn.binary_layers import AttentionActQuant, BinaryMixin
from diffsqueeze.recipe import recipe_from_dict

CALIB = {"num_samples": 2, "timesteps": 2, "num_inference_steps": 2, "batch_size": 2, "guidance_scale": 1.0}


def _run(tmp_path: Path, model: str, stages: list) -> tuple[Path, torch.nn.Module]:
    recipe = recipe_from_dict({"model": model, "output_dir": str(tmp_path / "run"), "device": "cpu",
                               "calibration": CALIB, "stages": stages})
    return run_recipe(recipe), recipe


def _unet_kwargs():
    g = torch.Generator().manual_seed(0)
    return {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}


def test_unet_groups_innermost_first_and_policy(tiny_sd):
    order, groups = block_groups(tiny_sd.unet, _unet_kwargs())
    assert order == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert groups == [["mid_block"], ["down_blocks.1", "up_blocks.0"], ["down_blocks.0", "up_blocks.1"]]
    plans = {p.name: p for p in plan_layers(tiny_sd.unet, order, groups, BinarizeConfig())}
    for stem in ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"):
        assert plans[stem].order is None
    assert plans["down_blocks.0.resnets.0.conv1"].order == 2 and plans["up_blocks.1.resnets.1.conv2"].order == 2
    assert plans["mid_block.resnets.0.conv1"].order == 1 and plans["down_blocks.1.resnets.0.conv1"].order == 1
    assert plans["mid_block.resnets.0.conv1"].group == 0
    base = {p.name: p for p in plan_layers(tiny_sd.unet, order, groups, BinarizeConfig(order2_groups=0))}
    assert all(p.order in (None, 1) for p in base.values())


def test_config_validation():
    with pytest.raises(RecipeError, match="order"):
        BinarizeConfig(order=3)
    with pytest.raises(RecipeError, match="progressive_fraction"):
        BinarizeConfig(progressive_fraction=1.0)
    with pytest.raises(RecipeError, match="dataset"):
        recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": "x",
                          "stages": [{"binarize": {"train": {"mode": "dataset", "dataset": "cifar"}}}]})
    with pytest.raises(RecipeError, match="bits"):
        recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": "x",
                          "stages": [{"binarize": {"activations": {"bits": 1}}}]})


def test_check_rejects_dataset_mode_on_flow_matching():
    pipe = load_pipeline("builtin:tiny-dit")
    with pytest.raises(RecipeError, match="scheduler"):
        BinarizeStage(BinarizeConfig(train=_train(mode="dataset"))).check(pipe)
    with pytest.raises(RecipeError, match="include"):
        BinarizeStage(BinarizeConfig(include=("nothing*",))).check(pipe)


def _train(**kw):
    from diffsqueeze.quant.binarydm.config import BinaryTrainConfig

    return BinaryTrainConfig(**kw)


def test_tiny_sd_pruned_binarized_w1a4_reloads(tmp_path):
    run_dir, _ = _run(tmp_path, "builtin:tiny-sd", [
        {"prune": {"targets": {"unet": 0.5}}},
        {"binarize": {"train": {"iters": 2, "batch_size": 2, "lr": 0.001}}},
    ])
    pipe, state = load_with_state(str(run_dir))  # the exported model/ (packed by quant/export)
    unet = pipe.unet
    from diffsqueeze.run.checkpoint import read_checkpoint
    from diffsqueeze.pipelines.manifest import read_manifest

    manifest = read_manifest(run_dir)
    ckpt_dir = run_dir / manifest["stages"][-1]["checkpoint"]
    ckpt = load_pipeline("builtin:tiny-sd")
    ckpt_state, _ = read_checkpoint(ckpt, ckpt_dir)
    binary = {n: m for n, m in unet.named_modules() if isinstance(m, BinaryMixin)}
    assert binary
    # pruned weights binarize to exactly 0; kept ones to nonzero binary values
    for name, m in binary.items():
        mask = ckpt_state.masks[f"unet/{name}.weight"]  # the export keeps them implied in the keep bits
        wq = m.binary_weight()
        assert state.modules[f"unet/{name}"]["masked"]
        assert (wq[~mask] == 0).all() and (wq[mask] != 0).all()
        per_row = {len(set(r.tolist()) - {0.0}) for r in wq.reshape(wq.shape[0], -1)}
        assert max(per_row) <= 2 * m.order
    # attention q/k/probs/v quantizers installed and on; stem stays FP
    attn = [m for m in unet.modules() if isinstance(m, AttentionActQuant)]
    assert len(attn) == 8 and all(q.enabled for a in attn for q in a.quantizers())
    assert not isinstance(unet.conv_in, BinaryMixin) and not isinstance(unet.time_embedding.linear_1, BinaryMixin)
    summary = state.history[-1]["summary"]
    assert summary["storage"]["packed_bytes"] == (run_dir / "packed" / "unet.safetensors").stat().st_size
    assert summary["storage"]["ratio_fp32_to_packed"] > 3
    assert summary["ops"]["saving_vs_fp32"] > 3
    assert summary["training"]["groups_switched_on_at"] == [0, 0, 0]  # 30% of 2 iters: all at once
    from diffsqueeze.describe import describe_pipeline, format_description

    text = format_description(describe_pipeline(pipe, state, run_dir / "model"), manifest)
    assert "unet: packed" in text and "OPs" in text  # `diffsqueeze inspect` shows the accounting
    # the stage's checkpoint (in-memory binary layers, latent weights), the exported model and the
    # stage's own packed file all give the same denoiser
    kw = _unet_kwargs()
    assert all(hasattr(m, "weight_quant") for m in ckpt.unet.modules() if isinstance(m, BinaryMixin))
    other = load_pipeline("builtin:tiny-sd")
    read_checkpoint(other, ckpt_dir)
    with torch.no_grad():
        for m in other.unet.modules():
            if isinstance(m, BinaryMixin):
                m.weight.normal_()  # forget the latent weights: read_packed must restore the binary ones
    read_packed(other.unet, run_dir / "packed" / "unet.safetensors")
    with torch.no_grad():
        a = ckpt.unet(**kw).sample
        b = unet(**kw).sample
        c = other.unet(**kw).sample
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_tiny_dit_transformer_policy_w1a32_no_training(tmp_path):
    run_dir, _ = _run(tmp_path, "builtin:tiny-dit", [
        {"binarize": {"activations": None, "train": {"iters": 0}}},
    ])
    pipe, state = load_with_state(str(run_dir))
    tr = pipe.transformer
    kinds = {k.split("/", 1)[1]: v["kind"] for k, v in state.modules.items()}
    # stem (patch embedding, time/text embedders, context embedder, output) and AdaLN modulations stay FP
    for fp in ("pos_embed.proj", "time_text_embed.timestep_embedder.linear_1", "context_embedder", "proj_out",
               "norm_out.linear", "transformer_blocks.0.norm1.linear", "transformer_blocks.1.norm1_context.linear"):
        assert fp not in kinds
    assert kinds["transformer_blocks.0.attn.to_q"] == "BinaryLinear"
    assert kinds["transformer_blocks.1.ff.net.2"] == "BinaryLinear"
    assert not any(isinstance(m, AttentionActQuant) for m in tr.modules())  # W1A32: no activation quantizers
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = tr(hidden_states=torch.randn(1, 4, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                 pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500])).sample
    assert torch.isfinite(out).all()
    summary = state.history[-1]["summary"]
    assert summary["groups_innermost_first"] == [["transformer_blocks.0", "transformer_blocks.1"]]
    assert summary["activations"]["quantizers"] == 0


def test_dataset_batches_give_noisy_latents_and_epsilon_targets(tiny_sd):
    from diffsqueeze.models.fashion.data import (
        FashionMNISTMissingError,
        load_fashion_mnist,
    )
    from diffsqueeze.quant.binarydm.data import dataset_batches

    try:
        load_fashion_mnist("train")
    except FashionMNISTMissingError:
        pytest.skip("Fashion-MNIST is not installed")
    kwargs, target = next(dataset_batches(tiny_sd, tiny_sd.unet, _train(mode="dataset", batch_size=2),
                                          torch.device("cpu"), seed=0))
    assert kwargs["sample"].shape == (2, 4, 16, 16) and target.shape == (2, 4, 16, 16)
    assert kwargs["encoder_hidden_states"].shape[0] == 2
    assert 0 <= int(kwargs["timestep"].min()) and int(kwargs["timestep"].max()) < 1000
    assert tiny_sd.scheduler.config.prediction_type == "epsilon"
    assert abs(float(target.std()) - 1.0) < 0.3  # epsilon targets are unit Gaussian noise


def test_progressive_schedule_innermost_first():
    from diffsqueeze.quant.binarydm.policy import progressive_schedule

    steps, on = progressive_schedule(1000, 0.3, 3)
    assert steps == 300 and on == {0: 0, 1: 100, 2: 200}
    assert progressive_schedule(1000, 0.0, 3) == (0, {0: 0, 1: 0, 2: 0})  # progressive off: all at once


def test_activation_init_sees_every_calibration_timestep(tiny_sd, tmp_path):
    from diffsqueeze.pipelines.calibration import record_calibration
    from diffsqueeze.quant.binarydm.data import act_init_batches
    from diffsqueeze.recipe import CalibrationConfig

    calib = CalibrationConfig(num_samples=2, timesteps=3, num_inference_steps=3, batch_size=2, guidance_scale=1.0)
    data = record_calibration(tiny_sd, calib, tmp_path / "calib", seed=0)
    batches = act_init_batches(data, 2, torch.device("cpu"))
    assert [b.step for b in batches] == [0, 1, 2]
    assert [b.timestep for b in batches] == data.timesteps
    assert all(torch.all(b.kwargs["timestep"] == b.timestep) for b in batches)


def test_activation_init_covers_attention_quantizers(tiny_sd):
    """Every LSQ scale, attention q/k/v included, starts from the inputs it sees (float64 reference);
    a softmax row averages 1 / n_keys, so the probabilities' scale is 2 / (n_keys sqrt(15)). (Attention
    quantizers once kept scale 1: the wrapped processor bypassed them while they were disabled.)"""
    import copy
    import math
    import types

    import torch.nn.functional as F

    from diffsqueeze.quant.nn.attention import RouteSDPA
    from diffsqueeze.quant.nn.binary_layers import act_quantizers_of

    unet = copy.deepcopy(tiny_sd.unet)
    cfg = BinarizeConfig()
    blocks, groups = block_groups(unet, _unet_kwargs())
    stage = BinarizeStage(cfg)
    ctx = types.SimpleNamespace(state=types.SimpleNamespace(masks={}, modules={}))
    stage.swap_layers(unet, "unet", plan_layers(unet, blocks, groups, cfg), ctx)
    attn = stage.quantize_attention(unet, "unet", blocks, ctx)
    assert len(attn) == 8
    qs = act_quantizers_of(unet)
    for q in qs:
        q.enabled = False
    g = torch.Generator().manual_seed(1)
    batches = []
    for t in (900, 100):
        kw = _unet_kwargs()
        kw["sample"], kw["timestep"] = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([t, t])
        kw["encoder_hidden_states"] = torch.randn(2, 7, 32, generator=g)
        batches.append(types.SimpleNamespace(kwargs=kw))

    # reference: mean |q|, |k|, |v| of each attention's SDPA call, recorded on the plain processors
    seen: dict[str, list] = {}
    current = {}
    hooks = [unet.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: current.update(name=n))
             for n in attn]

    def record(q, k, v, *args, **kwargs):
        seen.setdefault(current["name"], []).append([t.detach().double().abs().mean() for t in (q, k, v)] + [torch.tensor(k.shape[-2], dtype=torch.float64)])
        return F.scaled_dot_product_attention(q, k, v, *args, **kwargs)

    with torch.no_grad(), RouteSDPA(record):
        for b in batches:
            unet(**b.kwargs)
    for h in hooks:
        h.remove()
    assert set(seen) == set(attn)

    init_act_scales(unet, batches)
    assert all(not q.enabled for q in qs)  # the init leaves the switches as it found them
    for q in qs:
        assert float(q.scale.detach()) != 1.0
    for name, quant in attn.items():
        ref = torch.stack([torch.stack(r) for r in seen[name]]).mean(0)
        for i, part in enumerate((quant.q, quant.k, quant.v)):
            expected = 2 * ref[i] / math.sqrt(7)
            assert float(part.scale.detach()) == pytest.approx(float(expected), rel=1e-5)
        assert float(quant.probs.scale.detach()) == pytest.approx(2 / (float(ref[3]) * math.sqrt(15)), rel=1e-5)
