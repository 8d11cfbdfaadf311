"""diffsqueeze.run: running a recipe (run directory, teacher, checkpoints, export, evaluation) and the pruning sweep."""
