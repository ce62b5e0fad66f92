"""The engine layer: loading models (``models``), the prefill/compress/decode loop
(``engine``) and token choice (``sampler``)."""
