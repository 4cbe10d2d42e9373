"""Export of trained drafters in the formats SGLang and vLLM load as they are (see writer.export_checkpoint)."""
