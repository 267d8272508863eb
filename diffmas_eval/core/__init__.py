"""The shared machinery every method is written against: the backbone, KV traces, latent steps, decoding, scoring."""
