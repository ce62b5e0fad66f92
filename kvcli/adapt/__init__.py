"""``kvcli adapt``: post-training adaptation of a model to PoD (self-distillation).

PoD's members attend to distant entries with their block anchor's keys; a model trained
without that reads them badly (retrieval is lost).  Here the members' query/key projections
get low-rank deltas (``lora``) trained so that the PoD model (the student: proximal window
with own keys, distant keys from the anchor, ``attention.pod_train``) matches the same model
with the full cache (the teacher), on text every machine has offline (``text``).  The
result is an adapter file (``engine.models.adapter``) that ``--method pod`` applies.
"""
