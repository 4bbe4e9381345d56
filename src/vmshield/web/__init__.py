"""The web console: static HTML/JS served by the daemon at ``/`` (no build step).

It talks only to the REST API with the bearer token the user signs in with; guest
strings are always inserted as text, never as HTML.
"""
