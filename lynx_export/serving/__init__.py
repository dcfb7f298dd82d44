"""Files copied into Triton model repositories (they run in the server, not in lynx-export)."""
