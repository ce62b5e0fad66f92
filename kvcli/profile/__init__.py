"""Measuring and planning, on top of the API: ``profile`` (memory and speed, measured),
``estimate`` (KV memory from a configuration alone), ``calibrate`` (PoD's layer grouping)."""
