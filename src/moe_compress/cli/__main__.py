"""`python -m moe_compress.cli` (torchrun runs the CLI so: `torchrun ... -m moe_compress.cli prune ...`)."""

from . import main

main()
