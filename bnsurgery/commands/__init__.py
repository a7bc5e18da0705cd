"""One module per CLI command; each parses, calls the API and renders (see bnsurgery.cli)."""
