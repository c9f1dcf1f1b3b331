"""Models: loading (a hub id, a directory or a GGUF file), the model cache, and the forward passes the engine
runs (packed ragged batches, the attention mask they need, the small-M linear layers, the lean decoder forward)."""
