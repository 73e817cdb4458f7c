"""The torch side of bitplan: model loading, layer discovery, quantizers,
sensitivity methods, plan validation. Imported only by code that runs models
(the CLI's commands and, later, the workers), never by the API process.
"""

import logging as _logging

# transformers imports torchao when it is installed (the deploy extra): torchao then logs a warning for each CUDA
# kernel library it cannot load on a CPU machine, and torch's pytree one for each enum torchao registers. Neither
# concerns the user of a CPU run; errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def load_transformers():
    """``transformers``, set up for bitplan: offline, quiet, and without its torchao quantizer.

    transformers imports torchao for its own quantizer whenever torchao is installed (bitplan's deploy extra puts it
    there for ``bitplan export``/``apply``), which pulls in torch._dynamo: 2.4 s more per process and, measured on
    MiniLM's CLI tests, twice the time of a whole sensitivity run. bitplan never loads a torchao-quantized checkpoint
    through transformers (``bitplan apply`` imports torchao itself), so transformers is told it is absent."""
    import os
    import sys

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers.quantizers" not in sys.modules:
        import transformers.utils

        transformers.utils.is_torchao_available = lambda *args, **kwargs: False  # type: ignore[assignment]
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return transformers
