"""The converter's command line: `python converters/from_torch.py CKPT [options]`.

Kept at this path for scripts and the README; the code is `jaxmrcnn.converters.from_torch`
(also runnable as `python -m jaxmrcnn.converters.from_torch`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from jaxmrcnn.converters.from_torch import main

    sys.exit(main())
