"""The ``vmshield`` command line."""
