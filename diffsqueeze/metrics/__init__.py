"""diffsqueeze.metrics."""
