"""The pipeline's actors: ingress -> flusher -> (outcome stream) ; sweeper recovers."""
