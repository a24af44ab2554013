"""The synthetic safety world that `python run.py` runs: DeRTa against its baselines on a
CPU in minutes (world: files and tokenizer; run: train and evaluate; report: table, plots)."""
