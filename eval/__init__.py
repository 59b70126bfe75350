"""Evaluation of distilled causal LMs: instruction suites, generation and ROUGE-L scoring as the papers report them."""
