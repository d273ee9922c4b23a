"""Layer 3: networks by name (the registry), the cell network, ResNet-18, the supernet and its mixed
op, counting, packing and loading.
"""
