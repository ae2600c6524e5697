"""The embedded demo: a synthetic reasoning task and a repository-built tokenizer."""
