"""The shipped stages, by the name a recipe gives them (``stages: [{prune: ...}, {ptq: ...}]``).

A static table: the recipe loader and the runner read it; nothing registers itself on import.
Adding a stage is one entry here (docs/architecture.md).
"""

from __future__ import annotations

from diffsqueeze.pipelines.stage import StageEntry
from diffsqueeze.prune.stage import PruneConfig, PruneStage
from diffsqueeze.quant.binarydm.stage import BinarizeConfig, BinarizeStage
from diffsqueeze.quant.ptq.stage import PTQConfig, PTQStage
from diffsqueeze.quant.quest.stage import QuestConfig, QuestStage

STAGES: dict[str, StageEntry] = {
    entry.name: entry
    for entry in (
        StageEntry("prune", PruneConfig, PruneStage),
        StageEntry("ptq", PTQConfig, PTQStage, calibrated=True),
        StageEntry("quest", QuestConfig, QuestStage, calibrated=True),
        StageEntry("binarize", BinarizeConfig, BinarizeStage, calibrated=True),
    )
}
