"""The compiler: load, detect, rewrite into LynxMoE nodes, lower, verify, build and publish."""
