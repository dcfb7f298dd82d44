"""Research tooling: the demo and shipped trained models, corpus, training, decode evaluation, accuracy sweeps, router traces."""
