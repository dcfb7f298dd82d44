"""The LynxMoE op: its contract (domain, inputs, attributes) and the spec of what a block computes."""
