"""SAM3 models through transformers: configurations, loading, checkpoint conversion."""
