"""The edge: the ``noetl-edge`` command line now; the Starlette API over projections next."""
