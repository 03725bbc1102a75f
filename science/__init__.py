"""The science both sides share, in numpy: sample statistics (`stats`), the formulas
(`physics`), readings from a window of samples (`derive`) and the closed forms for linear
models (`theory`). No torch, no gRPC: the agent and the collector import it alike."""
