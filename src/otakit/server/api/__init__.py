"""HTTP APIs of the update server."""
