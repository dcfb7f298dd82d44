"""The engine benchmark: dense twin vs MoE vs MoE+LYNX, decode tokens/s against the roofline bound."""
