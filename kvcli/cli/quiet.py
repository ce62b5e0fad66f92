"""Libraries' noise kept out of the user's terminal: warnings (transformers' deprecation
notices), logging below errors and tqdm progress bars ("Loading weights").  kvcli's own
messages go through the Rich console on stderr; ``KVCLI_DEBUG=1`` leaves everything on.

Set in ``main`` before anything imports transformers (it reads these variables once, at
import); a variable the user set stays as they set it.
"""

from __future__ import annotations

import os
import warnings

QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",  # transformers' logger: errors only
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # the tqdm bars of transformers and huggingface_hub
    "TQDM_DISABLE": "1",  # tqdm bars made outside those switches (transformers' GGUF conversion)
}


def quiet_libraries(debug: bool = False) -> None:
    if debug:
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.simplefilter("ignore")  # Python warnings from libraries (kvcli itself never warns this way)
