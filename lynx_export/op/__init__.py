"""The LynxMoE op: the spec of what a block computes, its contract as one table, and its numpy reference."""
