"""Training: the pure jitted train step, the loop around it (resume, metrics, export) and
the TPU ahead-of-time compile report with its HLO cost model."""
