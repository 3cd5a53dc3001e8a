"""Beam composites that wire ``streaming``, ``tgn`` and ``profiles`` into live and replay
pipelines, the command line and the HTTP server."""
