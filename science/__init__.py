"""The science both sides share, in numpy: sample statistics (`stats`), the formulas
(`physics`), readings from a window of samples (`derive`), phases from a series of readings
(`detect`) and the closed forms for linear models (`theory`). No torch, no gRPC, nothing of the
agent or the collector: they import it alike."""
