"""``python -m vmshield`` is the ``vmshield`` command."""

from vmshield.cli.main import main

main()
