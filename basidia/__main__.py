"""``python -m basidia``: the same as the ``basidia`` command."""

from basidia.cli import main

main()
