"""Layer 2: binary building blocks: quantizers, binary convolutions and the search space's ops."""
