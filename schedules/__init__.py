"""The scheduler side: releasing held (off-peak, background) batches to their workers."""
