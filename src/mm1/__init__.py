"""mm1: an open PyTorch implementation of Apple's MM1 recipe for multimodal LLMs."""

__version__ = "0.1.0"
