"""bitplan: mixed-precision bit-allocation search.

This package is the shared contract (schemas, errors, cost model, CLI) and is
torch-free at import time; everything that needs PyTorch lives in
``bitplan.core`` and ``bitplan.catalog`` and is imported only where it runs.
"""

__version__ = "0.1.0"
