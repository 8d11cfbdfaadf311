"""diffsqueeze.quant: low-bit quantization and binarization of diffusion denoisers.

Layers (each imports only those before it; docs/architecture.md):

* ``primitives/``: number formats, scale/bias searches, binary bases, bit packing, rounding
  functions: pure tensor math, no ``nn.Module``;
* ``nn/``: quantizers, quantized/binary/packed layers, attention quantization, timestep
  routing, the table of module swaps;
* ``ptq/``, ``quest/``, ``binarydm/``: one package per method (config, stage, its own helpers);
* ``export/``: packed artifacts (save, load), real kernels, size and OPs accounting.
"""
