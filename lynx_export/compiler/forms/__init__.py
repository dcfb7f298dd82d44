"""Exporter forms of MoE blocks: one matcher module per form, shared helpers in `match`."""
