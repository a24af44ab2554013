"""DeRTa on a real pretrained chat model (a GGUF file, e.g. SmolLM2-135M-Instruct): data from
the authors' files, the recipes trained from the same base, evaluation and report."""
