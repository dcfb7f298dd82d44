"""Lowerings of LynxMoE nodes into what a backend runs."""
