"""QuEST on the SD3-architecture builtin (tiny-dit): the time-embedding equivalents are the
adaLN modulation projections, found by measurement; a short run lowers the error."""

from __future__ import annotations

import torch

from diffsqueeze.loading import load_pipeline
from diffsqueeze.quant.ptq.stage import PTQStage
from diffsqueeze.quant.quest.stage import QuestStage
from diffsqueeze.quant.quest.time_layers import detect_time_layers
from tests.helpers import make_ctx

CALIB = {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1}


def dit_kwargs(tr, t: float = 500.0):
    g = torch.Generator().manual_seed(0)
    c = tr.config
    return {"hidden_states": torch.randn(1, c.in_channels, c.sample_size, c.sample_size, generator=g),
            "timestep": torch.tensor([t]),
            "encoder_hidden_states": torch.randn(1, 6, c.joint_attention_dim, generator=g),
            "pooled_projections": torch.randn(1, c.pooled_projection_dim, generator=g)}


def test_adaln_projections_are_the_time_layers():
    tr = load_pipeline("builtin:tiny-dit").transformer
    names = detect_time_layers(tr, dit_kwargs(tr), 50.0)
    assert sorted(names) == sorted(["transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                                    "transformer_blocks.1.norm1.linear", "transformer_blocks.1.norm1_context.linear",
                                    "norm_out.linear"])


def test_quest_on_tiny_dit(tmp_path):
    # lr 3e-3: at 1e-2 one epoch on one sample overshoots on some initializations (seen when the
    # weight scale search changed slightly: the error rose from 0.00207 to 0.00245)
    stages = [{"ptq": {"weights": {"bits": 4, "search_steps": 10},
                       "activations": {"bits": 4, "granularity": "channel", "timestep_groups": 2,
                                       "search_values": 4096}}},
              {"quest": {"sensitive_layers": {"patterns": ["*attn.to_q", "*attn.to_k", "*attn.to_v"]},
                         "stage1": {"epochs": 1, "samples": 1, "batch_size": 1, "lr": 3e-3, "act_lr": 1e-3},
                         "stage2": {"epochs": 2, "samples": 2, "batch_size": 2, "lr": 3e-3, "act_lr": 1e-3}}}]
    recipe, ctx = make_ctx("builtin:tiny-dit", tmp_path, stages, CALIB)
    pipe = load_pipeline("builtin:tiny-dit")
    PTQStage(recipe.stages[0].config).apply(pipe, ctx)
    stage = QuestStage(recipe.stages[1].config)
    stage.check(pipe)
    summary = stage.apply(pipe, ctx)
    assert len(summary["time_layers"]) == 5 and len(summary["sensitive_layers"]) == 6
    for name in summary["time_layers"] + summary["sensitive_layers"]:
        m = pipe.transformer.get_submodule(name)
        assert torch.equal(m.quantized_weight(), m.weight)
    assert summary["denoiser_mse_after"] < summary["denoiser_mse_before"]
