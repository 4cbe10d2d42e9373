"""Dataset stages' logic: download, normalisation, tokenisation, draft vocabulary, and their file formats."""
