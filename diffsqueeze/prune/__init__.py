"""diffsqueeze.prune."""
