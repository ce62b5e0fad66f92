"""The attention layer: the torch reference (``reference``), the backends that compute the
same thing faster (``backends``, ``flash``; Triton kernels in ``kvcli_kernels``), and the
function registered with transformers that drives them (``function``).

Importing this package registers the function; ``ATTN_NAME`` is the name to load models with.
"""

from .function import ATTN_NAME, RunState

__all__ = ["ATTN_NAME", "RunState"]
