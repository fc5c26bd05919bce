"""``python -m scvae``: the ``scvae`` command (:func:`scvae.cli.main`), for environments
where the installed ``scvae`` script is not on the ``PATH``."""

from __future__ import annotations

import sys

from scvae.cli import main

if __name__ == "__main__":
    sys.exit(main())
