"""diffsqueeze.quant."""
