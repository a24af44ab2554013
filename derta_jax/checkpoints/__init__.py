"""Weights in and out: HF safetensors (the only place that knows HF names), PEFT adapter
directories, and Orbax train-state checkpoints with resume onto any mesh."""
